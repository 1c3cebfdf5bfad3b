"""The output-cosine rule of the export: int8 vs QAT judged against the model's own float32 floor.

A deep or badly conditioned QAT model moves its outputs by a lot when only its float32 rounding
changes: a rounding difference pushes an activation across an int8 rounding boundary, the step
propagates and grows. ncnn int8 accumulates exactly in int32 and so differs from the PyTorch QAT
model (float32 accumulation) by exactly such rounding differences; it cannot be expected to agree
with the QAT model better than the QAT model agrees with itself computed more exactly. That is the
*float32 floor*: per output blob, the cosine of the QAT model in float32 vs the same model with its
convolutions, matmuls and float ops in float64 (quantization unchanged), on the held batch.

The ncnn float32 model vs the PyTorch float model is *not* that floor: it has no int8 steps to flip
(resnext50_32x4d: cosine 0.9999999998 there while its QAT floor is 0.99636).

Rule (:func:`at_floor`): an output misses the absolute bar when its int8 cosine is below
:data:`MIN_OUTPUT_COSINE`; it is still *at the floor* when ``1 - cos_int8 <= FLOOR_FACTOR *
(1 - cos_floor) + FLOOR_MARGIN``: then a note says so, otherwise a warning. The floor is measured
only for outputs that miss the absolute bar, once per export (it does not depend on the target).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..modules import QAT_CLASSES, InputQuantizer
from ..prepared import deepcopy_model
from ..wrappers import unwrap
from .model_io import ModelIO, torch_outputs
from .parity import cosine
from .report import ExportReport

#: The absolute bar: an int8 output at least this close to the QAT model never needs the floor.
MIN_OUTPUT_COSINE = 0.9999
#: int8's error ``1 - cos`` may be this many times the floor's. At-floor ratios measured on the zoo
#: (strict options, x86/A53, 20 models): up to 1.74 (mobilenet_v3_large); resnext50_32x4d 1.06,
#: regnet_x_400mf 0.96; ncnn's extra float32 rounding (requantize multiply, bias add) is a second
#: perturbation of the same size, hence ~2x at most. A wrong scale or weight is orders beyond 3x.
FLOOR_FACTOR = 3.0
#: Added to the allowance so that a floor of exactly 1.0 does not turn the rule into "no error at all".
FLOOR_MARGIN = 1e-6


def at_floor(cos: float, floor: float) -> bool:
    """Whether an int8 cosine ``cos`` is as close to the QAT model as float32 can be (``floor``)."""
    return (1.0 - cos) <= FLOOR_FACTOR * (1.0 - floor) + FLOOR_MARGIN


def float64_outputs(qmodel: nn.Module, io: ModelIO, held: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Outputs of a float64 copy of ``qmodel`` on ``held``: ``[N, K]`` float64 per output blob.

    Quantization is unchanged: every fake-quantized layer uses its float32 fake-quantized (folded)
    weight and bias, widened; every input quantizer rounds its input to float32 first (the fake-quant
    ops take float32 only) and quantizes as in float32. Every convolution, matmul and float op runs
    in float64. ``qmodel`` itself is never changed (a CPU copy is used).
    """
    model = deepcopy_model(unwrap(qmodel)).cpu().eval()
    with torch.no_grad():
        frozen = {m: m.quantized_weight_bias() for m in model.modules() if isinstance(m, tuple(QAT_CLASSES.values()))}
        model.double()
        for m, (w, b) in frozen.items():
            wb = (w.double(), None if b is None else b.double())
            m.quantized_weight_bias = lambda _wb=wb: _wb  # instance attribute: the forward's weights
        for m in model.modules():
            if isinstance(m, InputQuantizer):
                for name, buf in m.named_buffers(recurse=False):
                    setattr(m, name, buf.float())
                m.register_forward_pre_hook(lambda _m, args: (args[0].float(), *args[1:]))
                m.register_forward_hook(lambda _m, args, out: out.double())
    return torch_outputs(model, io, [t.double() if t.is_floating_point() else t for t in held])


class Float32Floor:
    """The QAT model's float32 floor per output blob, measured on first use only."""

    def __init__(self, qmodel: nn.Module, io: ModelIO, held: Sequence[torch.Tensor], q_ref: list[np.ndarray]) -> None:
        self._args = (qmodel, io, held)
        self._q_ref = q_ref
        self._cos: list[float] | None = None
        self.error: str | None = None

    @property
    def measured(self) -> bool:
        """Whether the float64 run was made (or tried)."""
        return self._cos is not None or self.error is not None

    def cosines(self) -> list[float] | None:
        """Per output, cosine(QAT float32, QAT float64); None if the float64 copy cannot run."""
        if self._cos is None and self.error is None:
            try:
                got = float64_outputs(*self._args)
                self._cos = [cosine(r, g) for r, g in zip(self._q_ref, got)]
            except Exception as e:  # noqa: BLE001 - a model that cannot run in float64 keeps the absolute rule
                self.error = f"{type(e).__name__}: {e}"
        return self._cos


def judge_output(
    report: ExportReport, floor: Float32Floor, i: int, cos: float, where: str, on: str = "", strict: float | None = None
) -> dict | None:
    """Warn, or note, for output ``i`` whose int8 cosine with the QAT model is ``cos``.

    ``strict``: the same with the runtime's approximations off (emulated targets): the better of
    the two is judged, as a gap only the default options have is the runtime's own approximation
    (noted by ``runtime_checks._strict_parity``). Nothing when the judged cosine is at least
    ``MIN_OUTPUT_COSINE``. Otherwise the floor is measured (once) and recorded in
    ``report.outputs[i].float32_floor`` and ``report.float32_floor``; at the floor: a note, else a
    warning. ``where`` names the output (empty for single-output models), ``on`` the target
    (``"on arm64-a53, "``; empty for this machine). Returns ``{"float32_floor", "at_float32_floor"}``
    (None: nothing to judge).
    """
    best = cos if strict is None else max(cos, strict)
    if best >= MIN_OUTPUT_COSINE:
        return None
    floors = floor.cosines()
    f = None if floors is None else floors[i]
    if f is not None and i < len(report.outputs):
        report.outputs[i].float32_floor = f
        report.float32_floor = min(o.float32_floor for o in report.outputs if o.float32_floor is not None)
    if floor.error is not None and not any("float32 floor not measured" in n for n in report.notes):
        report.notes.append(f"float32 floor not measured (the QAT model does not run in float64: {floor.error})")
    value = f"{cos:.6f}{where}"
    if strict is not None and strict > cos:
        value += f" ({strict:.6f} with fp16 storage/arithmetic and packed kernels off)"
    err8 = 1.0 - best
    ok = f is not None and at_floor(best, f)
    if ok:
        report.notes.append(
            f"{on}int8 output cosine with the QAT model is {value}, below {MIN_OUTPUT_COSINE} but at the float32 "
            f"floor: the QAT model itself reaches only cosine {f:.6f} between float32 and float64 arithmetic on the "
            f"held batch (int8 error 1-cos {err8:.3g} <= {FLOOR_FACTOR:g} x the floor's {1.0 - f:.3g}); the model's "
            "own conditioning, not a quantization error"
        )
    else:
        why = "" if f is None else (
            f", beyond the QAT model's float32 floor {f:.6f} (int8 error 1-cos {err8:.3g} > {FLOOR_FACTOR:g} x the "
            f"floor's {1.0 - f:.3g})"
        )
        report.warnings.append(f"{on}int8 output cosine with the QAT model is only {value}{why}")
    return {"float32_floor": f, "at_float32_floor": None if f is None else ok}
