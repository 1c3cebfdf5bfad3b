"""Merge ``benchmarks/results.py`` runs made with different ``--qat-seeds`` into one table.

Each run's ``--out`` holds ``results.json`` (rows, per backbone) and ``preds_<backbone>.npz``
(per-image predictions). Runs on the same float model share the float and PTQ rows
(deterministic); their seed rows (`` [seed S]``) are pooled, so seeds run in two sittings give
the same mean / worst-seed targets and paired statistics as one run with all the seeds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.results_ptq import ModelResult

SEED_TAG = " [seed "


def _rows(run: dict[str, Any], preds: dict[str, np.ndarray]) -> dict[str, ModelResult]:
    return {k: ModelResult(**v, pred=preds.get(k)) for k, v in run["rows"].items()}


def load_runs(dirs: list[str | Path]) -> list[dict[str, Any]]:
    """Per backbone (in the first run's order): ``backbone``, ``rows``, ``seeds``, ``y``, ``timing``.

    Raises ValueError when a seed appears in two runs, a run was made with one seed only (its
    rows carry no seed label), the runs' test labels differ, or their shared float / PTQ
    accuracies differ (not the same float model and settings).
    """
    merged: dict[str, dict[str, Any]] = {}
    for d in map(Path, dirs):
        for run in json.loads((d / "results.json").read_text()):
            b = run["backbone"]
            seeds = run.get("seeds") or []
            if len(seeds) < 2:
                raise ValueError(f"{d}: {b} was run with seeds {seeds}; merge needs runs with --qat-seeds of 2+ seeds")
            with np.load(d / f"preds_{b}.npz") as z:
                preds = {k: z[k] for k in z.files}
            rows = _rows(run, preds)
            if b not in merged:
                merged[b] = {"backbone": b, "rows": rows, "seeds": list(seeds), "y": preds["y"],
                             "timing": dict(run["timing"])}
                continue
            m = merged[b]
            if not np.array_equal(m["y"], preds["y"]):
                raise ValueError(f"{d}: {b}'s test labels differ from the first run's")
            dup = sorted(set(seeds) & set(m["seeds"]))
            if dup:
                raise ValueError(f"{d}: {b} seed(s) {dup} already in an earlier run")
            for k, r in rows.items():
                if SEED_TAG in k:
                    m["rows"][k] = r
                elif k in m["rows"] and m["rows"][k].acc.get("x86") != r.acc.get("x86"):
                    raise ValueError(f"{d}: {b} row {k!r} is {r.acc.get('x86')} here, {m['rows'][k].acc.get('x86')} "
                                     "in the first run (not the same float model / settings)")
            m["seeds"] += list(seeds)
            m["timing"].update(run["timing"])
    for m in merged.values():  # shared rows first, then seed by seed (as one run prints them)
        shared = {k: r for k, r in m["rows"].items() if SEED_TAG not in k}
        per_seed = {k: r for s in m["seeds"] for k, r in m["rows"].items() if k.endswith(f"{SEED_TAG}{s}]")}
        m["rows"] = {**shared, **per_seed}
    return list(merged.values())

