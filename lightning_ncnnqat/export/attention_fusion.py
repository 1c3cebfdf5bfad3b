"""The QAT start's probe: which ``nn.Linear`` layers the converter fuses into ONE MultiHeadAttention.

pnnx rewrites hand-written attention into ``nn.MultiheadAttention`` (``pass_level5/
fuse_multiheadattention.cpp``: separate or packed q/k/v projections, with or without biases, SDPA
or ``matmul -> softmax -> matmul``, self- or cross-attention), which ncnn runs as one
``MultiHeadAttention`` layer. The plan must train such a unit as that layer
(``qat/fused_attention.py``), so before planning :func:`find_converter_units` converts a float
copy of the model with pnnx (only when it has two or more Linear layers and calls an SDPA, or a
softmax on scores of 3 or more dims, outside ``nn.MultiheadAttention``: the signal that pnnx
may fuse) and finds each converted MultiHeadAttention's q/k/v/out weights among the model's
Linear weights, bit for bit (pnnx copies them unchanged, concatenating q/k/v). It costs one pnnx
conversion at the QAT start (1-3 s for a small model). The units found are left on the model
(:data:`~lightning_ncnnqat.qat.fused_attention.CONVERTER_UNITS`) for ``plan_attention``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_ncnnqat.conversion.model_io import FlatModel, model_io
from lightning_ncnnqat.conversion.pnnx import convert_with_pnnx
from lightning_ncnnqat.ncnn.bin_layout import locate
from lightning_ncnnqat.ncnn.int8_attention import mha_dims, mha_weights
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.qat.batches import as_call, from_call, map_tensors
from lightning_ncnnqat.qat.dtypes import float32_example
from lightning_ncnnqat.qat.export_form import export_form
from lightning_ncnnqat.qat.fused_attention import CONVERTER_UNITS, ROLES
from lightning_ncnnqat.qat.prepared import deepcopy_model
from lightning_ncnnqat.qat.wrappers import unwrap

_ATTENTION_FNS = ("softmax", "scaled_dot_product_attention")
#: off switch for the probe (tests of other rooms that must not run pnnx at plan time)
PROBE_ENV = "LIGHTNING_NCNNQAT_NO_FUSION_PROBE"


class _Softmaxes(TorchFunctionMode):
    """Counts SDPA calls, and softmax calls on 3-D or larger tensors (attention scores; a
    classifier's ``[B, C]`` softmax is not one), made outside ``nn.MultiheadAttention``
    (``inside`` > 0 there)."""

    def __init__(self) -> None:
        super().__init__()
        self.inside, self.count = 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = getattr(func, "__name__", None)
        if not self.inside and name in _ATTENTION_FNS:
            scores = args[0] if args else kwargs.get("input")
            if name != "softmax" or (isinstance(scores, torch.Tensor) and scores.dim() >= 3):
                self.count += 1
        return func(*args, **(kwargs or {}))


def may_fuse(model: nn.Module, example_input: Any) -> bool:
    """Two or more ``nn.Linear`` outside ``nn.MultiheadAttention`` and a softmax / SDPA call
    outside it in one eval forward (export form)."""
    mha_children = {id(c) for m in model.modules() if isinstance(m, nn.MultiheadAttention) for c in m.modules()}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in mha_children]
    if len(linears) < 2:
        return False
    mode, handles = _Softmaxes(), []
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            handles.append(m.register_forward_pre_hook(lambda *_: setattr(mode, "inside", mode.inside + 1)))
            handles.append(m.register_forward_hook(lambda *_: setattr(mode, "inside", mode.inside - 1), always_call=True))
    args, kwargs = as_call(example_input)
    try:
        with torch.no_grad(), export_form(model), mode:
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return mode.count > 0


def _find_rows(target: np.ndarray, linears: dict[str, np.ndarray]) -> list[Any] | None:
    """``[module, row0, row1]`` of the Linear whose weight rows ``row0:row1`` equal ``target``
    (a whole weight, or a block of a packed one); None when no Linear holds it."""
    rows = target.shape[0]
    for name, w in linears.items():
        if w.shape[1:] != target.shape[1:] or w.shape[0] % rows:
            continue
        for r0 in range(0, w.shape[0], rows):
            if np.array_equal(w[r0:r0 + rows], target):
                return [name, r0, r0 + rows]
    return None


def _unit_label(parts: list[str], out: str, taken: dict[str, Any]) -> str:
    """The unit's label, a module name (so ``skip`` can name it): the module holding all its
    parts, or its ``out`` module when that is the model itself; made unique."""
    common = os.path.commonprefix([p.split(".") for p in parts])
    if ".".join(common) in parts:  # one packed module is not the whole unit
        common = common[:-1]
    label = ".".join(common) or out
    base, i = label, 2
    while label in taken:
        label, i = f"{base}#{i}", i + 1
    return label


def converter_units(model: nn.Module, param: NcnnParam, data: bytes) -> dict[str, dict[str, Any]]:
    """The units (``QATPlan.fused_attention`` form) of every float MultiHeadAttention in
    ``param``/``data`` whose weights are the model's Linear weights; a layer holding only some of
    them gets ``"why"`` (its parts then stay float). Layers made of ``nn.MultiheadAttention``
    modules (no Linear holds their q/k/v) are left to ``qat/attention.py``."""
    mha_children = {id(c) for m in model.modules() if isinstance(m, nn.MultiheadAttention) for c in m.modules()}
    linears = {n: m.weight.detach().float().cpu().numpy() for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and id(m) not in mha_children}
    layout = locate(param.layers, data)
    units: dict[str, dict[str, Any]] = {}
    for i, lay in enumerate(param.layers):
        if lay.type != "MultiHeadAttention" or lay.get_int(18, 0):
            continue
        w = mha_weights(lay, layout[i], data)
        found = {r: _find_rows(w[f"{r}_weight"], linears) for r in ROLES}
        if not any(found.values()):
            continue
        parts = list(dict.fromkeys(f[0] for f in found.values() if f))
        scale = lay.get_float(6, float("nan"))
        unit = {**{r: f for r, f in found.items()}, "heads": mha_dims(lay)[1],
                "scale": None if np.isnan(scale) else scale, "ncnn": lay.name, "mask": bool(lay.get_int(5, 0))}
        missing = [r for r, f in found.items() if f is None]
        if missing:
            unit["why"] = f"its {'/'.join(missing)} weights are not the model's (the converter changed them)"
            for r in missing:
                unit[r] = [parts[0], 0, 0]
        units[_unit_label(parts, unit["out"][0], units)] = unit
    return units


def find_converter_units(model: nn.Module, example_input: Any) -> dict[str, dict[str, Any]]:
    """Convert a float32 CPU copy of ``model`` with pnnx and leave its :func:`converter_units` on
    the (unwrapped) model for the plan; returns them (empty, and no conversion, when the model
    has nothing pnnx could fuse, or with ``LIGHTNING_NCNNQAT_NO_FUSION_PROBE=1``). A model pnnx
    cannot convert is left to the export preflight, which names the op: nothing is found here."""
    inner = unwrap(model)
    inner.__dict__.pop(CONVERTER_UNITS, None)
    if os.environ.get(PROBE_ENV) == "1":
        return {}
    copy_ = deepcopy_model(inner).float().cpu().eval()
    example = float32_example(from_call(*map_tensors(lambda t: t.detach().cpu(), as_call(example_input))))
    if not may_fuse(copy_, example):
        return {}
    io = model_io(copy_, example)
    try:
        pn = convert_with_pnnx(FlatModel(copy_, io), [t[:1] for t in io.example_tensors()], timeout_s=300.0)
    except Exception:  # noqa: BLE001 - the preflight / export converts again and reports it
        return {}
    units = converter_units(copy_, NcnnParam.parse(pn.param_text), pn.bin_bytes)
    if units:
        inner.__dict__[CONVERTER_UNITS] = units
    return units

