"""Model surgery for QAT: decide which layers ncnn runs in int8, fold BatchNorm, attach quantizers.

The whole QAT start (this surgery, the calibrated start, the export preflight and the measured
re-plan) is :func:`lightning_ncnnqat.start.prepare_qat`; without a Trainer::

    plan = prepare_qat(model, example_input)        # fold BN, attach quantizers, print nothing
    print(plan.summary())
    ... train ...
    infos = quantized_layers(model)                  # scales for the ncnn table
    float_model = folded_float_model(model)          # what the converters see
    unprepare(model)                                 # back to the float model, same Parameters

Decisions come from the data flow of one traced eval-mode forward (``graph.py``; what ncnn will
run), checked against one training-mode forward (which layers a training step reaches), and are
recorded in a :class:`QATPlan`, a plain dict in checkpoints, so a fresh model can be rebuilt
exactly (:func:`restore_from_checkpoint`) without tracing again. Every function accepts the
model inside DataParallel, DDP, ``torch.compile`` or Fabric wrappers (``wrappers.unwrap``).
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from lightning_ncnnqat.qat.batches import as_call, check_call, map_tensors, to_model
from lightning_ncnnqat.qat.bn_fold import BNMatch, fold_bn, is_bn_like, match_bn, set_stats_live, unfold_bn
from lightning_ncnnqat.qat.computed_weights import describe as describe_computed
from lightning_ncnnqat.qat.computed_weights import restore_class
from lightning_ncnnqat.qat.config import QATConfig
from lightning_ncnnqat.errors import ConfigError
from lightning_ncnnqat.qat.model_forms import check_model_form
from lightning_ncnnqat.qat.export_form import drop_unexported, export_form
from lightning_ncnnqat.qat.attention_plan import apply_attention, plan_attention, unprepare_attention
from lightning_ncnnqat.qat.training_forms import apply_training_forms, remove_training_forms
from lightning_ncnnqat.qat.fast_path import block_fast_paths, restore_fast_paths
from lightning_ncnnqat.qat.fused_attention import unit_parts
from lightning_ncnnqat.qat.gemm import GEMM_RANKS, apply_gemm, classify_gemm, split_gemm, unprepare_gemm
from lightning_ncnnqat.qat.graph import DataFlow, trace_call
from lightning_ncnnqat.qat.layer_forms import _computes_like, _is_plain
from lightning_ncnnqat.qat.modules import ORIG_CLASS, QAT_CLASSES, InputQuantizer, qat_class_for
from lightning_ncnnqat.qat.plan import PLAN_ATTR, PLAN_VERSION, LayerPlan, QATPlan, QuantLayerInfo, get_plan, require_plan
from lightning_ncnnqat.qat.plan_state import install_plan_hooks
from lightning_ncnnqat.qat.prepared import (
    check_ranges,
    float_layers,
    folded_float_model,
    input_quantizers,
    quantized_layers,
    strip_wrapper_prefixes,
)
from lightning_ncnnqat.qat.activation_swap import apply_chain_activations, restore_chain_activations
from lightning_ncnnqat.qat.wrappers import unwrap

__all__ = ["plan_qat", "apply_plan", "plan_and_apply", "unprepare", "measured_float_reasons", "replan_as_float"]

log = logging.getLogger(__name__)

EVAL_ONLY = "runs only in eval mode: no training step gives it a range"
TRAIN_ONLY = "not called in the traced forward (eval mode): runs only in training, so it is not exported"
NOT_CALLED = "not called in the traced forward"
_QAT_ATTRS = ("weight_bits", "weight_groups", "updates_range", "_ncnnqat_folded_bn", ORIG_CLASS)


def _classify(name: str, m: nn.Module, flow: DataFlow, config: QATConfig) -> tuple[LayerPlan | None, str | None]:
    """(plan, None) for a layer ncnn runs in int8, (None, reason) for a weight layer kept in float,
    (None, None) for modules that are not weight layers."""
    is_conv = _is_plain(m, nn.Conv2d) or _computes_like(m, nn.Conv2d, flow, name)
    is_linear = _is_plain(m, nn.Linear) or _computes_like(m, nn.Linear, flow, name)
    if not (is_conv or is_linear):
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            what = type(m).__name__
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                return None, f"{what} overrides forward() with other math than nn.Conv2d/nn.Linear's"
            return None, f"{what} has no int8 kernel in ncnn"
        return None, None
    if any(fnmatch.fnmatchcase(name, pat) for pat in config.skip):
        return None, "kept in float by `skip`"
    calls = flow.module_calls(name)
    if not calls:
        return None, TRAIN_ONLY
    if len(calls) > 1:
        return None, f"called {len(calls)} times per forward (shared weights); kept in float"
    shape = calls[0].input_shapes[0] if calls[0].input_shapes else ()
    if is_linear:
        if len(shape) in GEMM_RANKS:  # pnnx's Gemm: int8 with per-row dynamic input (qat/gemm.py)
            return classify_gemm(name, shape)
        if len(shape) != 2:
            return None, f"input of rank {len(shape)}: ncnn runs only 2-D InnerProduct in int8"
        return LayerPlan("InnerProduct", 8, m.out_features, name), None
    assert isinstance(m, nn.Conv2d)
    if len(shape) != 4:
        return None, f"input of rank {len(shape)}: expected a batched NCHW tensor"
    if m.groups == 1:
        six = config.six_bit_3x3 and m.kernel_size == (3, 3) and m.stride == (1, 1) and m.dilation == (1, 1)
        return LayerPlan("Convolution", 6 if six else 8, m.out_channels, name), None
    if m.groups != m.in_channels and config.quantize_grouped_convs is False:
        return None, f"grouped conv (groups={m.groups}, {m.in_channels} channels): quantize_grouped_convs=False"
    return LayerPlan("ConvolutionDepthWise", 8, m.groups, name), None


def _find_bn(name: str, m: nn.Module, flow: DataFlow) -> tuple[str | None, BNMatch | None, str | None]:
    """``(bn, match, None)``: the BN-like module that alone reads this layer's output, foldable;
    ``(None, None, reason)``: such a module exists but cannot be folded (the layer must stay float:
    the converters fold it into the layer, so a table for the unfolded weight would be wrong);
    ``(None, None, None)``: no BN-like module reads the output alone."""
    (call,) = flow.module_calls(name)
    if len(call.outputs) != 1:
        return None, None, None
    readers = flow.consumers.get(call.outputs[0], [])
    if len(readers) != 1:  # neither QAT nor the converters fold a BN whose input has other readers
        return None, None, None
    reader = flow.nodes[readers[0]]
    bn = reader.module
    if bn is None or not is_bn_like(bn):
        return None, None, None
    what = f"feeds {type(bn).__name__} '{reader.target}', which the converters fold into this layer but QAT cannot"
    n_calls = len(flow.module_calls(reader.target))
    if n_calls != 1:
        return None, None, f"{what}: it is called {n_calls} times per forward"
    if reader.inputs != call.outputs:
        return None, None, f"{what}: it reads more than this layer's output"
    out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
    match, why = match_bn(bn, reader.input_shapes[0])
    if match is None:
        return None, None, f"{what}: {why}"
    if bn.running_mean.numel() != out:
        return None, None, f"{what}: {bn.running_mean.numel()} channels, the layer has {out}"
    return reader.target, match, None


def _unfolded_bn_notes(layers: dict[str, LayerPlan], flow: DataFlow) -> dict[str, str]:
    """A line for every BN-like module reading a quantized layer's output that is not folded (the
    output has other readers): it runs in float after the int8 layer, in ncnn as in PyTorch."""
    folded = {p.bn for p in layers.values() if p.bn}
    notes: dict[str, str] = {}
    for name in layers:
        for out in flow.module_calls(name)[0].outputs:
            for i in flow.consumers.get(out, []):
                node = flow.nodes[i]
                if node.module is not None and is_bn_like(node.module) and node.target not in folded:
                    notes[node.target] = (
                        f"{type(node.module).__name__} not folded into '{name}' (its output has other readers): "
                        "runs in float after it, as the converters leave it"
                    )
    return notes


def _traced(model: nn.Module, args: tuple, kwargs: dict) -> tuple[DataFlow, DataFlow | None, str | None]:
    with export_form(model):  # the eval graph in the form it deploys (export_form.py)
        flow = trace_call(model, args, kwargs, training=False)
    try:
        return flow, trace_call(model, args, kwargs, training=True), None
    except Exception as exc:  # noqa: BLE001  (the eval graph is what ncnn runs; go on without)
        return flow, None, f"{type(exc).__name__}: {exc}"


def check_skip(model: nn.Module, skip: tuple[str, ...], who: str) -> None:
    """Every ``skip`` name or pattern must match a module of ``model`` (wrappers unwrapped): one that
    matches nothing is a typo or a name from another model, and would leave in int8 the layers the
    user meant to keep in float.

    Raises:
        ConfigError: naming ``skip``, the patterns that match nothing and a few of the model's names.
    """
    names = [n for n, _ in unwrap(model).named_modules() if n]
    unmatched = [p for p in skip if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ConfigError(
            f"{who}: `skip` pattern(s) {unmatched} match no module of {type(unwrap(model)).__name__} (its module "
            f"names look like {names[:4]}; patterns are fnmatch, e.g. 'head.*')",
            argument="skip", value=unmatched,
        )


def plan_qat(model: nn.Module, example_input: Any, config: QATConfig | None = None) -> QATPlan:
    """Trace ``model`` on ``example_input`` (eval and training mode) and decide what QAT does to it.

    ``example_input``: a Tensor, a tuple/list of positional inputs or a dict of keyword inputs
    (Lightning's ``example_input_array`` convention). Raises TypeError naming the ``forward``
    parameter when a required one is not supplied. Wrappers (DDP, torch.compile, ...) are unwrapped.
    """
    config = config or QATConfig()
    model = unwrap(model)
    check_model_form(model, "QAT")
    args, kwargs = as_call(example_input)
    check_call(model, args, kwargs)
    check_skip(model, config.skip, "QAT")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    args, kwargs = map_tensors(lambda t: to_model(t, t.device, dtype), (args, kwargs))  # float64 examples; ids kept
    flow, train_flow, train_error = _traced(model, args, kwargs)
    modules = dict(model.named_modules())
    layers: dict[str, LayerPlan] = {}
    floats: dict[str, str] = {}
    notes: dict[str, str] = {}
    if train_error is not None:
        notes["(training forward)"] = (
            f"the training-mode forward failed on the example ({train_error[:200]}); "
            "layers that run only in eval mode cannot be told apart and may get no range"
        )
    for name, m in modules.items():
        plan, reason = _classify(name, m, flow, config)
        if plan is not None and train_flow is not None and not train_flow.module_calls(name):
            plan, reason = None, EVAL_ONLY
        if reason == TRAIN_ONLY and (train_flow is None or not train_flow.module_calls(name)):
            reason = NOT_CALLED
        if plan is not None:
            layers[name] = plan
        elif reason is not None:
            floats[name] = reason
    drop_unexported(flow, layers, floats)  # dead in the export form: the converters drop them
    gemm = split_gemm(layers, floats, modules, flow)  # no input range, no BN fold: a plan of their own
    # MHA / SDPA / converter-fused attention units (their Linear parts leave gemm/layers): qat/attention_plan.py
    attention, sdpa, fused = plan_attention(model, args, kwargs, flow, config, floats, gemm, layers)
    for name in list(layers):
        bn, match, reason = _find_bn(name, modules[name], flow)
        if reason is not None:
            del layers[name]
            floats[name] = reason
        elif bn is not None and match is not None:
            layers[name].bn, layers[name].bn_eps, layers[name].bn_tail = bn, match.eps, list(match.tail)
    notes.update(_unfolded_bn_notes(layers, flow))
    for name in layers:  # weight_norm, spectral_norm, prune: say which tensor QAT quantizes
        how = describe_computed(modules[name])
        if how:
            notes[name] = f"computed {how}: QAT fake-quantizes the computed weight, the export writes its value"
    # Readers of one tensor share one range, owned by the first reader in call order.
    owner_of_value: dict[int, str] = {}
    for name in sorted(layers, key=lambda n: flow.calls[n][0]):
        (call,) = flow.module_calls(name)
        layers[name].input_owner = owner_of_value.setdefault(call.inputs[0], name)
    return QATPlan(layers, floats, config, notes=notes, gemm_layers=gemm, attention_layers=attention, sdpa_calls=sdpa,
                   fused_attention=fused)


def apply_plan(model: nn.Module, plan: QATPlan) -> None:
    """Convert ``model`` in place as ``plan`` says (idempotent on an already prepared model)."""
    model = unwrap(model)
    if get_plan(model) is not None:
        return
    apply_chain_activations(model, plan.config.chain_activations)  # the activations the plan trains with
    modules = dict(model.named_modules())
    missing = [n for n in list(plan.layers) + [p.bn for p in plan.layers.values() if p.bn] + list(plan.gemm_layers)
               + list(plan.attention_layers) + [n for n in plan.sdpa_calls if n] if n not in modules]
    if missing:
        raise ValueError(f"the QAT plan names modules this model does not have: {missing}")
    quantizers: dict[str, InputQuantizer] = {}
    for name, p in plan.layers.items():
        m = modules[name]
        base = next((b for b in QAT_CLASSES if isinstance(m, b)), None)
        if base is None:
            raise TypeError(f"layer '{name}' is {type(m).__name__}; the QAT plan expects Conv2d or Linear")
        if p.input_owner not in quantizers:
            learned = {"learned": True} if plan.config.ranges == "learned" else {}
            quantizers[p.input_owner] = InputQuantizer(plan.config.momentum, 8, plan.config.sync_ranges, **learned).to(
                next(m.parameters()).device
            )
        m.__dict__[ORIG_CLASS] = type(m)
        m.__class__ = qat_class_for(m, base)  # keeps a parametrized weight's property
        m.weight_bits = p.weight_bits
        m.weight_groups = p.num_groups
        # ranges="fixed": the calibrated start sets them and no training step moves them
        m.updates_range = p.input_owner == name and plan.config.ranges != "fixed"
        m.input_quantizer = quantizers[p.input_owner]
        if p.bn:
            bn = modules[p.bn]
            eps = p.bn_eps if p.bn_eps is not None else float(getattr(bn, "eps", 1e-5))
            m.__dict__["_ncnnqat_folded_bn"] = fold_bn(bn, BNMatch(eps, tuple(p.bn_tail)))
            set_stats_live(bn, plan.config.freeze_bn_after > 0)  # statistics train until frozen
    apply_gemm(modules, plan)
    apply_attention(model, modules, plan)
    apply_training_forms(model, modules, plan)  # SDPA calls only in the export form train in it
    block_fast_paths(model)  # eval under no_grad runs the QAT children, not torch's fused op
    model.__dict__[PLAN_ATTR] = plan
    install_plan_hooks(model)


def plan_and_apply(model: nn.Module, example_input: Any, config: QATConfig) -> QATPlan:
    """:func:`plan_qat` then :func:`apply_plan`; ValueError naming what was found if nothing can
    run in int8. The thresholds are left unset (the caller starts them)."""
    plan = plan_qat(model, example_input, config)
    if not (plan.layers or plan.gemm_layers or plan.attention_layers or plan.sdpa_calls or plan.fused_attention):
        found = "; ".join(f"{n}: {r}" for n, r in plan.float_layers.items()) or "no Conv2d or Linear at all"
        raise ValueError(
            f"{type(unwrap(model)).__name__} has no layer ncnn can run in int8 (Conv2d, depthwise Conv2d, or "
            f"Linear called once per forward on a 2-D, 3-D or 4-D input); found: {found}"
        )
    apply_plan(model, plan)
    return plan


def unprepare(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_plan` in place: the user's classes back, quantizers removed, BNs unfolded.

    Parameters and the BN statistics are untouched (the same objects), so the optimizer keeps
    training them; the quantizer ranges are dropped. A model that is not prepared is returned as is.
    """
    inner = unwrap(model)
    restore_chain_activations(inner)  # the activations QATConfig.chain_activations swapped
    plan = get_plan(inner)
    if plan is None:
        return model
    modules = dict(inner.named_modules())
    for name, p in plan.layers.items():
        m = modules[name]
        base = nn.Conv2d if isinstance(m, nn.Conv2d) else nn.Linear
        restore_class(m, m.__dict__.get(ORIG_CLASS, base))  # a parametrization added under QAT stays
        m._modules.pop("input_quantizer", None)
        for attr in _QAT_ATTRS:
            m.__dict__.pop(attr, None)
        if p.bn:
            unfold_bn(modules[p.bn], inner.training)
    unprepare_gemm(modules, plan)
    unprepare_attention(inner, modules, plan)
    remove_training_forms(inner)
    restore_fast_paths(inner)
    del inner.__dict__[PLAN_ATTR]
    return model


def measured_float_reasons(model: nn.Module, wrong: dict[str, dict[str, float]]) -> dict[str, str]:
    """``{layer: reason}`` of the int8 layers a target computes wrongly (``wrong``: ``{target:
    {layer: isolated cosine}}``, measured by the export preflight) that must be re-planned as float.

    Grouped convs (1 < groups < channels) stay int8 under ``quantize_grouped_convs=True`` (the
    user knows the runtime); under ``"auto"`` the measurement decides them.
    """
    inner = unwrap(model)
    plan = require_plan(inner)
    modules = dict(inner.named_modules())
    forced = set()
    if plan.config.quantize_grouped_convs is True:
        forced = {
            n for n, p in plan.layers.items()
            if p.kind == "ConvolutionDepthWise" and modules[n].groups != modules[n].in_channels
        }
    where: dict[str, list[str]] = {}
    for target, layers in wrong.items():
        for name, cos in layers.items():
            if name not in forced and (name in plan.layers or name in plan.gemm_layers or name in plan.attention_layers
                                       or name in plan.fused_attention):
                where.setdefault(name, []).append(f"{target} (cosine {cos:.3f})")
    return {
        name: f"ncnn's int8 runtime computes it wrongly under default options on {', '.join(w)}; measured at QAT start"
        for name, w in where.items()
    }


def replan_as_float(model: nn.Module, example_input: Any, reasons: dict[str, str]) -> QATPlan:
    """Re-plan the layers ``reasons`` names as float, with those reasons, before any training step.

    The model is unprepared and prepared again with them added to ``skip`` (same Parameters:
    nothing trained is lost); the input thresholds of range owners that stay int8 are kept (a
    calibrated start survives). A Gemm Linear, a MultiheadAttention or a fused unit (its label;
    the reason goes to its parts) is named by its module, an SDPA call by the export's label
    ``"<module>:sdpa<i>"``: ``skip`` names its calling module, so all the model's SDPA calls go
    float (the plan's one unit). Returns the new plan (the old one when ``reasons`` is empty).
    Raises ConfigError for SDPA called by the model itself (no module for ``skip`` to name).
    """
    plan = require_plan(model)
    if not reasons:
        return plan
    caller = {n: n.rsplit(":sdpa", 1)[0] if ":sdpa" in n else None for n in reasons}
    if any(c == "(model)" for c in caller.values()):
        raise ConfigError(f"replan_as_float: {sorted(reasons)} name the model's own SDPA calls; `skip` cannot "
                          "name the model itself", argument="reasons", value=sorted(reasons))
    names = list(dict.fromkeys(c if c is not None else n for n, c in caller.items()))
    kept = {n: {k: v.clone() for k, v in q.state_dict().items()} for n, q in input_quantizers(model).items()}
    unprepare(model)
    config = replace(plan.config, skip=tuple(plan.config.skip) + tuple(n for n in names if n not in plan.config.skip))
    new_plan = plan_and_apply(model, example_input, config)
    for name, q in input_quantizers(model).items():
        if name in kept:
            q.load_state_dict(kept[name], strict=False)
    for n, r in reasons.items():  # the measured reason in place of "kept in float by `skip`"; a fused unit's on its parts
        own = [n if caller[n] is None else f"{caller[n]}:sdpa"]
        keys = unit_parts(plan.fused_attention[n]) if n in plan.fused_attention else own
        why = f"{n}: {r}" if n in plan.fused_attention else r
        new_plan.float_layers.update({k: why for k in keys if k in new_plan.float_layers})
    return new_plan


_require_plan = require_plan  # older name


def __getattr__(name: str) -> Any:
    """Old paths, forwarded for one release: ``prepare_qat`` now lives in :mod:`lightning_ncnnqat.start` (it
    runs the whole QAT start, export preflight included) and ``restore_from_checkpoint`` in
    :mod:`.checkpoint`; both import this module, so they are looked up on first use."""
    if name in ("prepare_qat", "restore_from_checkpoint"):
        import importlib

        home = "lightning_ncnnqat.start" if name == "prepare_qat" else "lightning_ncnnqat.qat.checkpoint"
        return getattr(importlib.import_module(home), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
