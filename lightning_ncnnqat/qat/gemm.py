"""Linear layers ncnn runs as an int8 ``Gemm``: planned, swapped in, read back for the export.

pnnx converts ``nn.Linear`` on a 3-D/4-D input into a ``Gemm`` between two Reshapes (the input
as ``[rows, K]`` rows; 2-D input stays an ``InnerProduct``, which the table quantizes). ncnn's
int8 Gemm takes no table row: each input row is quantized at run time with its own scale, the
weight with one scale for the whole tensor (``ops.fake_quantize_gemm``). So such a layer gets no
input range and no folded BatchNorm: it is recorded in ``QATPlan.gemm_layers`` (name -> input
rank) and swapped to :class:`~lightning_ncnnqat.qat.modules.QATGemmLinear`.

A Linear on a 3-D/4-D input stays float (with the reason in the plan) when its weight is
computed (a parametrization or a pre-hook: the class swap would drop it), when a BatchNorm-like
module reads its output (a converter may fold it into the Gemm's weights, which would then not be
the ones QAT trained), or when each sample holds one row (:func:`classify_gemm`). Everything else about it (``skip``, shared weights, eval-only layers,
dead layers) is decided as for the other layers, in ``prepare.plan_qat``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_ncnnqat.errors import DivergedError
from lightning_ncnnqat.ops.reference import finite_absmax, scale_from_absmax
from lightning_ncnnqat.qat.bn_fold import is_bn_like
from lightning_ncnnqat.qat.computed_weights import describe as describe_computed
from lightning_ncnnqat.qat.computed_weights import restore_class
from lightning_ncnnqat.qat.graph import DataFlow
from lightning_ncnnqat.qat.modules import ORIG_CLASS, QATGemmLinear
from lightning_ncnnqat.qat.plan import LayerPlan, QATPlan, require_plan
from lightning_ncnnqat.qat.wrappers import unwrap

#: The ncnn layer type, and the input ranks pnnx writes as one (2-D input is an InnerProduct).
GEMM_KIND = "Gemm"
GEMM_RANKS = (3, 4)


def classify_gemm(name: str, shape: tuple[int, ...]) -> tuple[LayerPlan | None, str | None]:
    """A Linear on a 3-D/4-D input of traced ``shape``: ``(provisional Gemm entry, None)``, moved
    out of the layers by :func:`split_gemm`; or ``(None, reason)`` when each sample holds ONE row
    (``prod(shape[1:-1]) == 1``, e.g. a class token ``(B, 1, C)``): pnnx 20261020 then writes an
    InnerProduct or a Gemm depending on how the graph reached it (checked: an input ``(1, 1, C)``
    gives an InnerProduct, a slice ``t[:, :1]`` a Gemm), and the two quantize differently."""
    rows = 1
    for d in shape[1:-1]:
        rows *= int(d)
    if rows == 1:
        return None, (
            f"Linear on a {len(shape)}-D input of one row per sample {tuple(shape)}: the converter writes it as an "
            "InnerProduct or a Gemm depending on the graph, which quantize differently; kept in float"
        )
    return LayerPlan(GEMM_KIND, 8, 1, name), None


def _float_reason(name: str, m: nn.Module, flow: DataFlow) -> str | None:
    how = describe_computed(m)
    if how:
        return f"Linear run as ncnn Gemm with a computed weight ({how}): QAT's int8 Gemm reads a plain weight only"
    (call,) = flow.module_calls(name)
    for out in call.outputs:
        for i in flow.consumers.get(out, []):
            node = flow.nodes[i]
            if node.module is not None and is_bn_like(node.module):
                return (
                    f"Linear run as ncnn Gemm feeds {type(node.module).__name__} '{node.target}': a converter may fold "
                    "it into the Gemm's weights, which QAT's int8 Gemm does not simulate"
                )
    return None


def split_gemm(
    layers: dict[str, LayerPlan], floats: dict[str, str], modules: dict[str, nn.Module], flow: DataFlow
) -> dict[str, int]:
    """Move the ``Gemm`` entries out of ``layers`` (in place): ``{name: input rank}`` of those QAT
    runs as int8 Gemm; the others go to ``floats`` with their reason."""
    gemm: dict[str, int] = {}
    for name in [n for n, p in layers.items() if p.kind == GEMM_KIND]:
        del layers[name]
        why = _float_reason(name, modules[name], flow)
        if why is not None:
            floats[name] = why
            continue
        (call,) = flow.module_calls(name)
        gemm[name] = len(call.input_shapes[0])
    return gemm


def apply_gemm(modules: dict[str, nn.Module], plan: QATPlan) -> None:
    """Swap every planned Gemm layer to :class:`QATGemmLinear` (same Parameters); TypeError naming
    a layer that is not an ``nn.Linear``."""
    for name in plan.gemm_layers:
        m = modules[name]
        if not isinstance(m, nn.Linear):
            raise TypeError(f"layer '{name}' is {type(m).__name__}; the QAT plan runs it as a Gemm (an nn.Linear)")
        m.__dict__[ORIG_CLASS] = type(m)
        m.__class__ = QATGemmLinear


def unprepare_gemm(modules: dict[str, nn.Module], plan: QATPlan) -> None:
    """Give every planned Gemm layer its class from before QAT back."""
    for name in plan.gemm_layers:
        m = modules[name]
        restore_class(m, m.__dict__.pop(ORIG_CLASS, nn.Linear))


def float_gemm(modules: dict[str, nn.Module], plan: QATPlan) -> None:
    """In a float copy of the model: every planned Gemm layer as a plain ``nn.Linear`` (what the
    converters see; its weight is the one QAT trained, unchanged)."""
    for name in plan.gemm_layers:
        m = modules[name]
        m.__class__ = nn.Linear
        m.__dict__.pop(ORIG_CLASS, None)


@dataclass
class GemmLayerInfo:
    """What the export needs of one int8 Gemm layer (float32 CPU tensors): its weight ``[N, K]``,
    bias ``[N]`` or None, and the weight scale the QAT forward used (``127 / absmax``)."""

    name: str
    kind: str
    weight: Tensor
    bias: Tensor | None
    b_scale: float
    input_rank: int


def gemm_layers(model: nn.Module) -> list[GemmLayerInfo]:
    """The planned int8 Gemm layers of a prepared model, in module order (empty for none).

    Raises ValueError if the model is not prepared; DivergedError naming the layer if its weight
    or bias holds NaN or inf."""
    model = unwrap(model)
    plan = require_plan(model)
    out = []
    for name, m in model.named_modules():
        if name not in plan.gemm_layers:
            continue
        with torch.no_grad():
            w = m.weight.detach().float().cpu().contiguous()
            b = None if m.bias is None else m.bias.detach().float().cpu().contiguous()
        if not torch.isfinite(w).all() or (b is not None and not torch.isfinite(b).all()):
            raise DivergedError(f"layer '{name}': its weight or bias holds NaN/inf; training diverged", layer=name)
        scale = float(scale_from_absmax(finite_absmax(w), 8))
        out.append(GemmLayerInfo(name, GEMM_KIND, w, b, scale, plan.gemm_layers[name]))
    return out
