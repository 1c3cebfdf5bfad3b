"""Rendering: the one place findings become the report's notes and warnings.

The rules that decide live in :mod:`lightning_ncnnqat.policy` and return
:class:`~lightning_ncnnqat.policy.Finding` objects; :func:`render` files each one into
``report.json`` (a note into ``notes``, a warning into ``warnings``; ``report.findings`` keeps
the structured form for code and tests), and :meth:`ExportReport.summary` prints both lists.
"""

from __future__ import annotations

from collections.abc import Iterable

from lightning_ncnnqat.policy import NOTE, Finding
from lightning_ncnnqat.verification.report import ExportReport

#: Codes said once per report however often their rule fires (the float64 run for the floor
#: fails the same way for every output and target).
ONCE = frozenset({"float32_floor_not_measured"})


def render(report: ExportReport, findings: Iterable[Finding]) -> None:
    """Append each finding's message to ``report.notes`` (a note) or ``report.warnings`` (a
    warning), in order, and the finding itself to ``report.findings``; a code in :data:`ONCE`
    already rendered is skipped."""
    for f in findings:
        if f.code in ONCE and any(g.code == f.code for g in report.findings):
            continue
        report.findings.append(f)
        (report.notes if f.severity == NOTE else report.warnings).append(f.message)
