"""Model surgery for QAT: decide which layers ncnn runs in int8, fold BatchNorm, attach quantizers.

Usable without a Trainer::

    plan = prepare_qat(model, example_input)        # fold BN, attach quantizers, print nothing
    print(plan.summary())
    ... train ...
    infos = quantized_layers(model)                  # scales for the ncnn table
    float_model = folded_float_model(model)          # what the converters see

Decisions come from the data flow of one traced forward (``graph.py``) and are recorded in a
:class:`QATPlan`, a plain dict in checkpoints, so a fresh model can be rebuilt exactly
(:func:`restore_from_checkpoint`) without tracing again.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import ops
from .config import QATConfig
from .graph import DataFlow, trace_dataflow
from .modules import QAT_CLASSES, FoldedBatchNorm, InputQuantizer, QATConv2d, QATLinear

PLAN_VERSION = 1
_FOLDABLE_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)
_QAT_LAYERS = (QATConv2d, QATLinear)


@dataclass
class LayerPlan:
    """How one layer is quantized."""

    kind: str  # ncnn layer type: Convolution | ConvolutionDepthWise | InnerProduct
    weight_bits: int
    num_groups: int  # number of weight scales
    input_owner: str  # the layer whose quantizer (shared by all readers of the tensor) moves the range
    bn: str | None = None  # BatchNorm folded into this layer


@dataclass
class QATPlan:
    """Every decision QAT made for a model: quantized layers, float layers and why, BN folds."""

    layers: dict[str, LayerPlan]
    float_layers: dict[str, str]
    config: QATConfig
    version: int = PLAN_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "layers": {k: asdict(v) for k, v in self.layers.items()},
            "float_layers": dict(self.float_layers),
            "config": self.config.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QATPlan:
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"unsupported QAT plan version {d.get('version')!r} (expected {PLAN_VERSION})")
        return cls(
            layers={k: LayerPlan(**v) for k, v in d["layers"].items()},
            float_layers=dict(d["float_layers"]),
            config=QATConfig.from_dict(d["config"]),
        )

    def summary(self) -> str:
        """A human-readable table of what runs in int8, what stays in float and why."""
        lines = [f"ncnn QAT: {len(self.layers)} layers in int8, {len(self.float_layers)} kept in float"]
        w = max([len(n) for n in self.layers] + [len(n) for n in self.float_layers] + [5])
        lines.append(f"  {'layer':<{w}}  {'ncnn type':<20} {'w-bits':>6} {'scales':>6}  notes")
        for name, p in self.layers.items():
            notes = []
            if p.bn:
                notes.append(f"folded {p.bn}")
            if p.input_owner != name:
                notes.append(f"input range shared with {p.input_owner}")
            lines.append(f"  {name:<{w}}  {p.kind:<20} {p.weight_bits:>6} {p.num_groups:>6}  {'; '.join(notes)}")
        for name, reason in self.float_layers.items():
            lines.append(f"  {name:<{w}}  {'float':<20} {'-':>6} {'-':>6}  {reason}")
        return "\n".join(lines)


@dataclass
class QuantLayerInfo:
    """What the export needs of one quantized layer (all tensors float32, cpu, detached)."""

    name: str
    kind: str
    weight_bits: int
    num_groups: int
    weight: Tensor
    bias: Tensor | None
    weight_scales: Tensor
    input_scale: float
    input_owner: str
    input_absmax: float = field(default=0.0)


def _is_plain(m: nn.Module, base: type[nn.Module]) -> bool:
    """An instance of ``base`` (or a subclass) that keeps ``base.forward``."""
    return isinstance(m, base) and type(m).forward is base.forward


def _classify(name: str, m: nn.Module, flow: DataFlow, config: QATConfig) -> tuple[LayerPlan | None, str | None]:
    """(plan, None) for a layer ncnn runs in int8, (None, reason) for a weight layer kept in float,
    (None, None) for modules that are not weight layers."""
    is_conv = _is_plain(m, nn.Conv2d)
    is_linear = _is_plain(m, nn.Linear)
    if not (is_conv or is_linear):
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            what = type(m).__name__
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                return None, f"{what} overrides forward(); only nn.Conv2d/nn.Linear semantics are simulated"
            return None, f"{what} has no int8 kernel in ncnn"
        return None, None
    if any(fnmatch.fnmatchcase(name, pat) for pat in config.skip):
        return None, "kept in float by `skip`"
    calls = flow.module_calls(name)
    if not calls:
        return None, "not called in the traced forward"
    if len(calls) > 1:
        return None, f"called {len(calls)} times per forward (shared weights); kept in float"
    shape = calls[0].input_shapes[0] if calls[0].input_shapes else ()
    if is_linear:
        if len(shape) != 2:
            return None, f"input of rank {len(shape)}: ncnn runs only 2-D InnerProduct in int8"
        return LayerPlan("InnerProduct", 8, m.out_features, name), None
    assert isinstance(m, nn.Conv2d)
    if len(shape) != 4:
        return None, f"input of rank {len(shape)}: expected a batched NCHW tensor"
    if m.groups == 1:
        six = config.six_bit_3x3 and m.kernel_size == (3, 3) and m.stride == (1, 1) and m.dilation == (1, 1)
        return LayerPlan("Convolution", 6 if six else 8, m.out_channels, name), None
    if m.groups != m.in_channels and not config.quantize_grouped_convs:
        return None, (
            f"grouped conv (groups={m.groups}, {m.in_channels} channels): ncnn's default int8 path "
            "computes it wrongly; set quantize_grouped_convs=True for runtimes where it works"
        )
    return LayerPlan("ConvolutionDepthWise", 8, m.groups, name), None


def _find_bn(name: str, m: nn.Module, flow: DataFlow, modules: dict[str, nn.Module]) -> str | None:
    """The BatchNorm that alone consumes this layer's output, and consumes nothing else."""
    (call,) = flow.module_calls(name)
    if len(call.outputs) != 1:
        return None
    readers = flow.consumers.get(call.outputs[0], [])
    if len(readers) != 1:
        return None
    reader = flow.nodes[readers[0]]
    bn = reader.module
    if type(bn) not in _FOLDABLE_BN or len(flow.module_calls(reader.target)) != 1:
        return None
    if reader.inputs != call.outputs or not bn.track_running_stats or bn.running_var is None:
        return None
    out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
    if bn.num_features != out:
        return None
    return reader.target


def plan_qat(model: nn.Module, example_input: Any, config: QATConfig | None = None) -> QATPlan:
    """Trace one forward of ``model`` on ``example_input`` and decide what QAT does to it."""
    config = config or QATConfig()
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    flow = trace_dataflow(model, *inputs)
    modules = dict(model.named_modules())
    layers: dict[str, LayerPlan] = {}
    floats: dict[str, str] = {}
    for name, m in modules.items():
        plan, reason = _classify(name, m, flow, config)
        if plan is not None:
            layers[name] = plan
        elif reason is not None:
            floats[name] = reason
    # Readers of one tensor share one range, owned by the first reader in call order.
    owner_of_value: dict[int, str] = {}
    for name in sorted(layers, key=lambda n: flow.calls[n][0]):
        (call,) = flow.module_calls(name)
        v = call.inputs[0]
        layers[name].input_owner = owner_of_value.setdefault(v, name)
        layers[name].bn = _find_bn(name, modules[name], flow, modules)
    return QATPlan(layers, floats, config)


def apply_plan(model: nn.Module, plan: QATPlan) -> None:
    """Convert ``model`` in place as ``plan`` says (idempotent on an already prepared model)."""
    if get_plan(model) is not None:
        return
    modules = dict(model.named_modules())
    missing = [n for n in list(plan.layers) + [p.bn for p in plan.layers.values() if p.bn] if n not in modules]
    if missing:
        raise ValueError(f"the QAT plan names modules this model does not have: {missing}")
    quantizers: dict[str, InputQuantizer] = {}
    for name, p in plan.layers.items():
        m = modules[name]
        base = next((b for b in QAT_CLASSES if isinstance(m, b)), None)
        if base is None:
            raise TypeError(f"layer '{name}' is {type(m).__name__}; the QAT plan expects Conv2d or Linear")
        if p.input_owner not in quantizers:
            quantizers[p.input_owner] = InputQuantizer(plan.config.momentum, 8, plan.config.sync_ranges).to(
                m.weight.device
            )
        m.__class__ = QAT_CLASSES[base]
        m.weight_bits = p.weight_bits
        m.weight_groups = p.num_groups
        m.updates_range = p.input_owner == name
        m.input_quantizer = quantizers[p.input_owner]
        if p.bn:
            m.__dict__["_ncnnqat_folded_bn"] = FoldedBatchNorm.fold(modules[p.bn])
    model.__dict__["_ncnnqat_plan"] = plan


def prepare_qat(model: nn.Module, example_input: Any, config: QATConfig | None = None) -> QATPlan:
    """Plan and apply QAT to ``model`` in place; raise if ncnn could run nothing in int8."""
    plan = plan_qat(model, example_input, config)
    if not plan.layers:
        found = "; ".join(f"{n}: {r}" for n, r in plan.float_layers.items()) or "no Conv2d or Linear at all"
        raise ValueError(
            f"{type(model).__name__} has no layer ncnn can run in int8 (Conv2d, depthwise Conv2d, or "
            f"Linear on 2-D input called once per forward); found: {found}"
        )
    apply_plan(model, plan)
    return plan


def get_plan(model: nn.Module) -> QATPlan | None:
    """The plan applied to ``model``, or None if it is not prepared for QAT."""
    return model.__dict__.get("_ncnnqat_plan")


def _require_plan(model: nn.Module) -> QATPlan:
    plan = get_plan(model)
    if plan is None:
        raise ValueError(f"{type(model).__name__} is not prepared for QAT (call prepare_qat or use QATCallback)")
    return plan


def input_quantizers(model: nn.Module) -> dict[str, InputQuantizer]:
    """The input range of each range-owning layer, by layer name."""
    plan = _require_plan(model)
    modules = dict(model.named_modules())
    return {n: modules[n].input_quantizer for n, p in plan.layers.items() if p.input_owner == n}


def check_ranges(model: nn.Module, require_initialized: bool = False) -> None:
    """Raise naming the layer if a range or a folded weight is NaN/inf (or a range uninitialised).

    Ranges ignore non-finite activations by design, so a diverged run shows up in the weights.
    """
    plan = _require_plan(model)
    modules = dict(model.named_modules())
    for name in plan.layers:
        with torch.no_grad():
            w, b = modules[name].folded_weight_bias()
            finite = bool(torch.isfinite(w).all()) and (b is None or bool(torch.isfinite(b).all()))
        if not finite:
            raise RuntimeError(
                f"layer '{name}': its (BN-folded) weight or bias holds NaN/inf; training diverged (check the loss)"
            )
    for name, q in input_quantizers(model).items():
        r = float(q.running_absmax.detach().float().cpu().item())
        if r != r or r in (float("inf"), float("-inf")):
            raise RuntimeError(f"layer '{name}': its input range became {r}; training diverged (check the loss)")
        if require_initialized and r < 0:
            raise RuntimeError(
                f"layer '{name}': its input range was never initialised (no QAT training step reached it)"
            )


def quantized_layers(model: nn.Module) -> list[QuantLayerInfo]:
    """Folded float weights and the ncnn scales of every quantized layer, in module order."""
    plan = _require_plan(model)
    check_ranges(model, require_initialized=True)
    infos = []
    for name, m in model.named_modules():
        if name not in plan.layers:
            continue
        p = plan.layers[name]
        with torch.no_grad():
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
    return list(_require_plan(model).float_layers.items())


def _deepcopy_without_trainer(model: nn.Module) -> nn.Module:
    memo: dict[int, Any] = {}
    for attr in ("_trainer", "_fabric"):
        obj = model.__dict__.get(attr)
        if obj is not None:
            memo[id(obj)] = None
    return copy.deepcopy(model, memo)


def folded_float_model(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with BN folded into quantized layers and all quantizers removed.

    Quantized layers become plain nn.Conv2d / nn.Linear holding the folded float weights (the
    converters quantize them with the table's scales to exactly the QAT forward's values);
    folded BatchNorms become nn.Identity. Module names are unchanged.
    """
    plan = _require_plan(model)
    out = _deepcopy_without_trainer(model)
    out.__dict__.pop("_ncnnqat_plan", None)
    modules = dict(out.named_modules())
    with torch.no_grad():
        for name, p in plan.layers.items():
            m = modules[name]
            w, b = m.folded_weight_bias()
            w, b = w.detach().clone(), None if b is None else b.detach().clone()
            m.__class__ = nn.Conv2d if isinstance(m, nn.Conv2d) else nn.Linear
            del m._modules["input_quantizer"]
            for attr in ("weight_bits", "weight_groups", "updates_range", "_ncnnqat_folded_bn"):
                m.__dict__.pop(attr, None)
            m.weight = nn.Parameter(w)
            m.bias = None if b is None else nn.Parameter(b)
        for p in plan.layers.values():
            if p.bn:
                parent_name, _, child = p.bn.rpartition(".")
                setattr(modules[parent_name] if parent_name else out, child, nn.Identity())
    out.eval()
    for param in out.parameters():
        param.requires_grad_(False)
    return out


_PREFIXES = ("module.", "_forward_module.", "_orig_mod.")


def strip_wrapper_prefixes(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove ``module.`` (DataParallel/DDP) and similar wrapper prefixes from checkpoint keys."""
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


def restore_from_checkpoint(model: nn.Module, checkpoint: dict[str, Any]) -> nn.Module:
    """Apply the QAT plan stored in ``checkpoint`` to a fresh float ``model`` and load its weights."""
    if "ncnnqat" not in checkpoint:
        raise ValueError("the checkpoint holds no QAT state (key 'ncnnqat'): was it saved after QAT started?")
    apply_plan(model, QATPlan.from_dict(checkpoint["ncnnqat"]))
    state = checkpoint.get("state_dict", checkpoint)
    model.load_state_dict(strip_wrapper_prefixes(state))
    return model
