"""Attention QAT runs as ncnn's dynamic int8 MultiHeadAttention and SDPA: planned, applied, undone.

pnnx writes ``nn.MultiheadAttention`` as one ``MultiHeadAttention`` layer and every
``F.scaled_dot_product_attention`` call as one ``SDPA`` layer; the export writes both in int8
(param 18=2: activations quantized at run time, no table row; docs/export.md "Attention in
int8"). So QAT trains them as ncnn computes them:

* an ``nn.MultiheadAttention`` called once per forward is swapped by class to
  :class:`~lightning_ncnnqat.qat.attention.QATMultiheadAttention` (same Parameters); it stays
  float, with the reason in the plan, when ncnn's layer cannot compute it
  (:func:`~lightning_ncnnqat.qat.attention.attention_unsupported`), when its attention weights
  are read (ncnn's layer has no such output), or by ``skip``; a ``key_padding_mask`` trains as
  part of its additive mask, as pnnx writes it (:func:`float_attention_masks`);
* every ``F.scaled_dot_product_attention`` call of the traced forward runs
  :func:`~lightning_ncnnqat.ops.attention_reference.sdpa_int8_ste` instead: the plan records the
  innermost module making the calls (``QATPlan.sdpa_calls``), which gets a pair of forward hooks
  that turn a ``TorchFunctionMode`` on for its forward. The calls are all int8 or all float (the
  export tells ncnn's SDPA layers apart by nothing but their order): ``skip`` naming a calling
  module keeps them all float; ``dropout_p`` is not applied (ncnn has no dropout).
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_ncnnqat.qat.attention import attention_unsupported, to_qat_attention
from lightning_ncnnqat.qat.computed_weights import restore_class
from lightning_ncnnqat.qat.config import QATConfig
from lightning_ncnnqat.qat.export_form import export_form
from lightning_ncnnqat.qat.fused_attention import (
    CONVERTER_UNITS, FLOAT_TOL, apply_fused, unit_departure, unit_parts, unprepare_fused,
)
from lightning_ncnnqat.qat.graph import DataFlow
from lightning_ncnnqat.qat.modules import ORIG_CLASS
from lightning_ncnnqat.ops.attention_reference import sdpa_int8_ste

MHA_KIND = "MultiHeadAttention"
SDPA_FN = "scaled_dot_product_attention"
_ON = "_ncnnqat_sdpa_int8"  # in a module's __dict__ while its SDPA calls run as ncnn's int8
_HOOKED = "_ncnnqat_sdpa_hooks"
_MODES = "_ncnnqat_sdpa_modes"


def _mha_float_reason(name: str, m: nn.MultiheadAttention, flow: DataFlow, config: QATConfig) -> str | None:
    """Why the MultiheadAttention ``name`` stays float (None: it runs as ncnn's int8 layer)."""
    if type(m).forward is not nn.MultiheadAttention.forward:
        return f"{type(m).__name__} overrides forward() with other math than nn.MultiheadAttention's"
    if any(fnmatch.fnmatchcase(name, pat) for pat in config.skip):
        return "kept in float by `skip`"
    calls = flow.module_calls(name)
    if len(calls) != 1:
        return "not called in the traced forward" if not calls else f"called {len(calls)} times per forward; kept in float"
    if any(flow.consumers.get(v) for v in calls[0].outputs[1:]):
        return "its attention weights are read (need_weights=True): ncnn's MultiHeadAttention has no such output"
    return attention_unsupported(m)


class _SdpaCounter(TorchFunctionMode):
    """Counts the SDPA calls of one forward by the innermost module running (``stack``). A call made
    inside another function with torch-function handling (``F.multi_head_attention_forward``) runs
    with the mode off, so is not counted: pnnx writes that function as its own layer."""

    def __init__(self, stack: list[str], open_units: set[str]) -> None:
        super().__init__()
        self.stack, self.open, self.calls, self.absorbed = stack, open_units, {}, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if getattr(func, "__name__", None) == SDPA_FN:
            where = self.stack[-1]
            into = self.absorbed if self.open else self.calls  # inside a fused unit: no SDPA layer of its own
            into[where] = into.get(where, 0) + 1
        return func(*args, **(kwargs or {}))


def _unit_hooks(modules: dict[str, nn.Module], units: dict[str, dict], open_units: set[str],
                seen: dict[str, tuple[dict, Any]]) -> list:
    """Hooks of the counting forward that keep each converter unit's q/k/v inputs and its output
    (``seen``) and mark it open in between (``open_units``)."""
    handles = []
    for label, unit in units.items():
        holder: dict[str, Tensor] = {}
        for role in ("q", "k", "v"):
            def keep(mod: nn.Module, a: tuple, role: str = role, holder: dict = holder, label: str = label) -> None:
                holder[role] = a[0]
                open_units.add(label)
            handles.append(modules[unit[role][0]].register_forward_pre_hook(keep))

        def close(mod: nn.Module, a: tuple, out: Any, holder: dict = holder, label: str = label) -> None:
            open_units.discard(label)
            seen[label] = (dict(holder), out)
        handles.append(modules[unit["out"][0]].register_forward_hook(close))
    return handles


def _count_forward(model: nn.Module, args: tuple, kwargs: dict, units: dict[str, dict]) -> _Counted:
    """One eval, no-grad forward: SDPA calls per innermost calling module (those inside a converter
    unit apart), and each converter unit's inputs and output."""
    stack, handles, open_units, seen = [""], [], set(), {}

    modules = dict(model.named_modules())
    for n, m in modules.items():
        if n:
            handles.append(m.register_forward_pre_hook(lambda *_, n=n: stack.append(n)))
            handles.append(m.register_forward_hook(lambda *_: None if stack.pop() else None, always_call=True))
    handles += _unit_hooks(modules, units, open_units, seen)
    counter = _SdpaCounter(stack, open_units)
    was = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        for m, t in was.items():
            m.training = t
    return _Counted(counter.calls, counter.absorbed, seen)


@dataclass
class _Counted:
    calls: dict[str, int]
    absorbed: dict[str, int]
    seen: dict[str, tuple[dict, Any]]


def plan_attention(
    model: nn.Module, args: tuple, kwargs: dict, flow: DataFlow, config: QATConfig, floats: dict[str, str],
    gemm: dict[str, int] | None = None, layers: dict[str, Any] | None = None,
) -> tuple[dict[str, str], dict[str, int], dict[str, dict[str, Any]]]:
    """``(attention_layers, sdpa_calls, fused_attention)`` of the plan (see the module doc); every
    MultiheadAttention kept float goes to ``floats`` with its reason (in place), and its
    ``out_proj`` (read as a weight, never called) leaves ``floats``. The units the converter fuses
    (:data:`~lightning_ncnnqat.qat.fused_attention.CONVERTER_UNITS`, found at the QAT start) take
    their Linear parts out of ``gemm`` / ``layers`` (in place): int8 as one unit, or float with the
    reason (:func:`_plan_units`). Runs one more eval forward (in the deployed form,
    ``export_form``) only when the traced one holds attention or the converter made units."""
    units = dict(model.__dict__.get(CONVERTER_UNITS) or {})
    mhas = {n: m for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    if not mhas and not units and not any(node.target == SDPA_FN for node in flow.nodes):
        return {}, {}, {}
    with export_form(model):
        counted = _count_forward(model, args, kwargs, units)
    sdpa = counted.calls
    fused = _plan_units(model, units, counted, config, floats, gemm if gemm is not None else {},
                        layers if layers is not None else {})
    skipped = [n for n in sdpa if any(fnmatch.fnmatchcase(n, pat) for pat in config.skip)]
    if skipped:  # ncnn's SDPA layers are told apart by order only: all int8 or all float
        why = f"kept in float by `skip` ({', '.join(skipped)}); a model's SDPA calls are int8 all together or not at all"
        floats.update({f"{n or '(model)'}:sdpa": why for n in sdpa})
        sdpa = {}
    attention: dict[str, str] = {}
    for name, m in mhas.items():
        floats.pop(f"{name}.out_proj" if name else "out_proj", None)
        why = _mha_float_reason(name, m, flow, config)
        if why is None:
            attention[name] = MHA_KIND
        else:
            floats[name] = why
    return attention, sdpa, fused


def _unit_float_reason(label: str, unit: dict[str, Any], counted: _Counted, config: QATConfig,
                       modules: dict[str, nn.Module]) -> str | None:
    """Why converter unit ``label`` stays float (None: it trains as ncnn's int8 MultiHeadAttention)."""
    parts = unit_parts(unit)
    skipped = [n for n in (label, *parts) if any(fnmatch.fnmatchcase(n, pat) for pat in config.skip)]
    if skipped:
        return f"kept in float by `skip` ({', '.join(skipped)}): the converter runs {', '.join(parts)} as one layer"
    if unit.get("mask"):
        return "the converter fused it with an attn_mask input, which QAT does not simulate for such a unit"
    if label not in counted.seen:
        return "its parts did not run as one unit in the eval forward"
    holder, out = counted.seen[label]
    err = unit_departure(modules, unit, holder, out) if isinstance(out, Tensor) else float("inf")
    if not err <= FLOAT_TOL:
        return (f"its float output departs from ncnn's MultiHeadAttention on the same inputs by {err:.2g} (relative; "
                f"bar {FLOAT_TOL}): another layout, mask or head split than the converter assumed")
    return None


def _plan_units(model: nn.Module, units: dict[str, dict[str, Any]], counted: _Counted, config: QATConfig,
                floats: dict[str, str], gemm: dict[str, int], layers: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The converter units planned int8 (``QATPlan.fused_attention``); their parts leave ``gemm`` /
    ``layers``, and go to ``floats`` (naming the unit and the reason) when the unit stays float."""
    modules = dict(model.named_modules())
    fused: dict[str, dict[str, Any]] = {}
    for label, unit in units.items():
        parts = unit_parts(unit)
        why = unit.get("why") or _unit_float_reason(label, unit, counted, config, modules)
        for n in parts:
            gemm.pop(n, None)
            layers.pop(n, None)
            if why is not None:
                floats[n] = f"the converter fuses {', '.join(parts)} into one MultiHeadAttention ('{unit['ncnn']}'); {why}"
            else:
                floats.pop(n, None)
        if why is None:
            fused[label] = unit
    return fused


def _sdpa_int8_call(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
    is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
) -> Tensor:
    """``F.scaled_dot_product_attention``'s arguments, computed as ncnn's int8 SDPA (straight-through
    gradients); a bool mask (True = attend) and ``is_causal`` become additive float masks."""
    lq, lk = query.shape[-2], key.shape[-2]
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, device=query.device).masked_fill(~attn_mask, float("-inf"))
    return sdpa_int8_ste(query, key, value, attn_mask, scale).to(query.dtype)


class _Int8Sdpa(TorchFunctionMode):
    """While on: ``F.scaled_dot_product_attention`` runs as ncnn's int8 SDPA; every other call as is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if getattr(func, "__name__", None) == SDPA_FN:
            return _sdpa_int8_call(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _additive(mask: Any, dtype: torch.dtype, masked: bool) -> Any:
    """A bool mask as the additive float mask it means (``-inf`` where ``mask == masked``); a float
    one as ``0 + mask``, a value of its own (see :func:`float_attention_masks`)."""
    if isinstance(mask, Tensor) and mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask if masked else ~mask, float("-inf"))
    if isinstance(mask, Tensor):
        return torch.zeros(mask.shape, dtype=mask.dtype, device=mask.device) + mask
    return mask


class _FloatMasks(TorchFunctionMode):
    """While on: a bool ``attn_mask`` of ``F.scaled_dot_product_attention`` is passed as the additive
    float mask it means (True: attend)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = dict(kwargs or {})
        if getattr(func, "__name__", None) == SDPA_FN:
            args = list(args)
            if len(args) > 3:
                args[3] = _additive(args[3], args[0].dtype, False)
            else:
                kwargs["attn_mask"] = _additive(kwargs.get("attn_mask"), args[0].dtype, False)
        return func(*args, **kwargs)


def _mha_float_masks(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``nn.MultiheadAttention``'s bool ``key_padding_mask`` (arg 3) / ``attn_mask`` (arg 5) as
    additive float masks (True: masked out)."""
    args, kwargs = list(args), dict(kwargs)
    dtype = args[0].dtype
    for i, key in ((3, "key_padding_mask"), (5, "attn_mask")):
        if len(args) > i:
            args[i] = _additive(args[i], dtype, True)
        elif key in kwargs:
            kwargs[key] = _additive(kwargs[key], dtype, True)
    return tuple(args), kwargs


@contextlib.contextmanager
def float_attention_masks(model: nn.Module) -> Iterator[None]:
    """Within: every bool attention mask is the additive float mask it means, for the converters'
    trace. pnnx 20261020 writes a constant bool mask as a MemoryData of 1/0 bytes (21=3) that ncnn
    ADDS to the logits (measured: SDPA output off by 1.6 on a causal 6x6 mask), and a constant
    bool ``key_padding_mask`` of ``nn.MultiheadAttention`` reaches ncnn's MultiHeadAttention as its
    FIRST input (output off by 9e21); with float masks pnnx writes a float32 MemoryData and the
    right input order (both match torch to 1e-7)."""
    handles = [m.register_forward_pre_hook(_mha_float_masks, with_kwargs=True)
               for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    try:
        with _FloatMasks():
            yield
    finally:
        for h in handles:
            h.remove()


def _sdpa_on(module: nn.Module, args: Any) -> None:
    if module.__dict__.get(_ON):
        mode = _Int8Sdpa()
        mode.__enter__()
        module.__dict__.setdefault(_MODES, []).append(mode)


def _sdpa_off(module: nn.Module, args: Any, output: Any) -> None:
    modes = module.__dict__.get(_MODES)
    if modes:
        modes.pop().__exit__(None, None, None)


def apply_attention(model: nn.Module, modules: dict[str, nn.Module], plan: Any) -> None:
    """Swap the planned MultiheadAttention modules (LayerError naming one ncnn cannot compute,
    TypeError for another class) and turn int8 SDPA on in the planned calling modules. The hooks
    (``always_call``: a forward that raises still turns the mode off) stay after :func:`unprepare_attention`
    and do nothing then."""
    for name in plan.attention_layers:
        m = modules[name]
        if not isinstance(m, nn.MultiheadAttention):
            raise TypeError(f"layer '{name}' is {type(m).__name__}; the QAT plan runs it as an nn.MultiheadAttention")
        orig = type(m)
        to_qat_attention(m, name).__dict__[ORIG_CLASS] = orig
    for name in plan.sdpa_calls:
        m = modules[name] if name else model
        if not m.__dict__.get(_HOOKED):
            m.register_forward_pre_hook(_sdpa_on)
            m.register_forward_hook(_sdpa_off, always_call=True)
            m.__dict__[_HOOKED] = True
        m.__dict__[_ON] = True
    apply_fused(model, modules, getattr(plan, "fused_attention", {}))


def unprepare_attention(model: nn.Module, modules: dict[str, nn.Module], plan: Any) -> None:
    """Undo :func:`apply_attention`: the user's classes back, SDPA calls float again. Also used on
    the float copy the converters trace (what ncnn's float layers are converted from)."""
    for name in plan.attention_layers:
        m = modules[name]
        restore_class(m, m.__dict__.pop(ORIG_CLASS, nn.MultiheadAttention))
    for name in plan.sdpa_calls:
        (modules[name] if name else model).__dict__.pop(_ON, None)
    unprepare_fused(modules, getattr(plan, "fused_attention", {}))
