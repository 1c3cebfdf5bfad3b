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
from lightning_ncnnqat import policy
from lightning_ncnnqat.policy import (  # noqa: F401  (re-exported: the rules judge_output applies)
    FLOOR_FACTOR,
    FLOOR_MARGIN,
    MIN_DEFAULT_OPTIONS_COSINE,
    MIN_OUTPUT_COSINE,
    Finding,
    at_floor,
    output_failing,
)
from lightning_ncnnqat.qat.prepared import deepcopy_model
from lightning_ncnnqat.qat.wrappers import unwrap
from lightning_ncnnqat.conversion.model_io import ModelIO, torch_outputs
from lightning_ncnnqat.verification.parity import cosine
from lightning_ncnnqat.verification.report import ExportReport
from lightning_ncnnqat.verification.verdicts import render

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
            except Exception as e:  # noqa: BLE001 - the user's model run in float64 may raise anything: a note, the bar alone
                self.error = f"{type(e).__name__}: {e}"
        return self._cos


def output_verdict(
    report: ExportReport, floor: Float32Floor, i: int, cos: float, where: str, on: str = "", strict: float | None = None
) -> tuple[list[Finding], dict | None]:
    """The findings and the recorded verdict of output ``i``, whose int8 cosine with the QAT model
    is ``cos`` (``strict``: the same with the runtime's approximations off, emulated targets).

    The rule is :func:`lightning_ncnnqat.policy.judge_output`; this measures the float32 floor it
    needs (once per export, only when :func:`~lightning_ncnnqat.policy.needs_floor` says so) and
    records it for this machine (``on`` empty) in ``report.outputs[i].float32_floor`` and
    ``report.float32_floor`` (an emulated target's goes to its ``runtime`` entry, by the caller).
    ``where`` names the output (empty for single-output models), ``on`` the target (``"on
    arm64-a53, "``). Returns the findings (not yet rendered) and ``{"float32_floor",
    "at_float32_floor"}`` (plus ``"default_options_ok"`` when ``strict`` is given), or ``([], None)``
    when nothing was judged.
    """
    if not policy.needs_floor(cos, strict):
        return [], None
    floors = floor.cosines()
    f = None if floors is None else floors[i]
    if on == "" and f is not None and i < len(report.outputs):
        report.outputs[i].float32_floor = f
        report.float32_floor = min(o.float32_floor for o in report.outputs if o.float32_floor is not None)
    found = [] if floor.error is None else [policy.floor_not_measured(floor.error)]
    verdict = policy.judge_output(cos, f, where=where, on=on, strict=strict)
    if verdict is None:  # not reached: needs_floor held above
        return found, None
    return [*found, *verdict.findings], verdict.as_dict(strict is not None)


def judge_output(
    report: ExportReport, floor: Float32Floor, i: int, cos: float, where: str, on: str = "", strict: float | None = None
) -> dict | None:
    """:func:`output_verdict` with its findings rendered into ``report`` at once (notes and
    warnings); returns the verdict (None when nothing was judged)."""
    found, verdict = output_verdict(report, floor, i, cos, where, on, strict)
    render(report, found)
    return verdict
