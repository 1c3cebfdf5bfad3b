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
On an emulated target the better of the default-options and strict (approximations off) cosines
is judged so; a default-options cosine below :data:`MIN_DEFAULT_OPTIONS_COSINE` and not at the
floor is a warning of its own (users deploy with the default options).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from lightning_ncnnqat.qat.modules import QAT_CLASSES, InputQuantizer
from lightning_ncnnqat.policy import (  # noqa: F401  (re-exported: the rules judge_output applies)
    FLOOR_FACTOR,
    FLOOR_MARGIN,
    MIN_DEFAULT_OPTIONS_COSINE,
    MIN_OUTPUT_COSINE,
    at_floor,
    output_failing,
)
from lightning_ncnnqat.qat.prepared import deepcopy_model
from lightning_ncnnqat.qat.wrappers import unwrap
from lightning_ncnnqat.conversion.model_io import ModelIO, torch_outputs
from lightning_ncnnqat.verification.parity import cosine
from lightning_ncnnqat.verification.report import ExportReport

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


_STRICT = "with fp16 storage/arithmetic and packed kernels off"


def judge_output(
    report: ExportReport, floor: Float32Floor, i: int, cos: float, where: str, on: str = "", strict: float | None = None
) -> dict | None:
    """Warn, or note, for output ``i`` whose int8 cosine with the QAT model is ``cos``.

    ``strict``: the same with the runtime's approximations off (emulated targets). The int8
    model is judged on the better of the two (``best``) against the bar and the float32 floor: a
    note at the floor, else a warning. When only the default options are lower, ``cos`` is also
    judged on its own: below :data:`MIN_DEFAULT_OPTIONS_COSINE` and not at the floor, a warning
    naming both figures. Nothing when neither applies. The floor is measured (once) when needed;
    only for this machine (``on`` empty) it is recorded in ``report.outputs[i].float32_floor`` and
    ``report.float32_floor`` (an emulated target's goes to its ``runtime`` entry, by the caller).
    ``where`` names the output (empty for single-output models), ``on`` the target (``"on
    arm64-a53, "``). Returns ``{"float32_floor", "at_float32_floor"}`` (the latter of ``best``),
    plus ``"default_options_ok"`` when ``strict`` is given; None when nothing was judged.
    """
    best = cos if strict is None else max(cos, strict)
    gap = strict is not None and strict > cos  # only the default options are lower
    if best >= MIN_OUTPUT_COSINE and not (gap and cos < MIN_DEFAULT_OPTIONS_COSINE):
        return None
    floors = floor.cosines()
    f = None if floors is None else floors[i]
    if on == "" and f is not None and i < len(report.outputs):
        report.outputs[i].float32_floor = f
        report.float32_floor = min(o.float32_floor for o in report.outputs if o.float32_floor is not None)
    if floor.error is not None and not any("float32 floor not measured" in n for n in report.notes):
        report.notes.append(f"float32 floor not measured (the QAT model does not run in float64: {floor.error})")
    best_ok = best >= MIN_OUTPUT_COSINE or (f is not None and at_floor(best, f))
    default_ok = not gap or cos >= MIN_DEFAULT_OPTIONS_COSINE or (f is not None and at_floor(cos, f))
    figure = f"{best:.6f}{where}" + (f" {_STRICT}" if gap else "")
    err8 = 1.0 - best
    if best < MIN_OUTPUT_COSINE and best_ok and f is not None:
        tail = f"; under default options it is {cos:.6f}: the runtime's own approximation" if gap and default_ok else ""
        report.notes.append(
            f"{on}int8 output cosine with the QAT model is {figure}, below {MIN_OUTPUT_COSINE} but at the float32 "
            f"floor: the QAT model itself reaches only cosine {f:.6f} between float32 and float64 arithmetic on the "
            f"held batch (int8 error 1-cos {err8:.3g} <= {FLOOR_FACTOR:g} x the floor's {1.0 - f:.3g}); the model's "
            f"own conditioning, not a quantization error{tail}"
        )
    elif best < MIN_OUTPUT_COSINE:
        why = "" if f is None else (
            f", beyond the QAT model's float32 floor {f:.6f} (int8 error 1-cos {err8:.3g} > {FLOOR_FACTOR:g} x the "
            f"floor's {1.0 - f:.3g})"
        )
        tail = f"; {cos:.6f} under default options" if gap else ""
        report.warnings.append(f"{on}int8 output cosine with the QAT model is only {figure}{why}{tail}")
    if best_ok and not default_ok:
        floor_txt = "" if f is None else f" and not at the float32 floor {f:.6f}"
        report.warnings.append(
            f"{on}int8 output cosine with the QAT model is only {cos:.6f}{where} under default options, {best:.6f} "
            f"{_STRICT}: below {MIN_DEFAULT_OPTIONS_COSINE}{floor_txt}. The int8 model is right, but the runtime's "
            "default options lose too much on this model: deploy with those options off (net.opt), or see the "
            "per-layer checks for the layer"
        )
    verdict: dict = {"float32_floor": f, "at_float32_floor": None if f is None else at_floor(best, f)}
    if strict is not None:
        verdict["default_options_ok"] = default_ok
    return verdict
