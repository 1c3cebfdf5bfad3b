"""The printed results table of ``benchmarks/results.py``, its seed and paired statistics, and
the issue-12 targets under it.

Rows are keyed by label; with several ``--qat-seeds`` the fine-tuned float and QAT rows carry
`` [seed S]`` (:func:`seed_label`), the float model and PTQ rows (deterministic, one float
model) do not.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.results_stats import CI_METHOD, Paired, paired, seed_summary

FT = "fine-tuned float (PyTorch)"
FT_MARGIN = 0.003  # issue 12: QAT int8 >= fine-tuned float - 0.3 points
EPS = 1e-9  # accuracies are k / n: compare without float noise


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def seed_label(base: str, seed: int | None, seeds: list[int] | None) -> str:
    """``base`` with `` [seed S]`` when more than one seed is run."""
    return f"{base} [seed {seed}]" if seeds and len(seeds) > 1 else base


def qat_bases(rows: dict[str, Any]) -> list[str]:
    """``QAT <name> int8`` labels (without the seed suffix), in row order."""
    out: list[str] = []
    for k in rows:
        base = k.split(" [seed ")[0]
        if base.startswith("QAT ") and base.endswith(" int8") and base not in out:
            out.append(base)
    return out


def _per_seed(rows: dict[str, Any], base: str, seeds: list[int]) -> list[tuple[int, Any]]:
    return [(s, rows.get(seed_label(base, s, seeds))) for s in seeds]


def best_ptq(rows: dict[str, Any]) -> tuple[str, Any] | None:
    """The ncnn2table row with the highest x86 top-1 (None when the tool gave none)."""
    ptq = [(k, r) for k, r in rows.items() if k.startswith("ncnn2table") and r.acc.get("x86") is not None]
    return max(ptq, key=lambda kr: kr[1].acc["x86"]) if ptq else None


def targets(rows: dict[str, Any], seeds: list[int] | None = None) -> list[tuple[str, bool | None, str]]:
    """(target, passed or None when it cannot be measured, the figures) for one backbone.

    One seed: QAT int8 vs best real PTQ and vs fine-tuned float - 0.3 points. Several seeds:
    each on the mean over seeds and on the worst seed (PTQ: the lowest QAT seed; fine-tuned
    float: the seed with the lowest QAT - fine-tuned float, both trained with that seed).
    """
    seeds = seeds or [0]
    multi = len(seeds) > 1
    best = best_ptq(rows)
    ptq_name = best[0].split(" + ")[0] if best else ""
    ptq_acc = best[1].acc["x86"] if best else None
    out: list[tuple[str, bool | None, str]] = []
    for base in qat_bases(rows):
        q = {s: (r.acc.get("x86") if r is not None else None) for s, r in _per_seed(rows, base, seeds)}
        ft = {s: (r.acc.get("x86") if r is not None else None) for s, r in _per_seed(rows, FT, seeds)}
        failed = [s for s, v in q.items() if v is None]
        if failed:
            if len(failed) < len(seeds):  # a variant that failed everywhere is reported in its row
                out.append((f"{base} on every seed", None, f"no int8 result for seed(s) {failed}"))
            continue
        qv = list(q.values())
        if not multi:
            v = qv[0]
            if ptq_acc is None:
                out.append((f"{base} >= best real PTQ", None, "no real PTQ result"))
            else:
                out.append((f"{base} >= best real PTQ", v >= ptq_acc - EPS,
                            f"{_pct(v)} vs {_pct(ptq_acc)} ({ptq_name})"))
            f = ft[seeds[0]]
            if f is not None:
                out.append((f"{base} >= fine-tuned float - 0.3 points", v >= f - FT_MARGIN - EPS,
                            f"{_pct(v)} vs {_pct(f)} - 0.30"))
            continue
        mean, worst_s = statistics.fmean(qv), min(q, key=q.get)
        if ptq_acc is None:
            out.append((f"{base} >= best real PTQ", None, "no real PTQ result"))
        else:
            out.append((f"{base} >= best real PTQ, mean of {len(seeds)} seeds", mean >= ptq_acc - EPS,
                        f"{_pct(mean)} vs {_pct(ptq_acc)} ({ptq_name})"))
            out.append((f"{base} >= best real PTQ, worst seed", q[worst_s] >= ptq_acc - EPS,
                        f"seed {worst_s}: {_pct(q[worst_s])} vs {_pct(ptq_acc)}"))
        if all(v is not None for v in ft.values()):
            ft_mean = statistics.fmean(ft.values())
            out.append((f"{base} >= fine-tuned float - 0.3 points, mean of {len(seeds)} seeds",
                        mean >= ft_mean - FT_MARGIN - EPS, f"{_pct(mean)} vs {_pct(ft_mean)} - 0.30"))
            ws = min(seeds, key=lambda s: q[s] - ft[s])
            out.append((f"{base} >= fine-tuned float - 0.3 points, worst seed (vs that seed's fine-tuned float)",
                        q[ws] - ft[ws] >= -FT_MARGIN - EPS, f"seed {ws}: {_pct(q[ws])} vs {_pct(ft[ws])} - 0.30"))
    for k, r in rows.items():
        if k.startswith("calibrate") and r.table_check is not None:
            m = k.split()[1]
            if r.table_check == "no tool table":
                out.append((f"calibrate {m} table == ncnn2table's", None, "the tool wrote no table"))
            else:
                out.append((f"calibrate {m} table == ncnn2table's (byte-identical)", r.table_check == "equal",
                            r.table_check))
    return out


def paired_stats(rows: dict[str, Any], y: np.ndarray, seeds: list[int] | None = None) -> list[Paired]:
    """Per QAT variant: image-by-image against the best real PTQ and against the fine-tuned
    float of the same seed, per seed and (several seeds) on per-image means over seeds."""
    seeds = seeds or [0]
    y = np.asarray(y)
    best = best_ptq(rows)
    out: list[Paired] = []
    ft = [r.pred == y if r is not None and r.pred is not None else None for _, r in _per_seed(rows, FT, seeds)]
    for base in qat_bases(rows):
        q = [r.pred == y if r is not None and r.pred is not None else None for _, r in _per_seed(rows, base, seeds)]
        if any(v is None for v in q):
            continue
        others = []
        if best is not None and best[1].pred is not None:
            others.append((best[0].split(" + ")[0], [best[1].pred == y] * len(seeds)))
        if all(v is not None for v in ft):
            others.append((FT, ft))
        for name, o in others:
            for s, qs, os_ in zip(seeds, q, o):
                out.append(paired(qs, os_, base, name, str(s)))
            if len(seeds) > 1:
                out.append(paired(np.stack(q), np.stack(o), base, name, "mean"))
    return out


def _summary_lines(results: list[dict[str, Any]]) -> list[str]:
    head = ["backbone", "model", "seeds", "mean", "std", "min", "max", "per seed"]
    lines = ["Seeds (the fine-tuning of the fine-tuned float and of QAT, on the same float model; std: sample std):",
             "", "| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for res in results:
        rows, seeds = res["rows"], res["seeds"]
        best = best_ptq(rows)
        if best is not None:
            lines.append(f"| {res['backbone']} | best real PTQ ({best[0].split(' + ')[0]}, deterministic) | - | "
                         f"{_pct(best[1].acc['x86'])} | - | - | - | - |")
        for base in [FT, *qat_bases(rows)]:
            vals = [(s, r.acc.get("x86") if r is not None else None) for s, r in _per_seed(rows, base, seeds)]
            ok = [v for _, v in vals if v is not None]
            if not ok:
                continue
            st = seed_summary(ok)
            per = ", ".join(f"{s}: {_pct(v)}" for s, v in vals)
            lines.append(f"| {res['backbone']} | {base} | {len(ok)} | {_pct(st['mean'])} | {100 * st['std']:.2f} | "
                         f"{_pct(st['min'])} | {_pct(st['max'])} | {per} |")
    return lines


def _paired_lines(results: list[dict[str, Any]]) -> list[str]:
    head = ["backbone", "A", "B", "seed", "A top-1", "B top-1", "A - B (points)", "b (A right, B wrong)",
            "c (A wrong, B right)", "McNemar p (exact)", "95% CI (points)", "CI low vs margin"]
    lines = [f"Paired per-image comparisons on the same test images. b, c: discordant images; p: exact two-sided "
             f"McNemar (binomial on b + c, p = 1/2); CI: {CI_METHOD}. seed `mean`: per-image correctness "
             "averaged over the seeds (no McNemar test; its CI covers the images' variation, not the seeds'). "
             "Margin: 0 against PTQ, -0.30 points against the fine-tuned float (the CI's lower bound above it: "
             "the target holds at 95%).",
             "", "| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for res in results:
        for p in res["paired"]:
            margin = -100 * FT_MARGIN if p.b_name == FT else 0.0
            lo, hi = 100 * p.ci[0], 100 * p.ci[1]
            cells = [res["backbone"], p.a, p.b_name, p.seed, _pct(p.acc_a), _pct(p.acc_b), f"{100 * p.diff:+.2f}",
                     "-" if p.b is None else str(p.b), "-" if p.c is None else str(p.c),
                     "-" if p.p is None else f"{p.p:.3g}", f"[{lo:+.2f}, {hi:+.2f}]",
                     f"{'above' if lo > margin else 'not above'} {margin:+.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(results: list[dict[str, Any]], args: argparse.Namespace, data_note: str, wall_s: float, machine: str,
           have_tools: bool) -> str:
    """The markdown text; each result holds ``backbone``, ``rows``, ``seeds`` and ``paired``."""
    n_arm = args.arm_samples
    arm = list(args.arm_targets)
    seeds_all = results[0]["seeds"] if results else [args.seed]
    multi = len(seeds_all) > 1
    head = ["backbone", "model", "top-1 x86", "vs fine-tuned float", *[f"{t} (first {n_arm})" for t in arm],
            "x86 on the same ARM subset", "table vs ncnn2table", "ms/img x86", "note"]
    seed_note = (f" QAT seeds {seeds_all}: each seed S fine-tunes (fine-tuned float and every QAT variant) after "
                 "Lightning's seed_everything(S + 1), so the batch order and augmentation differ per seed; the "
                 "float model and PTQ are the same for all; 'vs fine-tuned float' is against that seed's "
                 "fine-tuned float (rows without a seed: against the mean over seeds)." if multi else "")
    lines = [
        f"{data_note}; float {args.float_epochs} epochs at lr {args.lr}, then {args.ft_epochs} epoch(s) at lr "
        f"{args.ft_lr} for the fine-tuned float and for every QAT variant; calibration: {args.calib_samples} "
        f"training images (EQ: {args.eq_samples}). {machine}. ncnn ms/img: 1 thread, median of {args.time_runs}. "
        f"Wall time {wall_s / 60:.1f} min. Command: `python benchmarks/{Path(sys.argv[0]).name} "
        f"{' '.join(sys.argv[1:])}`",
        "",
        "QAT variants: QATCallback(start_epoch=0, targets=['x86'], preflight="
        f"{getattr(args, 'preflight', False)}, **kw) on the float model: "
        + "; ".join(f"`{v}`" for v in args.variants)
        + ". ARM columns: that int8 model in the emulated aarch64 ncnn (default options of the CPU profile)."
        + seed_note,
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join("---" for _ in head) + " |",
    ]
    checks = []
    for res in results:
        rows, seeds = res["rows"], res["seeds"]
        fts = {s: r.acc.get("x86") if r is not None else None for s, r in _per_seed(rows, FT, seeds)}
        ft_vals = [v for v in fts.values() if v is not None]
        ft_mean = statistics.fmean(ft_vals) if ft_vals else None
        for k, r in rows.items():
            x86 = r.acc.get("x86")
            seed = int(k.split(" [seed ")[1].rstrip("]")) if " [seed " in k else None
            ref = fts.get(seed) if seed is not None else ft_mean
            delta = "-" if x86 is None or ref is None or k.startswith("fine-tuned") else f"{100 * (x86 - ref):+.2f}"
            cells = [res["backbone"], k, _pct(x86), delta, *[_pct(r.acc.get(t)) for t in arm],
                     _pct(r.acc.get("x86-arm-subset")),
                     r.table_check or "-", "-" if r.ms_per_img is None else f"{r.ms_per_img:.3f}",
                     (r.error or "").replace("|", "/")]
            lines.append("| " + " | ".join(cells) + " |")
        checks.append((res["backbone"], res.get("targets") or targets(rows, seeds)))
    if multi:
        lines += ["", *_summary_lines(results)]
    if any(res.get("paired") for res in results):
        lines += ["", *_paired_lines(results)]
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
