"""The export's int8 vs float speed: timed side by side on this machine and judged (issue 20).

The export times its float (``model.ncnn.*``) and int8 (``model.int8.*``) models here, in ONE
child process, alternating (:func:`speed.plan.time_models`), on the first held sample, with
ncnn's default options except ``num_threads``. With one thread the verdict is on process CPU
time (a shared machine's preemption inflates wall time, not CPU time); with several it is on
wall time. The figure is judged like every other figure of the report
(:func:`policy.speed.judge_speed` of the median per-round ratio): int8 slower than float is a
warning that says so plainly, a tie a note. Emulated targets are never timed: their times say nothing of a device's speed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_ncnnqat.ncnn.isolated import HOST, NcnnRuntimeError
from lightning_ncnnqat.policy import speed as policy
from lightning_ncnnqat.ncnn.machine import machine_info, machine_line
from lightning_ncnnqat.ncnn.targets.profile import BOARD_SECTION, board_speed_lines
from lightning_ncnnqat.ncnn.timing import ModelToTime, paired_speedup, time_models
from lightning_ncnnqat.verification.verdicts import render

__all__ = ["split_timing", "time_export", "speed_lines"]


def split_timing(checks: Any) -> tuple[Any, dict[str, Any]]:
    """``(checks without timing, {"runs", "threads"})`` of an export's
    :class:`~lightning_ncnnqat.export.steps.Checks`: the runtime checks skip their own timing and
    :func:`time_export` times both models interleaved instead (a full export only)."""
    if not checks.full:
        return checks, {"runs": 0, "threads": 1}
    return checks.without_timing(), {"runs": int(checks.timing_runs or 0), "threads": checks.timing_threads}


def _models(d: Path, report: Any, feeds: dict[str, str], threads: int | None) -> list[ModelToTime]:
    io = report.io
    inputs = {i["blob"]: list(i["shape"]) for i in io.get("inputs", [])}
    outputs = [o["blob"] for o in io.get("outputs", [])]
    opts = {} if threads is None else {"num_threads": int(threads)}
    return [ModelToTime(tag, str(d / f"model.{ext}.param"), str(d / f"model.{ext}.bin"), inputs, outputs, opts, feeds)
            for tag, ext in (("float", "ncnn"), ("int8", "int8"))]


def time_export(report: Any, export_dir: str | Path, held: Sequence[Any], runs: int, threads: int | None = 1) -> None:
    """Time the export's float and int8 models interleaved on the first held sample and judge the
    figure into ``report.timing`` / ``notes`` / ``warnings``. ``runs`` 0 times nothing. A timing
    that fails is a note (the export's files stand); it never raises."""
    d = Path(export_dir)
    if runs <= 0 or not (d / "model.int8.param").is_file() or not report.io:
        return
    try:
        with tempfile.TemporaryDirectory(prefix="ncnnqat_feeds_") as tmp:
            feeds = {}
            for i, t in zip(report.io.get("inputs", []), held):
                arr = t[:1].detach().cpu().numpy()[0]
                feeds[i["blob"]] = str(Path(tmp) / f"{len(feeds)}.npy")
                np.save(feeds[i["blob"]], arr.astype(np.int32) if arr.dtype.kind in "iub" else arr.astype(np.float32))
            t = time_models(_models(d, report, feeds, threads), runs=runs)
    except (NcnnRuntimeError, OSError, ValueError) as e:  # the files stand; the figure is missing, said so
        render(report, [policy.speed_not_measured(f"{type(e).__name__}: {str(e)[:200]}")])
        return
    clock = "cpu" if threads == 1 else "wall"  # one thread: CPU time is immune to preemption
    f, q = t["float"], t["int8"]
    f_ms, q_ms = f.ms(clock), q.ms(clock)
    speedup = paired_speedup(f, q, clock)  # per round, each int8 run against the float run beside it
    verdict = policy.speed_verdict(speedup, f_ms - q_ms) if runs >= policy.SPEED_MIN_JUDGED_RUNS else "not judged"
    m = machine_info()
    sizes = tuple((d / f"model.{ext}.bin").stat().st_size if (d / f"model.{ext}.bin").is_file() else None
                  for ext in ("ncnn", "int8"))
    report.timing = {
        "target": HOST, "clock": clock, "verdict": verdict,
        "float32_ms": f_ms, "int8_ms": q_ms, "speedup": speedup,
        "float32_wall_ms": [f.median_ms, f.min_ms, f.max_ms], "int8_wall_ms": [q.median_ms, q.min_ms, q.max_ms],
        "float32_cpu_ms": [f.cpu_median_ms, f.cpu_min_ms, f.cpu_max_ms],
        "int8_cpu_ms": [q.cpu_median_ms, q.cpu_min_ms, q.cpu_max_ms],
        "threads": int(threads) if threads is not None else 0, "runs": runs,
        "input_shapes": [list(i["shape"]) for i in report.io.get("inputs", [])],
        "load_average_1min": m["load_1min"], "cpu_count": m["cpus"], "machine": machine_line(m),
        "float32_bin_bytes": sizes[0], "int8_bin_bytes": sizes[1],
    }
    figures = (f"{clock} time, {report.timing['threads'] or 'default'} thread(s), medians of {runs} interleaved runs: "
               f"float {f_ms:.3f} ms, int8 {q_ms:.3f} ms; int8 {speedup:.2f}x float's speed {policy.PER_ROUND}, the median "
               f"of per-round ratios; {machine_line(m)}")
    render(report, policy.judge_speed(f"{HOST} (this machine)", speedup, figures, runs, f_ms - q_ms, sizes))


def speed_lines(report: dict[str, Any]) -> list[str]:
    """DEPLOY.md's "Speed" section: int8 vs float per measured target, plainly when int8 does
    not pay, and the targets not timed."""
    t = report.get("timing") or {}
    out = ["## Speed", ""]
    if not t.get("float32_ms") or not t.get("int8_ms"):
        out.append("Not measured by the export: `timing_runs=0`, or the timing failed (report.json's notes say which).")
    else:
        target = t.get("target", HOST)
        line = (f"- **{target}** ({t.get('machine', 'this machine')}): float {t['float32_ms']:.3f} ms, int8 "
                f"{t['int8_ms']:.3f} ms per inference (medians; int8 {t['speedup']:.2f}x float's speed {policy.PER_ROUND}, "
                f"the median of per-round ratios; {t.get('clock', 'wall')} time, "
                f"{t.get('threads') or 'default'} thread(s), ncnn's default options).")
        verdict = t.get("verdict")
        if verdict == "not judged":
            line += f" Not judged: {t.get('runs')} run(s)."
        elif verdict == "slower":
            line += f" **int8 does not pay here: it is slower than float; deploy model.ncnn.* on {target}.**"
        elif verdict == "tie":
            fb, qb = t.get("float32_bin_bytes"), t.get("int8_bin_bytes")
            if policy.size_pays(fb, qb) is False:
                line += (f" **int8 pays neither in speed nor much in size here ({policy.sizes_text(fb, qb)}): deploy "
                         f"the float model (model.ncnn.*) on {target}.**")
            else:
                sizes = policy.sizes_text(fb, qb)
                line += " int8 ties with float here: it pays in size only" + (f" ({sizes})." if sizes else ".")
        out.append(line)
    others = [k for k, v in (report.get("runtime") or {}).items() if isinstance(v, dict) and v.get("emulated")]
    if others:
        out.append(f"- {', '.join(others)}: checked emulated, not timed (emulated times are not speeds); time "
                   "int8 against float on the device before choosing: `python board_profile.py EXPORT_DIR -o board.json` there "
                   "(lightning_ncnnqat/ncnn/targets/board_profile.py runs alone with ncnn + numpy), then `python -m "
                   "lightning_ncnnqat.ncnn.targets attach EXPORT_DIR board.json` here; give it to QAT as "
                   "`QATConfig(board_profile='board.json')` so the layers that lose there stay float (docs/targets.md).")
    if report.get("board_profiles"):  # ExportConfig(board_profile=...): the board's figures, judged
        out += ["", BOARD_SECTION[0], *board_speed_lines(report["board_profiles"]), BOARD_SECTION[1]]
    return out + [""]
