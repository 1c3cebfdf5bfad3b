"""Reading a QAT-prepared model: its ranges, the folded weights and scales, a float copy.

Every function accepts the model inside DataParallel/DDP/torch.compile/Fabric wrappers.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ncnnqat import ops
from lightning_ncnnqat.qat.bn_fold import float_replacement
from lightning_ncnnqat.errors import DivergedError
from lightning_ncnnqat.qat.computed_weights import bake, computing_hooks, deepcopy_memo, reading, strip
from lightning_ncnnqat.qat.attention_plan import unprepare_attention
from lightning_ncnnqat.qat.gemm import float_gemm
from lightning_ncnnqat.qat.modules import ORIG_CLASS, InputQuantizer
from lightning_ncnnqat.qat.plan import PLAN_ATTR, QuantLayerInfo, require_plan
from lightning_ncnnqat.qat.wrappers import unwrap


def input_quantizers(model: nn.Module) -> dict[str, InputQuantizer]:
    """The input range of each range-owning layer, by layer name."""
    model = unwrap(model)
    plan = require_plan(model)
    modules = dict(model.named_modules())
    return {n: modules[n].input_quantizer for n, p in plan.layers.items() if p.input_owner == n}


def check_ranges(model: nn.Module, require_initialized: bool = False, hint: str = "") -> None:
    """Raise naming the layer if a range or a folded weight is NaN/inf (or a range uninitialised).

    Ranges ignore non-finite activations by design, so a diverged run shows up in the weights.
    ``hint`` (the callback's: the learning rate and ``start_epoch``) ends the divergence message.
    Raises :class:`~lightning_ncnnqat.errors.DivergedError` (a RuntimeError) on NaN/inf,
    RuntimeError on an uninitialised range.
    """
    model = unwrap(model)
    plan = require_plan(model)
    modules = dict(model.named_modules())
    tail = f": {hint}" if hint else " (check the loss; a learning rate too high for QAT is the usual cause)"
    for name in plan.layers:
        m = modules[name]
        with torch.no_grad(), reading(m, m.folded_bn):
            w, b = m.folded_weight_bias()
            finite = bool(torch.isfinite(w).all()) and (b is None or bool(torch.isfinite(b).all()))
        if not finite:
            raise DivergedError(
                f"layer '{name}': its (BN-folded) weight or bias holds NaN/inf; training diverged{tail}", layer=name
            )
    for name, q in input_quantizers(model).items():
        r = float(q.running_absmax.detach().float().cpu().item())
        if r != r or r in (float("inf"), float("-inf")):
            raise DivergedError(f"layer '{name}': its input range became {r}; training diverged{tail}", layer=name,
                                value=r)
        if require_initialized and r < 0:
            raise RuntimeError(
                f"layer '{name}': its input range was never initialised (no QAT training step reached it)"
            )


def quantized_layers(model: nn.Module) -> list[QuantLayerInfo]:
    """Folded float weights and the ncnn scales of every quantized layer, in module order."""
    model = unwrap(model)
    plan = require_plan(model)
    check_ranges(model, require_initialized=True)
    infos = []
    for name, m in model.named_modules():
        if name not in plan.layers:
            continue
        p = plan.layers[name]
        with torch.no_grad(), reading(m, m.folded_bn):
            w, b = m.folded_weight_bias()
            w = w.detach().float().cpu().contiguous()
            b = None if b is None else b.detach().float().cpu().contiguous()
            scales = ops.fake_quantize_per_channel(w, p.num_groups, p.weight_bits)[1]
        q = m.input_quantizer
        infos.append(
            QuantLayerInfo(
                name=name,
                kind=p.kind,
                weight_bits=p.weight_bits,
                num_groups=p.num_groups,
                weight=w,
                bias=b,
                weight_scales=scales,
                input_scale=q.scale(),
                input_owner=p.input_owner,
                input_absmax=float(q.running_absmax.item()),
            )
        )
    return infos


def float_layers(model: nn.Module) -> list[tuple[str, str]]:
    """(name, reason) of every weight layer kept in float."""
    return list(require_plan(model).float_layers.items())


#: The tables of hooks a module runs around its forward and backward (``torch/nn/modules/module.py``).
_CALL_HOOK_TABLES = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks",
)
#: A module's own tables (not its attributes): never shared by :func:`_share_uncopyable`.
_TORCH_TABLES = frozenset(_CALL_HOOK_TABLES) | {"_parameters", "_buffers", "_modules"}


#: Owners of hooks known to watch a model and never change it: Lightning's PyTorchProfiler
#: (``profilers/pytorch.py``, ``RegisterRecordFunction``: a ``record_function`` per module call).
_OBSERVERS = frozenset({"RegisterRecordFunction"})


def _own_hook(hook: Any) -> bool:
    """Whether ``hook`` (a function, bound method, ``functools.partial`` or callable object) is the
    package's own: defined in a ``lightning_ncnnqat`` module (the attention and fast-path hooks)."""
    fn = getattr(hook, "func", hook)  # functools.partial
    fn = getattr(fn, "__func__", fn)  # bound method
    module = getattr(fn, "__module__", None) if callable(fn) and hasattr(fn, "__code__") else type(fn).__module__
    return isinstance(module, str) and module.split(".")[0] == "lightning_ncnnqat"


def _observer(hook: Any) -> bool:
    """Whether ``hook`` is a method of a known observer (:data:`_OBSERVERS`), plain or in a partial."""
    owner = getattr(getattr(hook, "func", hook), "__self__", None)
    return type(owner).__name__ in _OBSERVERS


def _probe(model: nn.Module) -> dict[int, Any]:
    """A deepcopy memo in which the model's modules and tensors stand for themselves: deep-copying
    an object with it tests whether deepcopy accepts the object without copying the model."""
    probe: dict[int, Any] = {id(m): m for m in model.modules()}
    probe.update({id(t): t for t in (*model.parameters(), *model.buffers())})
    return probe


def _hooks_memo(model: nn.Module, memo: dict[int, Any]) -> list[str]:
    """Put into ``memo`` the hook tables of each module that holds hooks a copy must not carry, and
    return those hooks as ``'module': kind Name`` for a warning (observers are left out silently).

    A copy keeps what computes: torch's weight-computing pre-hooks (weight_norm, spectral_norm,
    prune: :func:`~lightning_ncnnqat.qat.computed_weights.computing_hooks`), the package's own
    (int8 attention, fast paths) and every user hook deepcopy accepts (deep-copied as before: a
    hook that changes a module's output stays part of the copies and the export). Left out: hooks
    of known observers (:data:`_OBSERVERS`) and hooks holding state deepcopy refuses (live
    ``record_function`` objects, locks, open files), which only a watcher holds; the copy cannot
    carry them anyway, and running them would feed the user's watcher the package's calls."""
    probe, refused = _probe(model), []
    for name, m in model.named_modules():
        computing = {key for key, _, _ in computing_hooks(m)}
        drop = set()
        for attr in _CALL_HOOK_TABLES:
            for key, h in m.__dict__.get(attr, {}).items():
                if key in computing or not callable(h) or _own_hook(h):
                    continue
                if _observer(h):
                    drop.add(key)
                    continue
                try:
                    copy.deepcopy(h, dict(probe))
                except Exception:  # noqa: BLE001 - any refusal (TypeError, RuntimeError, PicklingError)
                    drop.add(key)
                    refused.append(f"'{name}': {attr.strip('_')} {getattr(h, '__qualname__', type(h).__name__)}")
        for attr in _CALL_HOOK_TABLES if drop else ():
            table = m.__dict__.get(attr)
            if table is not None and id(table) not in memo:
                kept = type(table)()
                memo[id(table)] = kept  # first: a kept hook bound to this module finds the table copying
                for k, v in table.items():
                    if k not in drop:
                        kept[k] = copy.deepcopy(v, memo)
    return refused


def _share_uncopyable(model: nn.Module, memo: dict[int, Any]) -> list[str]:
    """Put into ``memo`` (as themselves: the copy shares them) the module attributes deepcopy
    refuses (a ``threading.Lock``, an open file, a live native handle), each probed alone with
    the model's modules and tensors standing for themselves. Their ``module.attr`` names."""
    probe, shared = _probe(model), []
    for name, m in model.named_modules():
        for attr, value in m.__dict__.items():
            if attr in _TORCH_TABLES or id(value) in memo or isinstance(value, (Tensor, nn.Module)):
                continue
            try:
                copy.deepcopy(value, dict(probe))
            except Exception:  # noqa: BLE001 - any refusal (TypeError, RuntimeError, PicklingError) means share it
                memo[id(value)] = value
                shared.append(f"{name or type(model).__name__}.{attr}")
    return shared


def _memo(model: nn.Module, share: bool) -> tuple[dict[int, Any], list[str], list[str]]:
    """The deepcopy memo of :func:`deepcopy_model`, the hooks it leaves out that deepcopy refuses,
    and (``share``) the attributes it shares."""
    memo: dict[int, Any] = {}
    for attr in ("_trainer", "_fabric"):
        obj = model.__dict__.get(attr)
        if obj is not None:
            memo[id(obj)] = None
    deepcopy_memo(model, memo)
    shared = _share_uncopyable(model, memo) if share else []
    return memo, _hooks_memo(model, memo), shared


def deepcopy_model(model: nn.Module) -> nn.Module:
    """A deep copy of the user's model for the package's own work (export, calibration, the
    float32 floor, the attention-fusion probe).

    Left out: a LightningModule's Trainer / Fabric references, and hooks that watch the model
    and cannot or must not be copied (:func:`_hooks_memo`; a UserWarning names those deepcopy
    refuses). Weights that forward pre-hooks compute, which deepcopy refuses after a training
    step, are copied detached (the copy recomputes them at its first call). Attributes deepcopy
    refuses (locks, open files) are shared with the original, found by a retry after a first
    attempt failed. Raises what ``copy.deepcopy`` raises for anything else.
    """
    try:
        memo, left_out, _ = _memo(model, share=False)
        out = copy.deepcopy(model, memo)
    except Exception:  # noqa: BLE001 - retried once with the refused attributes shared; a second failure raises
        memo, left_out, shared = _memo(model, share=True)
        if not shared:
            raise
        out = copy.deepcopy(model, memo)
    if left_out:
        warnings.warn(
            f"the package's copies of the model (export, calibration, checks) leave out {len(left_out)} hook(s) "
            f"that deepcopy refuses: {'; '.join(left_out[:4])}{' ...' if len(left_out) > 4 else ''}; a hook "
            "that changes a module's output is then not part of the int8 model (compute it in a forward)",
            stacklevel=2)
    return out


def folded_float_model(model: nn.Module) -> nn.Module:
    """A deep copy (of the unwrapped model) in eval mode with BN folded and all quantizers removed.

    Quantized layers become plain nn.Conv2d / nn.Linear holding the folded float weights (the
    converters quantize them with the table's scales to exactly the QAT forward's values);
    folded BatchNorm-like modules become nn.Identity, or an nn.Sequential of the submodules they
    still ran after the BN (timm's ``BatchNormAct2d``: its ``drop`` and ``act``, names kept).
    Module names are unchanged. Weights computed by parametrizations or forward pre-hooks
    (weight_norm, spectral_norm, prune) become plain Parameters holding the eval-mode value the
    layer computes with (:mod:`.computed_weights`); their sources are not in the copy.
    """
    model = unwrap(model)
    plan = require_plan(model)
    out = deepcopy_model(model)
    out.__dict__.pop(PLAN_ATTR, None)
    out.eval()
    modules = dict(out.named_modules())
    with torch.no_grad():
        for name in plan.layers:
            m = modules[name]
            with reading(m, m.folded_bn):
                w, b = m.folded_weight_bias()
            w, b = w.detach().clone(), None if b is None else b.detach().clone()
            m.__class__ = nn.Conv2d if isinstance(m, nn.Conv2d) else nn.Linear
            strip(m)
            del m._modules["input_quantizer"]
            for attr in ("weight_bits", "weight_groups", "updates_range", "_ncnnqat_folded_bn", ORIG_CLASS):
                m.__dict__.pop(attr, None)
            m.weight = nn.Parameter(w)
            m.bias = None if b is None else nn.Parameter(b)
        for p in plan.layers.values():
            if p.bn:
                parent_name, _, child = p.bn.rpartition(".")
                setattr(modules[parent_name] if parent_name else out, child, float_replacement(modules[p.bn]))
        float_gemm(modules, plan)  # int8 Gemm layers: plain nn.Linear, weights as trained
        unprepare_attention(out, modules, plan)  # float MultiheadAttention and SDPA: what pnnx converts
    bake(out)  # layers kept in float (and any other module) with computed weights
    out.eval()
    for param in out.parameters():
        param.requires_grad_(False)
    return out


_PREFIXES = ("module.", "_forward_module.", "_orig_mod.", "_original_module.")


def strip_wrapper_prefixes(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove ``module.`` (DataParallel/DDP), ``_orig_mod.`` (torch.compile) and Fabric prefixes from keys."""
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for pre in _PREFIXES:
                if k.startswith(pre):
                    k, changed = k[len(pre) :], True
        out[k] = v
    return out
