"""A finding: one verdict of a policy rule on one measured figure, as plain data.

The rules in :mod:`lightning_ncnnqat.policy` RETURN findings; they never write a report. One
place renders them (:func:`lightning_ncnnqat.verification.verdicts.render`): a ``"note"`` goes to
``report.json``'s ``notes`` (a fact that explains a figure), a ``"warning"`` to its ``warnings``
(a problem), and the printed summary shows both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Severity = Literal["note", "warning"]
NOTE: Severity = "note"
WARNING: Severity = "warning"


@dataclass(frozen=True, kw_only=True)
class Finding:
    """One verdict.

    Attributes:
        severity: ``"note"`` (explains a figure) or ``"warning"`` (a problem).
        layer: the torch layer it is about, or None (a whole output, a file, a target).
        code: a stable short name of the rule that fired (``"output_below_bar"``), for code and tests.
        message: the sentence the report and the summary show.
        value: the measured figure the rule judged (a cosine, an error), or None (a fact, not a figure).
        bar: the threshold it was judged against, or None.
    """

    severity: Severity
    layer: str | None = None
    code: str
    message: str
    value: float | None = None
    bar: float | None = None

    def __post_init__(self) -> None:
        if self.severity not in (NOTE, WARNING):
            raise ValueError(f"Finding.severity must be 'note' or 'warning', got {self.severity!r}")
        if not self.code or not self.message:
            raise ValueError(f"a Finding needs a code and a message, got code={self.code!r}, message={self.message!r}")


def note(code: str, message: str, *, layer: str | None = None, value: float | None = None,
         bar: float | None = None) -> Finding:
    """A ``"note"`` finding."""
    return Finding(severity=NOTE, layer=layer, code=code, message=message, value=value, bar=bar)


def warning(code: str, message: str, *, layer: str | None = None, value: float | None = None,
            bar: float | None = None) -> Finding:
    """A ``"warning"`` finding."""
    return Finding(severity=WARNING, layer=layer, code=code, message=message, value=value, bar=bar)
