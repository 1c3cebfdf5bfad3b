"""The QAT plan: every decision QAT made for a model, as data (a plain dict in checkpoints).

A plan rebuilds a fresh model exactly (``prepare.apply_plan``) without tracing it again, so it
records what tracing found: the quantized layers, the BatchNorms folded into them (with the eps
and the activation tail the numeric check found), the layers kept in float and why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

from lightning_ncnnqat.qat.config import QATConfig
from lightning_ncnnqat.qat.wrappers import unwrap

PLAN_VERSION = 1


@dataclass
class LayerPlan:
    """How one layer is quantized."""

    kind: str  # ncnn layer type: Convolution | ConvolutionDepthWise | InnerProduct
    weight_bits: int
    num_groups: int  # number of weight scales
    input_owner: str  # the layer whose quantizer (shared by all readers of the tensor) moves the range
    bn: str | None = None  # BatchNorm-like module folded into this layer
    bn_eps: float | None = None  # its eps (None: the module's own ``eps``)
    bn_tail: list[str] = field(default_factory=list)  # its submodules still run after the fold (e.g. act)


@dataclass
class QATPlan:
    """Every decision QAT made for a model: quantized layers, float layers and why, BN folds, notes."""

    layers: dict[str, LayerPlan]
    float_layers: dict[str, str]
    config: QATConfig
    version: int = PLAN_VERSION
    notes: dict[str, str] = field(default_factory=dict)  # other modules worth a line (name -> what)
    # Linear layers on a 3-D/4-D input, run as ncnn's int8 Gemm (name -> input rank): no input
    # range, no table row; activations quantized per row at run time (qat/gemm.py)
    gemm_layers: dict[str, int] = field(default_factory=dict)
    # ncnn's dynamic-int8 attention (qat/attention_plan.py): nn.MultiheadAttention modules (name ->
    # "MultiHeadAttention") and the modules whose F.scaled_dot_product_attention calls run as
    # ncnn's int8 SDPA (innermost calling module -> calls per forward; "" is the model itself)
    attention_layers: dict[str, str] = field(default_factory=dict)
    sdpa_calls: dict[str, int] = field(default_factory=dict)
    # Linear layers the converter fuses into ONE MultiHeadAttention, trained as it (qat/fused_attention.py):
    # unit label -> {"q"|"k"|"v"|"out": [module, row0, row1], "heads", "scale", "ncnn", "mask"}
    fused_attention: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "version": self.version,
            "layers": {k: asdict(v) for k, v in self.layers.items()},
            "float_layers": dict(self.float_layers),
            "config": self.config.to_dict(),
            "notes": dict(self.notes),
        }
        if self.gemm_layers:  # plans without Gemm layers keep their earlier form
            d["gemm_layers"] = dict(self.gemm_layers)
        for key in ("attention_layers", "sdpa_calls", "fused_attention"):  # likewise: only when there are some
            if getattr(self, key):
                d[key] = dict(getattr(self, key))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QATPlan:
        """Rebuild a plan from :meth:`to_dict`'s output (also older dicts without BN eps/tail or notes)."""
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"unsupported QAT plan version {d.get('version')!r} (expected {PLAN_VERSION})")
        return cls(
            layers={k: LayerPlan(**{**v, "bn_tail": list(v.get("bn_tail", []))}) for k, v in d["layers"].items()},
            float_layers=dict(d["float_layers"]),
            config=QATConfig.from_dict(d["config"]),
            notes=dict(d.get("notes", {})),
            gemm_layers={k: int(v) for k, v in d.get("gemm_layers", {}).items()},
            attention_layers={k: str(v) for k, v in d.get("attention_layers", {}).items()},
            sdpa_calls={k: int(v) for k, v in d.get("sdpa_calls", {}).items()},
            fused_attention={k: dict(v) for k, v in d.get("fused_attention", {}).items()},
        )

    def summary(self) -> str:
        """A human-readable table of what runs in int8, what stays in float and why."""
        n8 = len(self.layers) + len(self.gemm_layers) + len(self.attention_layers) + sum(self.sdpa_calls.values()) \
            + len(self.fused_attention)
        lines = [f"ncnn QAT: {n8} layers in int8, {len(self.float_layers)} kept in float"]
        names = [*self.layers, *self.gemm_layers, *self.attention_layers, *self.sdpa_calls, *self.fused_attention,
                 *self.float_layers, *self.notes]
        w = max([len(n) for n in names] + [5])
        lines.append(f"  {'layer':<{w}}  {'ncnn type':<20} {'w-bits':>6} {'scales':>6}  notes")
        for name, p in self.layers.items():
            notes = []
            if p.bn:
                notes.append(f"folded {p.bn}" + (f" (then runs its {', '.join(p.bn_tail)})" if p.bn_tail else ""))
            if p.input_owner != name:
                notes.append(f"input range shared with {p.input_owner}")
            lines.append(f"  {name:<{w}}  {p.kind:<20} {p.weight_bits:>6} {p.num_groups:>6}  {'; '.join(notes)}")
        for name, rank in self.gemm_layers.items():
            what = f"{rank}-D input: weight per tensor, input per row at run time"
            lines.append(f"  {name:<{w}}  {'Gemm':<20} {8:>6} {1:>6}  {what}")
        for name, kind in self.attention_layers.items():
            lines.append(f"  {name:<{w}}  {kind:<20} {8:>6} {'rows':>6}  activations per row/tensor at run time")
        for name, u in self.fused_attention.items():
            parts = ", ".join(dict.fromkeys(u[r][0] for r in ("q", "k", "v", "out")))
            lines.append(f"  {name:<{w}}  {'MultiHeadAttention':<20} {8:>6} {'rows':>6}  converter-fused unit of {parts}")
        for name, n in self.sdpa_calls.items():
            lines.append(f"  {name or '(model)':<{w}}  {'SDPA':<20} {'-':>6} {'-':>6}  {n} call(s), dynamic int8 at run time")
        for name, reason in self.float_layers.items():
            lines.append(f"  {name:<{w}}  {'float':<20} {'-':>6} {'-':>6}  {reason}")
        for name, note in self.notes.items():
            lines.append(f"  {name:<{w}}  {'note':<20} {'-':>6} {'-':>6}  {note}")
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


PLAN_ATTR = "_ncnnqat_plan"


def get_plan(model: Any) -> QATPlan | None:
    """The plan applied to ``model`` (wrappers unwrapped), or None if it is not prepared for QAT."""
    return unwrap(model).__dict__.get(PLAN_ATTR)


def require_plan(model: Any) -> QATPlan:
    """The applied plan; ValueError naming the model class if it is not prepared."""
    plan = get_plan(model)
    if plan is None:
        raise ValueError(f"{type(model).__name__} is not prepared for QAT (call prepare_qat or use QATCallback)")
    return plan
