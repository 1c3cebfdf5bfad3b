"""Attention the converter fuses: several ``nn.Linear`` layers pnnx writes as ONE MultiHeadAttention.

pnnx's ``pass_level5/fuse_multiheadattention.cpp`` rewrites hand-written attention (q/k/v
projections, separate or packed in one Linear, with or without biases, SDPA or
``matmul -> softmax -> matmul``, the scale on q, k or the logits) into one
``nn.MultiheadAttention``, which ncnn runs as one ``MultiHeadAttention`` layer: q/k/v weights
copied unchanged (concatenated; a missing bias written as zeros), scale ncnn's ``1/sqrt(d)``
when pnnx found the model's within 0.1 %. Planned as separate int8 Gemms, such layers would
train as something ncnn never computes, so the QAT start finds them in the converted model
(``export/attention_fusion.py``: :data:`CONVERTER_UNITS` on the model) and the plan trains the
unit as the ONE layer ncnn runs (``QATPlan.fused_attention``):

* a unit is ``{"q"|"k"|"v"|"out": [module, first row, end row], "heads", "scale", "ncnn", "mask"}``
  (rows of the module's weight: a packed qkv Linear holds q, k and v);
* its forward stays the user's float forward; pre-hooks keep the inputs of the q/k/v modules and
  a forward hook on the ``out`` module replaces its output ``y`` with
  ``y + (mha_int8(...) - y).detach()``: ncnn's int8 MultiHeadAttention values
  (``ops.attention_reference.mha_int8`` on the same weights), the float unit's gradients.
* a unit whose float math is not ncnn's MultiHeadAttention on the example (seq-first layout, a
  mask, another head split: :func:`unit_departure` > :data:`FLOAT_TOL`) stays float with the
  figure as its reason, so do its parts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_ncnnqat.errors import LayerError
from lightning_ncnnqat.ops.attention_reference import mha_float, mha_int8

#: model.__dict__ key: the units the converter made of the model (set by the QAT start's probe).
CONVERTER_UNITS = "_ncnnqat_converter_units"
ROLES = ("q", "k", "v", "out")
#: largest relative departure (max abs / absmax of the output) of the unit's float output from
#: ncnn's float MultiHeadAttention on the same inputs: float32 rounding and pnnx's 0.1 % scale rule
FLOAT_TOL = 2e-3
_UNIT = "_ncnnqat_fused_unit"  # out module: (unit spec, holder, module refs) while planned int8
_SOURCE = "_ncnnqat_fused_sources"  # q/k/v module: [(holder, role)] whose input it provides
_HOOKED = "_ncnnqat_fused_hooks"


def unit_parts(unit: dict[str, Any]) -> list[str]:
    """The module names of a unit, each once, in q, k, v, out order."""
    return list(dict.fromkeys(unit[r][0] for r in ROLES))


def unit_weights(modules: dict[str, nn.Module], unit: dict[str, Any]) -> dict[str, Tensor]:
    """``mha_int8``'s weights of ``unit`` (the modules' own tensors, sliced by rows; a missing bias
    is left out: zeros, as pnnx writes it)."""
    w: dict[str, Tensor] = {}
    for role in ROLES:
        name, r0, r1 = unit[role]
        m = modules[name]
        w[f"{role}_weight"] = m.weight[r0:r1]
        if m.bias is not None:
            w[f"{role}_bias"] = m.bias[r0:r1]
    return w


def _inputs(holder: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    return holder["q"], holder["k"], holder["v"]


def unit_departure(modules: dict[str, nn.Module], unit: dict[str, Any], holder: dict[str, Tensor], out: Tensor) -> float:
    """Relative departure of the unit's float output ``out`` from ncnn's float MultiHeadAttention
    (``mha_float``) on the inputs ``holder`` kept; inf when the shapes do not fit the layer
    (``[B, L, E]`` batch-first inputs)."""
    try:
        with torch.no_grad():
            f = mha_float(*_inputs(holder), unit_weights(modules, unit), unit["heads"], unit["scale"])
    except (RuntimeError, ValueError, KeyError):
        return float("inf")
    if f.shape != out.shape:
        return float("inf")
    ref = out.detach().float()
    return float((f - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _keep_input(module: nn.Module, args: tuple) -> None:
    for holder, role in module.__dict__.get(_SOURCE, ()):
        holder[role] = args[0]


def _int8_output(module: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
    """The out module's forward hook: its output replaced by ncnn's int8 unit (see module doc)."""
    state = module.__dict__.get(_UNIT)
    if state is None:
        return None
    unit, holder, modules = state
    if any(r not in holder for r in ("q", "k", "v")):
        raise LayerError(None, f"fused attention '{unit['ncnn']}': its out module ran before its q/k/v inputs")
    with torch.no_grad():
        w = {k: t.detach() for k, t in unit_weights(modules, unit).items()}
        y = mha_int8(*(t.detach() for t in _inputs(holder)), w, unit["heads"], unit["scale"])
    holder.clear()
    return out + (y.to(out.dtype) - out).detach()  # ncnn's values, the float unit's gradient


def apply_fused(model: nn.Module, modules: dict[str, nn.Module], fused: dict[str, dict[str, Any]]) -> None:
    """Hook every unit of ``fused`` (``QATPlan.fused_attention``) so it trains as ncnn's int8
    MultiHeadAttention. The hooks stay registered (a deep copy carries them) and do nothing once
    :func:`unprepare_fused` has cleared the modules' state. ValueError naming a missing module."""
    for label, unit in fused.items():
        missing = [n for n in unit_parts(unit) if not isinstance(modules.get(n), nn.Linear)]
        if missing:
            raise ValueError(f"fused attention '{label}': the QAT plan names Linear modules this model lacks: {missing}")
        holder: dict[str, Tensor] = {}
        refs = {n: modules[n] for n in unit_parts(unit)}
        for role in ("q", "k", "v"):
            m = modules[unit[role][0]]
            m.__dict__.setdefault(_SOURCE, []).append((holder, role))
        out = modules[unit["out"][0]]
        out.__dict__[_UNIT] = (unit, holder, refs)
        for m in refs.values():
            if not m.__dict__.get(_HOOKED):
                m.register_forward_pre_hook(_keep_input)
                m.register_forward_hook(_int8_output)
                m.__dict__[_HOOKED] = True


def unprepare_fused(modules: dict[str, nn.Module], fused: dict[str, dict[str, Any]]) -> None:
    """Undo :func:`apply_fused`: the unit's modules compute in float again."""
    for unit in fused.values():
        for n in unit_parts(unit):
            m = modules.get(n)
            if m is not None:
                m.__dict__.pop(_UNIT, None)
                m.__dict__.pop(_SOURCE, None)
