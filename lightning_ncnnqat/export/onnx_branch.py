"""The export's ONNX branch: ``model.onnx`` (folded float model, onnxsim), its own check with
onnxruntime (a difference is a warning: a correct file is never thrown away), and
``model.table`` keyed by ONNX node names (what onnx2ncnn + ncnn2int8 read)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from lightning_ncnnqat import policy
from lightning_ncnnqat.conversion.model_io import FlatModel, torch_outputs
from lightning_ncnnqat.conversion.onnx import export_onnx, onnx_names, run_onnx
from lightning_ncnnqat.export.inputs import Prepared, table_rows
from lightning_ncnnqat.export.steps import noted, step
from lightning_ncnnqat.ncnn.table import format_table
from lightning_ncnnqat.verification.report import ExportReport
from lightning_ncnnqat.verification.verdicts import render

Land = Callable[[dict[str, Any]], None]


def onnx_branch(p: Prepared, report: ExportReport, land: Land, verbose: bool, check_onnx: bool, opset: int) -> None:
    """The ``onnx`` and ``onnx_table`` steps; ``land`` writes files atomically into the export
    directory. Raises :class:`~lightning_ncnnqat.errors.ExportError` naming the failed step."""
    by_torch = {r.torch_name: r for r in report.layers}
    x1 = [t[:1] for t in p.held]
    with step("onnx", verbose):
        res = export_onnx(FlatModel(p.folded, p.io), x1, opset, p.io.input_names, p.io.output_names, strip_prefix="model")
        report.onnx = {"exporter": res.exporter, "opset": res.opset}
        land({"model.onnx": res.model_bytes})
    if check_onnx:
        _check_onnx(res.model_bytes, p, x1, report)
    with step("onnx_table", verbose):
        with noted(report, "onnx_names") as notes:
            names, factors = onnx_names(res.model_bytes, p.infos, p.wiring, notes)
        for t, n in names.items():
            by_torch[t].onnx_name = n
        render(report, policy.onnx_folded_scales(factors))
        land({"model.table": format_table(table_rows(p.infos, names, res.node_names, factors), "ONNX node")})
        grouped = [i.name for i in p.infos if i.kind == "ConvolutionDepthWise" and i.weight.dim() == 4 and i.weight.shape[1] > 1]
        render(report, policy.grouped_conv_rows(grouped))


def _check_onnx(model_bytes: bytes, p: Prepared, x1: list, report: ExportReport) -> None:
    """model.onnx run by onnxruntime (or onnx's reference evaluator) vs the folded PyTorch model
    on one sample, judged by :func:`lightning_ncnnqat.policy.judge_onnx`; an evaluator that
    cannot run the file is a warning, never a failure of the export."""
    try:
        got, evaluator = run_onnx(model_bytes, {n: t.numpy() for n, t in zip(p.io.input_names, x1)})
    except Exception as e:  # noqa: BLE001 - onnxruntime / onnx.reference (not ours) may raise anything on a valid file
        render(report, [policy.onnx_not_checked(f"{type(e).__name__}: {str(e)[:300]}")])
        return
    want = torch_outputs(p.folded, p.io, x1)
    sizes = [(g.size, w.size) for g, w in zip(got, want) if g.size != w.size]
    if sizes or len(got) != len(want):
        render(report, [policy.onnx_not_checked(
            f"{evaluator} gave {len(got)} output(s) of sizes {[g.size for g in got]}, PyTorch {[w.size for w in want]}"
        )])
        return
    errs = [float(np.abs(g.reshape(w.shape) - w).max()) for g, w in zip(got, want)]
    report.onnx.update({"checked_with": evaluator, "max_abs_err_vs_torch_float": max(errs)})
    render(report, policy.judge_onnx(evaluator, max(errs), max(float(np.abs(w).max()) for w in want)))
