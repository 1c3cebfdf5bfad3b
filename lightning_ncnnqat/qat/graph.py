"""Data flow of one forward pass: which module or function produced and consumed each tensor.

Model surgery needs the real wiring, not the order of ``children()``: a BatchNorm can only be
folded into the conv whose output it alone consumes, and layers that read the same tensor must
share one input range. Both facts come from running one forward with hooks on every leaf module
and a ``TorchFunctionMode`` that sees every functional op and tensor method called outside
them (``x + y``, ``F.relu``, ``torch.cat``...), so models that wire modules in ``forward()``
are traced too. Tensors are identified by object and version (an in-place op makes a new one).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from lightning_ncnnqat.qat.bn_fold import is_bn_like
from lightning_ncnnqat.qat.wrappers import eager_compiled


@dataclass
class Node:
    """One call in the traced forward: a leaf module call or a function call outside them."""

    index: int
    target: str  # module name, or the function's name
    module: nn.Module | None
    inputs: list[int] = field(default_factory=list)  # value ids
    outputs: list[int] = field(default_factory=list)
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    where: str = ""  # a function call's source line in the user's code ("file.py:12 in forward")


@dataclass
class DataFlow:
    """The traced graph: nodes in call order, and each value's producer and consumers."""

    nodes: list[Node]
    producer: dict[int, int]  # value id -> node index
    consumers: dict[int, list[int]]  # value id -> node indices
    calls: dict[str, list[int]]  # module name -> node indices of its calls
    outputs: list[int] = field(default_factory=list)  # value ids of the tensors forward() returned

    def module_calls(self, name: str) -> list[Node]:
        return [self.nodes[i] for i in self.calls.get(name, [])]


def _tensors(obj: Any) -> list[Tensor]:
    return [t for t in tree_leaves(obj) if isinstance(t, Tensor)]


class _Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self.nodes: list[Node] = []
        self.producer: dict[int, int] = {}
        self.consumers: dict[int, list[int]] = {}
        self.calls: dict[str, list[int]] = {}
        self._current: dict[int, int] = {}  # id(tensor) -> current value id
        self._keep: list[Tensor] = []  # keeps traced tensors alive so ids are not reused
        self._next_value = 0
        self.depth = 0  # > 0 while inside a leaf module

    def _value_of(self, t: Tensor) -> int:
        key = id(t)
        if key not in self._current:
            self._current[key] = self._next_value
            self._next_value += 1
            self._keep.append(t)
        return self._current[key]

    def begin(self, target: str, module: nn.Module | None, inputs: list[Tensor]) -> Node:
        node = Node(len(self.nodes), target, module)
        for t in inputs:
            v = self._value_of(t)
            node.inputs.append(v)
            node.input_shapes.append(tuple(t.shape))
            self.consumers.setdefault(v, []).append(node.index)
        self.nodes.append(node)
        if module is not None:
            self.calls.setdefault(target, []).append(node.index)
        return node

    def end(self, node: Node, outputs: list[Tensor]) -> None:
        for t in outputs:
            v = self._next_value  # every output, even an input returned in place, is a new value
            self._next_value += 1
            self._current[id(t)] = v
            self._keep.append(t)
            self.producer[v] = node.index
            node.outputs.append(v)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            outs = _tensors(out)
            if outs:  # shape/size/dim queries produce no tensor and are not data flow
                node = self.begin(getattr(func, "__name__", str(func)), None, _tensors((args, kwargs)))
                node.where = _caller()
                self.end(node, outs)
        return out


def _caller() -> str:
    """``file.py:line in function`` of the first frame outside torch and this module (the user's forward)."""
    f = sys._getframe(2)
    while f is not None and (f.f_code.co_filename == __file__ or f"{os.sep}torch{os.sep}" in f.f_code.co_filename):
        f = f.f_back
    return "" if f is None else f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno} in {f.f_code.co_name}"


def _is_leaf(m: nn.Module) -> bool:
    """Modules traced as one node: no children (a parametrized module's only child, its
    ``parametrizations`` container, computes its weight and is not a layer of the network),
    BN-like (timm's BatchNormAct2d holds its activation as a child but computes batch_norm
    itself), already converted by QAT, or ``nn.MultiheadAttention`` (ncnn's one layer; its
    ``out_proj`` is read as a weight, never called)."""
    children = [n for n in m._modules if n != "parametrizations" or not isinstance(m._modules[n], nn.ModuleDict)]
    return not children or is_bn_like(m) or "_ncnnqat_orig_class" in m.__dict__ or isinstance(m, nn.MultiheadAttention)


def _rng_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []


def _with_batch_two(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The call with every batch-of-one tensor repeated twice, or None if there is none."""
    one = lambda t: isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == 1  # noqa: E731
    if not any(one(t) for t in (*args, *kwargs.values())):
        return None
    dbl = lambda t: torch.cat([t, t]) if one(t) else t  # noqa: E731
    return tuple(dbl(a) for a in args), {k: dbl(v) for k, v in kwargs.items()}


def trace_call(model: nn.Module, args: tuple, kwargs: dict | None = None, training: bool = False) -> DataFlow:
    """Run ``model(*args, **kwargs)`` once under no_grad, in eval or training mode, and record its data flow.

    Leaves no trace on the model: train/eval flags are restored, and in training mode every
    buffer (BatchNorm statistics, QAT ranges) and the torch RNG state (dropout) are put back as
    they were. A training-mode forward on a batch of one that fails (BatchNorm needs more than one
    value per channel) is retried once with that batch repeated twice.
    """
    kwargs = kwargs or {}
    rec = _Recorder()
    names: dict[nn.Module, str] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(m, n)
    leaves = [(n, m) for n, m in model.named_modules() if _is_leaf(m)]
    handles = []

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if rec.depth == 0:
            module._ncnnqat_trace_node = rec.begin(names[module], module, _tensors((args, kwargs)))  # type: ignore[attr-defined]
        rec.depth += 1

    def post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        rec.depth -= 1
        if rec.depth == 0:
            rec.end(module.__dict__.pop("_ncnnqat_trace_node"), _tensors(output))

    for _, m in leaves:
        handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(m.register_forward_hook(post_hook, with_kwargs=True))
    modes = {m: m.training for m in model.modules()}
    saved = [(b, b.detach().clone()) for b in model.buffers()] if training else []
    try:
        model.train(training)
        # eager_compiled: dynamo cannot trace the hooks above inside a compiled submodule
        with torch.no_grad(), torch.random.fork_rng(devices=_rng_devices(), enabled=training), eager_compiled(model):
            try:
                with rec:
                    out = model(*args, **kwargs)
            except Exception:  # noqa: BLE001 - the user's forward: re-raised in eval; in training retried at batch 2
                if not training:
                    raise
                doubled = _with_batch_two(args, kwargs)
                if doubled is None:
                    raise
                rec.reset()
                for b, v in saved:
                    b.copy_(v)
                with rec:
                    out = model(*doubled[0], **doubled[1])
    finally:
        for h in handles:
            h.remove()
        for m in model.modules():
            m.__dict__.pop("_ncnnqat_trace_node", None)
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)
    outs = _tensors(out)  # all known, or none: an unrecorded output would make live layers look dead
    returned = [rec._current[id(t)] for t in outs] if all(id(t) in rec._current for t in outs) else []
    return DataFlow(rec.nodes, rec.producer, rec.consumers, rec.calls, returned)


def trace_dataflow(model: nn.Module, *inputs: Any) -> DataFlow:
    """Run ``model(*inputs)`` once (eval mode, no grad) and record its data flow.

    The model's train/eval flags are restored afterwards; BatchNorm statistics are untouched.
    """
    return trace_call(model, tuple(inputs), {}, training=False)
