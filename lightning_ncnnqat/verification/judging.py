"""This machine's measurements judged: policy's rules applied to the report's per-layer checks
and per-output figures, the float32 floor measured where a rule needs it, the findings rendered.

The rules are :mod:`lightning_ncnnqat.policy`'s; the rendering is
:func:`lightning_ncnnqat.verification.verdicts.render`. An emulated target's figures are judged
by :mod:`lightning_ncnnqat.verification.runtime_checks` with the same rules.
"""

from __future__ import annotations

from lightning_ncnnqat import policy
from lightning_ncnnqat.ncnn.isolated import HOST
from lightning_ncnnqat.policy import Finding
from lightning_ncnnqat.verification.output_floor import Float32Floor, output_verdict
from lightning_ncnnqat.verification.report import ExportReport
from lightning_ncnnqat.verification.verdicts import render


def host_findings(report: ExportReport, floor: Float32Floor) -> list[Finding]:
    """The findings on this machine's layer checks and outputs, in the order the report lists
    them: layers (approximations, steps off, wrong, not judged), then per output its cosine
    (against the bar and the float32 ``floor``, measured here if needed) and its top-1."""
    found = policy.approximation_notes(HOST, report.layer_checks)
    found += policy.host_layer_findings(report.layer_checks)
    for i, o in enumerate(report.outputs):
        a = o.int8_vs_qat
        where = f" (output {o.blob}, {o.torch})" if len(report.outputs) > 1 else ""
        found += output_verdict(report, floor, i, a.cosine, where)[0]
        found += policy.judge_top1(a, o.float32_floor, where)  # the floor output_verdict recorded
    return found


def judge(report: ExportReport, floor: Float32Floor) -> None:
    """Render this machine's findings into ``report`` (:func:`host_findings`) and record the
    floor, where measured, in its ``runtime`` entry."""
    render(report, host_findings(report, floor))
    if report.float32_floor is not None:
        report.runtime[HOST]["float32_floor"] = report.float32_floor
