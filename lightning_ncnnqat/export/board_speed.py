"""The export's ``board_profile`` step: a board's int8 vs float figures, judged, in the report.

``ExportConfig(board_profile="board.json")`` names a profile that ``python -m
lightning_ncnnqat.ncnn.targets profile`` wrote on the board. After the int8 model is written,
:func:`board_speed` checks that the profile timed this architecture (the float ``model.ncnn.param``'s
layers and input shape, :func:`ncnn.targets.profile.check_architecture`), copies it to
``EXPORT_DIR/profiles/`` (where ``attach`` keeps them), adds its summary to ``report.board_profiles``
with a verdict per thread count (:func:`policy.speed.speed_verdict`, the rule that judges this
machine's timing), and renders :func:`policy.speed.judge_speed`'s findings into the notes and
warnings: int8 slower than float on the board is a warning that says so plainly. DEPLOY.md's
"Speed" section lists the board rows (``verification.speed.speed_lines``).

The profile may have timed another int8 model of this architecture (an earlier export; the QAT
start may have kept layers float for that board since): the figures are then that model's, and a
note says so (``same_int8_model``: the sha256 of ``model.int8.param`` against the profile's).
An emulated profile (tests only) shows no times.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from lightning_ncnnqat.errors import ExportError
from lightning_ncnnqat.ncnn.targets.profile import ProfileError, check_architecture, load_profile
from lightning_ncnnqat.policy.findings import note
from lightning_ncnnqat.policy import speed as policy
from lightning_ncnnqat.verification.verdicts import render

__all__ = ["board_speed"]


def _same_int8_model(prof: Any, export_dir: Path) -> bool | None:
    """Whether the profile timed this export's ``model.int8.param`` (None: it recorded no sha256)."""
    want = (prof.models.get("int8") or {}).get("sha256")
    if not want or not (export_dir / "model.int8.param").is_file():
        return None
    return hashlib.sha256((export_dir / "model.int8.param").read_bytes()).hexdigest() == want


def board_speed(report: Any, export_dir: str | Path, profile: str | Path) -> dict:
    """The ``board_profile`` step (module docstring) on an export's :class:`ExportReport`;
    returns the summary added to ``report.board_profiles``.

    Raises:
        ExportError: step ``board_profile``: the profile is malformed, or it timed another
            architecture or input shape than this export (the file named).
    """
    d = Path(export_dir)
    try:
        prof = load_profile(profile)
        inputs = {i["blob"]: [int(x) for x in i["shape"]] for i in report.io.get("inputs", [])}
        check_architecture(prof, (d / "model.ncnn.param").read_text(encoding="utf-8"), "this export", inputs)
    except (ProfileError, OSError) as e:
        raise ExportError("board_profile", None, str(e)) from e
    (d / "profiles").mkdir(exist_ok=True)
    copy = d / "profiles" / Path(profile).name
    if copy.resolve() != Path(profile).resolve():
        copy.write_bytes(Path(profile).read_bytes())
    summary = prof.speed_summary()
    summary["same_int8_model"] = same = _same_int8_model(prof, d)
    findings = []
    for n, row in summary.get("threads", {}).items():
        diff = row["float_ms"] - row["int8_ms"]
        row["verdict"] = policy.speed_verdict(row["speedup"], diff) if row["speedup"] else None
        figures = (f"measured there, ncnn's default options, {n} thread(s), medians of {prof.runs or '?'} runs: float "
                   f"{row['float_ms']:.3f} ms, int8 {row['int8_ms']:.3f} ms ({row['speedup']:.2f}x); profile {prof.path}")
        findings += policy.judge_speed(f"the board {prof.describe()}", row["speedup"], figures, prof.runs, diff)
    if prof.emulated:
        findings.append(note("board_profile_emulated", f"board profile {prof.path} was measured under emulation: its "
                             "times are not speeds and are not shown"))  # fmt: skip
    elif same is False:
        findings.append(note("board_profile_other_model", f"board profile {prof.path} timed another int8 model of this "
                             "architecture (model.int8.param differs: other layers int8, or other feature masks); "
                             "its figures are that model's: profile this export on the board to confirm"))  # fmt: skip
    if any(r.get("verdict") == "slower" for r in summary.get("threads", {}).values()):
        findings.append(note("board_profile_for_qat", f"QATConfig(board_profile={str(prof.path)!r}) makes the QAT start "
                             "keep float the int8 layers that lose on that board (docs/targets.md)"))  # fmt: skip
    render(report, findings)
    report.board_profiles.append(summary)
    return summary
