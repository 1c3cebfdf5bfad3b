"""ncnn's real post-training calibration and the package's ``calibrate``, side by side.

For ``benchmarks/results.py``: the trained float model's float ncnn model (pnnx, BN folded), the
real ``ncnn2table`` (KL / ACIQ / EQ) and ``ncnn2int8`` from ``../shared/ncnn-tools`` (or
``$NCNN_TOOLS``) run by the package's one driver (``lightning_ncnnqat.calibration.ncnn_tools``),
the package's ``calibrate`` on the same inputs with its table compared with the tool's, and
accuracy (and per-image predictions) of every model in the ncnn runtime (a child process per
run, ncnn's default options for the target).
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_ncnnqat import calibrate
from lightning_ncnnqat.calibration.api import _folded_copy
from lightning_ncnnqat.calibration.ncnn_tools import find_tools, run_ncnn2int8, run_ncnn2table
from lightning_ncnnqat.ncnn.isolated import NcnnRuntimeError, run_ncnn
from lightning_ncnnqat.conversion.pnnx import convert_with_pnnx
from lightning_ncnnqat.ncnn.table import parse_table

ROOT = Path(__file__).resolve().parents[1]
TOOLS = Path(os.environ.get("NCNN_TOOLS") or ROOT.parent / "shared" / "ncnn-tools")


def tools_present() -> bool:
    return find_tools(TOOLS) is not None


def calibrate_kwargs() -> dict[str, Any]:
    """``activations="ncnn"`` where this checkout's ``calibrate`` has it (activations from the
    float ncnn model, so tables can equal ncnn2table's byte for byte), else nothing."""
    return {"activations": "ncnn"} if "activations" in inspect.signature(calibrate).parameters else {}


@dataclass
class ModelResult:
    """One model's accuracy (fraction; None: not run) and what went wrong, if anything."""

    acc: dict[str, float | None] = field(default_factory=dict)  # target -> top-1 on its samples
    error: str | None = None
    table_check: str | None = None  # calibrate vs ncnn2table
    seconds: float | None = None  # calibration time
    ms_per_img: float | None = None
    pred: np.ndarray | None = field(default=None, repr=False)  # x86 predicted class per validation image

    def as_json(self) -> dict[str, Any]:
        """The fields without the predictions (those go to ``preds_<backbone>.npz``)."""
        return {k: v for k, v in vars(self).items() if k != "pred"}


def float_ncnn(net: nn.Module, example: torch.Tensor, work: Path) -> tuple[Path, Path]:
    """``work/float.param/.bin``: the BN-folded float model through pnnx (float32 weights)."""
    work.mkdir(parents=True, exist_ok=True)
    folded, _ = _folded_copy(net, example[:1], None)
    pn = convert_with_pnnx(folded, example[:1])
    (work / "float.param").write_text(pn.param_text)
    (work / "float.bin").write_bytes(pn.bin_bytes)
    return work / "float.param", work / "float.bin"


def ncnn_accuracy(param: Path, bin_: Path, x: np.ndarray, y: np.ndarray, target: str = "x86",
                  time_runs: int = 0) -> tuple[float, float | None, np.ndarray]:
    """Top-1 of the ncnn model on ``x`` ``[N, C, H, W]`` (one sample per run, default options,
    1 thread), ms per image (median of ``time_runs``; None without) and the predicted classes
    ``[N]``. Raises NcnnRuntimeError."""
    res = run_ncnn(param, bin_, {"in0": x}, ["out0"], {"num_threads": 1}, target=target,
                   time_runs=time_runs, timeout_s=3600)
    logits = res.outputs["out0"].reshape(len(x), -1)
    pred = logits.argmax(1)
    return float((pred == y).mean()), res.info.get("time_ms"), pred


def compare_tables(ours: Path, tool: Path) -> str:
    """``equal`` when byte-identical; else whether the weight rows are identical, how many
    input rows differ as printed and their max relative difference."""
    a, b = ours.read_text(), tool.read_text()
    if a == b:
        return "equal"
    wa, ia = parse_table(a)
    wb, ib = parse_table(b)
    if set(ia) != set(ib):
        return f"different layers ({len(set(ia) ^ set(ib))} differ)"
    diff = [k for k in ib if ia[k] != ib[k]]
    rel = max(abs(ia[k] - ib[k]) / abs(ib[k]) for k in ib)
    w = "weights equal" if wa == wb else "weights DIFFER"
    return f"{w}, {len(diff)}/{len(ib)} input rows differ, max rel {rel:.2g}"


def run_ptq(net: nn.Module, x_cal: torch.Tensor, x_val: np.ndarray, y_val: np.ndarray, work: Path,
            methods: list[str], eq_samples: int, tool_timeout_s: float, log: Any = print) -> dict[str, ModelResult]:
    """Per method: ``tool-<m>`` (ncnn2table + ncnn2int8, through ``calibration.ncnn_tools``) and
    ``calibrate-<m>`` (the package's table, written as ncnn2table prints it, + ncnn2int8), each
    with its x86 int8 accuracy and predictions."""
    out: dict[str, ModelResult] = {}
    param, bin_ = work / "float.param", work / "float.bin"
    tools = find_tools(TOOLS)
    cal_kw = calibrate_kwargs()
    for m in methods:
        # EQ rebuilds every int8 layer ~100 times per sample: the tool and calibrate both get
        # only the first `eq_samples` inputs (the tool's EQ would read its first 50)
        xs = x_cal[:eq_samples] if m == "eq" else x_cal
        tool_table = work / f"tool_{m}.table"
        r = out[f"tool-{m}"] = ModelResult()
        if tools is None:
            tool_table.unlink(missing_ok=True)
            r.error = f"ncnn's tools are not at {TOOLS} (set NCNN_TOOLS)"
        else:
            t0 = time.time()
            run = run_ncnn2table(tools, param, bin_, xs, m, tool_table, threads=1, timeout_s=tool_timeout_s)
            r.seconds = time.time() - t0
            if not run.ok:
                r.error = run.message
                tool_table.unlink(missing_ok=True)
            else:
                _int8_acc(r, tools, param, bin_, tool_table, work / f"tool_{m}_int8", x_val, y_val)
        log(f"  tool {m}: {r.error or r.acc} ({r.seconds or 0:.0f} s)")

        ours = work / f"calibrate_{m}.table"
        c = out[f"calibrate-{m}"] = ModelResult()
        t0 = time.time()
        try:
            res = calibrate(net, [xs[i : i + 64] for i in range(0, len(xs), 64)], method=m, eq_samples=eq_samples,
                            **cal_kw)
            res.write_ncnn_table(ours, param, bin_, style="ncnn2table")
        except Exception as e:  # noqa: BLE001 - reported in the table
            c.error = f"calibrate(method={m!r}, {cal_kw}) raised {type(e).__name__}: {e}"
        c.seconds = time.time() - t0
        if c.error is None:
            c.table_check = compare_tables(ours, tool_table) if tool_table.is_file() else "no tool table"
            if tools is not None:
                _int8_acc(c, tools, param, bin_, ours, work / f"calibrate_{m}_int8", x_val, y_val)
            else:
                c.error = "no ncnn2int8 to build the int8 model"
        log(f"  calibrate {m}{' ' + str(cal_kw) if cal_kw else ''}: {c.error or c.acc}, table {c.table_check} "
            f"({c.seconds:.0f} s)")
    return out


def _int8_acc(r: ModelResult, tools: Path, param: Path, bin_: Path, table: Path, base: Path, x: np.ndarray,
              y: np.ndarray) -> None:
    p, b = base.with_suffix(".param"), base.with_suffix(".bin")
    run = run_ncnn2int8(tools, param, bin_, table, p, b)
    if not run.ok:
        r.error = f"{run.message}: {run.stderr[-200:]}"
        return
    try:
        r.acc["x86"], _, r.pred = ncnn_accuracy(p, b, x, y)
    except NcnnRuntimeError as e:
        r.error = str(e)[:200]
