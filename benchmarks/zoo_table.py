"""The zoo's table: one row per model, then its faults and the kinds of fault (``benchmarks/zoo.py``)."""

from __future__ import annotations

import math
import re
from typing import Any


def _fmt_cos(v: Any) -> str:
    if not isinstance(v, (int, float)) or math.isnan(v):
        return "-"
    return f"{v:.6f}"


def fault(row: dict[str, Any]) -> str:
    """One line: what went wrong for this model ('' when nothing)."""
    if row.get("error"):
        return f"[{row.get('stage')}] {row['error']}"
    parts = []
    for f in row.get("failures") or []:
        parts.append(f"[{f.get('step')}]" + (f" layer '{f['layer']}'" if f.get("layer") else "") + f": {f.get('message')}")
    if row.get("flagged"):
        parts.append(f"flagged: {', '.join(row['flagged'])}")
    if row.get("report_json") is False and row.get("stage") in ("floor", "done"):
        parts.append("no report.json")
    return "; ".join(parts)


def fault_kinds(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Models by kind of fault: failed stage/step with the message's names and numbers blanked."""
    kinds: dict[str, list[str]] = {}

    def add(key: str, model: str) -> None:
        key = re.sub(r"'[^']*'", "'*'", key)
        key = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", key)
        kinds.setdefault(key[:120], []).append(model)

    for r in rows:
        if r.get("error"):
            add(f"[{r.get('stage')}] {r['error']}", r["model"])
        for f in r.get("failures") or []:
            add(f"[{f.get('step')}] {f.get('message')}", r["model"])
        if r.get("flagged"):
            kinds.setdefault("[parity] layers flagged (computed wrongly by an ncnn int8 runtime)", []).append(r["model"])
    return kinds


def table(rows: list[dict[str, Any]]) -> str:
    head = ["model", "size", "int8", "float", "grouped i8/fl", "export", "report", "int8 cos", "ARM cos (A53/A76)",
            "fp32 floor", "x86 speed-up", "worst layer (iso cos)", "flagged", "s"]
    lines = []
    for r in rows:
        worst = r.get("worst_layer")
        gc = r.get("grouped_convs")
        arm = [_fmt_cos(e.get("cos")) for t, e in (r.get("targets") or {}).items() if t != "x86"]
        sp = (r.get("timing") or {}).get("speedup")
        lines.append([
            r["model"], str(r.get("size", "")), str(r.get("int8_layers", "-")), str(r.get("float_layers", "-")),
            f"{len(gc['int8'])}/{len(gc['float'])}" if gc else "-",
            "ok" if r.get("export_ok") else ("FAIL" if "export_ok" in r else "-"),
            "yes" if r.get("report_json") else "no",
            _fmt_cos(r.get("int8_cos")), "/".join(arm) or "-", _fmt_cos(r.get("floor_cos")),
            f"{sp:.2f}x" if isinstance(sp, (int, float)) else "-",
            f"{worst[0]} ({worst[1]:.4f})" if worst else "-",
            str(len(r.get("flagged") or [])) if "flagged" in r else "-",
            f"{r.get('seconds', 0):.0f}",
        ])
    w = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w[i]) for i, h in enumerate(head)), "  ".join("-" * n for n in w)]
    out += ["  ".join(x[i].ljust(w[i]) for i in range(len(head))) for x in lines]
    faults = [(r["model"], fault(r)) for r in rows if fault(r)]
    if faults:
        out.append("")
        out.append("faults:")
        out += [f"  {m}: {f}" for m, f in faults]
        out.append("")
        out.append("fault kinds:")
        out += [f"  {len(ms):2d}  {k}  <- {', '.join(ms)}" for k, ms in fault_kinds(rows).items()]
    return "\n".join(out)
