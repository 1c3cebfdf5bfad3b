"""The printed results table of ``benchmarks/results.py`` and the issue-12 targets under it."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def targets(rows: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """(target, passed or None when it cannot be measured, the figures) for one backbone."""
    ft = rows["fine-tuned float (PyTorch)"].acc.get("x86")
    ptq = {k: r.acc["x86"] for k, r in rows.items() if k.startswith("ncnn2table") and r.acc.get("x86") is not None}
    qat = {k: r.acc["x86"] for k, r in rows.items() if k.startswith("QAT") and k.endswith("int8")
           and r.acc.get("x86") is not None}
    out: list[tuple[str, bool | None, str]] = []
    best_ptq = max(ptq.items(), key=lambda kv: kv[1]) if ptq else None
    for k, v in qat.items():
        if best_ptq is None:
            out.append((f"{k} >= best real PTQ", None, "no real PTQ result"))
        else:
            out.append((f"{k} >= best real PTQ", v >= best_ptq[1],
                        f"{_pct(v)} vs {_pct(best_ptq[1])} ({best_ptq[0].split(' + ')[0]})"))
        if ft is not None:
            out.append((f"{k} >= fine-tuned float - 0.3 points", v >= ft - 0.003, f"{_pct(v)} vs {_pct(ft)} - 0.30"))
    for k, r in rows.items():
        if k.startswith("calibrate") and r.table_check is not None:
            m = k.split()[1]
            if r.table_check == "no tool table":
                out.append((f"calibrate {m} table == ncnn2table's", None, "the tool wrote no table"))
            else:
                out.append((f"calibrate {m} table == ncnn2table's (byte-identical)", r.table_check == "equal",
                            r.table_check))
    return out


def render(results: list[dict[str, Any]], args: argparse.Namespace, data_note: str, wall_s: float, machine: str,
           have_tools: bool) -> str:
    n_arm = args.arm_samples
    arm = list(args.arm_targets)
    head = ["backbone", "model", "top-1 x86", "vs fine-tuned float", *[f"{t} (first {n_arm})" for t in arm],
            "x86 on the same ARM subset", "table vs ncnn2table", "ms/img x86", "note"]
    lines = [
        f"{data_note}; float {args.float_epochs} epochs at lr {args.lr}, then {args.ft_epochs} epoch(s) at lr "
        f"{args.ft_lr} for the fine-tuned float and for every QAT variant; calibration: {args.calib_samples} "
        f"training images (EQ: {args.eq_samples}). {machine}. ncnn ms/img: 1 thread, median of {args.time_runs}. "
        f"Wall time {wall_s / 60:.1f} min. Command: `python benchmarks/results.py {' '.join(sys.argv[1:])}`",
        "",
        "QAT variants: QATCallback(start_epoch=0, targets=['x86'], preflight="
        f"{getattr(args, 'preflight', False)}, **kw) on the float model: "
        + "; ".join(f"`{v}`" for v in args.variants)
        + ". ARM columns: that int8 model in the emulated aarch64 ncnn (default options of the CPU profile).",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join("---" for _ in head) + " |",
    ]
    checks = []
    for res in results:
        rows = res["rows"]
        ft = rows["fine-tuned float (PyTorch)"].acc.get("x86")
        for k, r in rows.items():
            x86 = r.acc.get("x86")
            delta = "-" if x86 is None or ft is None or k.startswith("fine-tuned") else f"{100 * (x86 - ft):+.2f}"
            cells = [res["backbone"], k, _pct(x86), delta, *[_pct(r.acc.get(t)) for t in arm],
                     _pct(r.acc.get("x86-arm-subset")),
                     r.table_check or "-", "-" if r.ms_per_img is None else f"{r.ms_per_img:.3f}",
                     (r.error or "").replace("|", "/")]
            lines.append("| " + " | ".join(cells) + " |")
        checks.append((res["backbone"], targets(rows)))
    lines.append("")
    lines.append("Targets (issue 12):")
    for b, ts in checks:
        for name, ok, fig in ts:
            mark = "n/a " if ok is None else ("PASS" if ok else "FAIL")
            lines.append(f"  {mark} {b}: {name}: {fig}")
    if not have_tools:
        lines.append("  (ncnn's C++ tools absent: no real PTQ rows; set NCNN_TOOLS)")
    lines.append("No backbone here has grouped convs (1 < groups < channels): MobileNetV2's are depthwise, "
                 "ResNet-18 has none, so the int8 speed is with every conv in int8.")
    return "\n".join(lines)
