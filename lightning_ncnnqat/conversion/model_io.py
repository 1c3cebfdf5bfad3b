"""The model's inputs and outputs as the converters and the ncnn runtime see them.

A user's ``forward`` may take several tensors (positional or keyword), non-tensor arguments
(``temperature: float = 1.0``) and return a tuple, list or dict of tensors. ONNX, pnnx and
ncnn see a flat signature: input blobs ``in0..inK`` (the tensors of the example, in order) and
output blobs ``out0..outM`` (the tensor leaves of the output, in ``torch.utils._pytree``
order). :class:`FlatModel` presents that flat signature; non-tensor arguments are frozen at
the example's values (defaults stay defaults), so they become constants, never graph inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import keystr, tree_flatten_with_path

from lightning_ncnnqat.qat.batches import as_call, check_call, inputs_like, to_model
from lightning_ncnnqat.qat.export_form import export_form


@dataclass
class ModelIO:
    """The flat signature of a model for one example call.

    ``slots`` names where each input blob goes in the call: ``("arg", i)`` or ``("kw", key)``;
    ``output_paths`` is the pytree path of each tensor leaf of the output (``"[0]"``,
    ``"['boxes']"``), in blob order.
    """

    args: tuple
    kwargs: dict[str, Any]
    slots: list[tuple[str, Any]]
    output_paths: list[str] = field(default_factory=list)
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def input_names(self) -> list[str]:
        return [f"in{i}" for i in range(len(self.slots))]

    @property
    def output_names(self) -> list[str]:
        return [f"out{i}" for i in range(len(self.output_paths))]

    def example_tensors(self) -> list[Tensor]:
        """The example's input tensors in blob order (as given: batch dim first)."""
        return [self.args[k] if kind == "arg" else self.kwargs[k] for kind, k in self.slots]

    def call(self, tensors: Sequence[Tensor]) -> tuple[tuple, dict[str, Any]]:
        """The (args, kwargs) of a call with ``tensors`` in the input slots."""
        args, kwargs = list(self.args), dict(self.kwargs)
        for (kind, k), t in zip(self.slots, tensors):
            if kind == "arg":
                args[k] = t
            else:
                kwargs[k] = t
        return tuple(args), kwargs

    def describe(self) -> dict[str, Any]:
        """For the report: blob names with where they come from / go in the PyTorch call."""
        ins = [
            {"blob": n, "torch": f"args[{k}]" if kind == "arg" else f"kwargs[{k!r}]", "shape": list(t.shape[1:]),
             "dtype": str(input_tensor(t).dtype).replace("torch.", "")}  # what the exported model takes
            for n, (kind, k), t in zip(self.input_names, self.slots, self.example_tensors())
        ]
        outs = [
            {"blob": n, "torch": p, "shape": list(s)}
            for n, p, s in zip(self.output_names, self.output_paths, self.output_shapes)
        ]
        return {"inputs": ins, "outputs": outs}


def tensor_leaves(out: Any) -> tuple[list[str], list[Tensor]]:
    """(paths, tensors) of the tensor leaves of a model output, in pytree order."""
    leaves, _ = tree_flatten_with_path(out)
    paths, tensors = [], []
    for path, leaf in leaves:
        if isinstance(leaf, Tensor):
            paths.append(keystr(path) or "output")
            tensors.append(leaf)
    return paths, tensors


class FlatModel(nn.Module):
    """``model`` with the flat signature: ``forward(*input_tensors) -> tuple of output tensors``."""

    def __init__(self, model: nn.Module, io: ModelIO) -> None:
        super().__init__()
        self.model = model
        self.io = io

    def forward(self, *tensors: Tensor) -> Any:
        args, kwargs = self.io.call(tensors)
        with export_form(self.model):  # a no-op inside export(); the form it deploys elsewhere
            _, outs = tensor_leaves(self.model(*args, **kwargs))
        return outs[0] if len(outs) == 1 else tuple(outs)


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device of the model's first parameter and its floating dtype (CPU / float32 without)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return device, next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def model_io(model: nn.Module, example_input: Any) -> ModelIO:
    """The flat signature of ``model`` called on ``example_input`` (one eval forward, no grad).

    Raises:
        ValueError: no tensor input, or an output with no tensor.
        TypeError: ``example_input`` is not a Tensor, tuple/list or dict, or leaves a required
            ``forward`` parameter without a value (named).
    """
    args, kwargs = as_call(example_input)
    check_call(model, args, kwargs)
    slots: list[tuple[str, Any]] = [("arg", i) for i, a in enumerate(args) if isinstance(a, Tensor)]
    slots += [("kw", k) for k, v in kwargs.items() if isinstance(v, Tensor)]
    if not slots:
        raise ValueError(f"`example_input` holds no tensor (got {type(example_input).__name__})")
    io = ModelIO(tuple(args), dict(kwargs), slots)
    device, dtype = _device_dtype(model)
    ex = [to_model(t[:1].detach(), device, dtype) for t in io.example_tensors()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), export_form(model):
            a, k = io.call(ex)
            paths, outs = tensor_leaves(model(*a, **k))
    finally:
        model.train(was_training)
    if not outs:
        raise ValueError(f"{type(model).__name__} returned no tensor in eval mode: nothing to export")
    io.output_paths = paths
    io.output_shapes = [tuple(o.shape[1:]) if o.dim() else () for o in outs]
    return io


def input_tensor(t: Tensor) -> Tensor:
    """An input as the export feeds it (detached, CPU): floating point as float32 (the folded
    model, ONNX and ncnn compute in float32, so a float64 batch is cast), integer and bool
    tensors unchanged (token ids stay int64 for PyTorch and ONNX; :mod:`lightning_ncnnqat.ncnn.isolated`
    writes them into ncnn's Mats as ncnn's ``Embed`` reads them)."""
    t = t.detach().cpu()
    return t.float() if t.is_floating_point() else t


def held_inputs(io: ModelIO, held_batch: Any, names: Sequence[str] | None = None) -> list[Tensor]:
    """The held batch as CPU tensors, one per input blob (``[N, ...]`` each, :func:`input_tensor`).

    ``held_batch`` may be structured like the example (Tensor, tuple, dict) or be a dataloader
    batch holding the inputs (``(inputs, targets)``, a dict batch; ``names``: forward's
    positional parameter names, to read a dict batch). Raises ValueError naming the mismatch.
    """
    got = inputs_like(held_batch, io.args, io.kwargs, names)
    if got is None:
        raise ValueError(
            f"`held_batch` ({type(held_batch).__name__}) does not hold the model's inputs "
            f"({len(io.slots)} tensor(s) like the example input)"
        )
    tmp = ModelIO(got[0], got[1], io.slots)
    tensors = [input_tensor(t) for t in tmp.example_tensors()]
    for name, t, e in zip(io.input_names, tensors, io.example_tensors()):
        if t.is_floating_point() != e.is_floating_point():
            raise ValueError(
                f"held batch input {name} is {t.dtype}, the example input {e.dtype}: integer inputs (token ids) "
                "must be integer in both, float inputs float"
            )
    n = {len(t) for t in tensors}
    if len(n) != 1:
        raise ValueError(f"`held_batch` inputs hold different sample counts: {[len(t) for t in tensors]}")
    for name, t, e in zip(io.input_names, tensors, io.example_tensors()):
        if tuple(t.shape[1:]) != tuple(e.shape[1:]):
            raise ValueError(
                f"held batch input {name} has shape {tuple(t.shape)}, the example input {tuple(e.shape)}"
            )
    return tensors


def torch_outputs(model: nn.Module, io: ModelIO, inputs: Sequence[Tensor], batch_size: int = 32) -> list[np.ndarray]:
    """Eval outputs of ``model`` on ``inputs`` (``[N, ...]`` per input blob): one ``[N, K]``
    float64 array per output blob. Outputs whose first dim is not the batch are computed one
    sample at a time."""
    device, dtype = _device_dtype(model)
    n = len(inputs[0])
    per_out: list[list[np.ndarray]] = [[] for _ in io.output_paths]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), export_form(model):
            step = batch_size
            i = 0
            while i < n:
                chunk = [to_model(t[i : i + step], device, dtype) for t in inputs]
                a, k = io.call(chunk)
                _, outs = tensor_leaves(model(*a, **k))
                m = len(chunk[0])
                if step > 1 and any(o.dim() == 0 or o.shape[0] != m for o in outs):
                    step = 1  # an output without a batch dim: go sample by sample
                    continue
                for j, o in enumerate(outs):
                    per_out[j].append(o.detach().double().cpu().reshape(m, -1).numpy())
                i += m
    finally:
        model.train(was_training)
    return [np.concatenate(p) for p in per_out]
