"""The export's ncnn branch: ``model.ncnn.param/.bin`` (pnnx), ``model.ncnn.table`` keyed by the
converted layers (matched by weights, ties by their place in the graph), ``model.int8.param/.bin``
(what ncnn2int8 writes), then the checks :class:`~lightning_ncnnqat.export.steps.Checks` asks for."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lightning_ncnnqat import ops, policy
from lightning_ncnnqat.conversion.activation_fold import fold_converted
from lightning_ncnnqat.conversion.graph_match import ncnn_wiring
from lightning_ncnnqat.conversion.matching import converted_int8_kind, match_owners, ncnn_weight_owners
from lightning_ncnnqat.conversion.model_io import FlatModel
from lightning_ncnnqat.conversion.pnnx import convert_with_pnnx
from lightning_ncnnqat.errors import LayerError
from lightning_ncnnqat.export.attention_export import (
    attention_layer_reports, attention_refs, match_mha, matmul_float_layers, sdpa_int8,
)
from lightning_ncnnqat.export.gemm_export import check_gemm_owners, gemm_notes, gemm_specs_and_refs
from lightning_ncnnqat.export.inputs import Prepared, table_rows
from lightning_ncnnqat.export.onnx_branch import Land
from lightning_ncnnqat.export.steps import FULL, LAYERS, NONE, Checks, noted, step
from lightning_ncnnqat.ncnn.fp32_blobs import fp32_blobs_note, mask_fp32_blobs
from lightning_ncnnqat.ncnn.int8_writer import Int8Result, Int8Spec, write_int8
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.ncnn.table import format_table
from lightning_ncnnqat.verification.float_conversion import preflight_conversion
from lightning_ncnnqat.verification.layer_checks import QuantizedRef
from lightning_ncnnqat.verification.report import ExportReport
from lightning_ncnnqat.verification.runtime_checks import ModelFiles, blob_names, measure, measure_layers
from lightning_ncnnqat.verification.verdicts import render


@dataclass
class _Ncnn:
    """What the branch has made so far: the float model (pnnx's, activations folded), its blobs,
    each quantized layer's ncnn name, the int8 model and the per-layer check references."""

    param: NcnnParam
    bin_bytes: bytes
    in_blobs: list[str]
    out_blobs: list[str]
    names: dict[str, str] = field(default_factory=dict)  # torch layer -> ncnn layer
    int8: Int8Result | None = None
    refs: list[QuantizedRef] = field(default_factory=list)


def ncnn_branch(
    p: Prepared, report: ExportReport, land: Land, export_dir: Path, verbose: bool, checks: Checks, float_weights: str = "fp32",
) -> None:
    """The ``pnnx``, ``ncnn_table`` and ``int8`` steps, then ``checks`` (:func:`_run_checks`);
    ``land`` writes files atomically into ``export_dir``. Raises
    :class:`~lightning_ncnnqat.errors.ExportError` naming the failed step."""
    with step("pnnx", verbose):
        pn = convert_with_pnnx(FlatModel(p.folded, p.io), [t[:1] for t in p.held])
        in_blobs, out_blobs = blob_names(NcnnParam.parse(pn.param_text), p.io)
        with noted(report, "activation_fold") as notes:  # activations ncnn fuses, so int8 chains through them
            pn = fold_converted(pn, out_blobs, notes)
        nc = _Ncnn(NcnnParam.parse(pn.param_text), pn.bin_bytes, in_blobs, out_blobs)
        land({"model.ncnn.param": pn.param_text, "model.ncnn.bin": pn.bin_bytes})
    with step("ncnn_table", verbose):
        nc.names = _match_layers(p, report, nc)
        order = [lay.name for lay in nc.param.layers]
        land({"model.ncnn.table": format_table(table_rows(p.infos, nc.names, order), "ncnn layer")})
    with step("int8", verbose):
        nc.int8, nc.refs = _write_int8(p, report, nc, float_weights)
        land({"model.int8.param": nc.int8.param_text, "model.int8.bin": nc.int8.bin_bytes})
        report.sizes = {
            "float32_bin": len(nc.bin_bytes),
            "int8_bin": len(nc.int8.bin_bytes),
            "ratio": len(nc.bin_bytes) / max(1, len(nc.int8.bin_bytes)),
        }
    _run_checks(p, report, export_dir, verbose, checks, nc)


def _match_layers(p: Prepared, report: ExportReport, nc: _Ncnn) -> dict[str, str]:
    """``{torch layer: ncnn layer}`` of every quantized layer (and int8 Gemm), the report's layer
    table filled; raises LayerError for a layer converted to a type that takes no table rows."""
    by_torch = {r.torch_name: r for r in report.layers}
    with noted(report, "layer_matching") as notes:
        owners = match_owners([*p.infos, *p.gemms], ncnn_weight_owners(nc.param, nc.bin_bytes), "ncnn model (model.ncnn.param)",
                              graphs=None if p.wiring is None else (p.wiring, ncnn_wiring(nc.param, nc.in_blobs, nc.out_blobs)),
                              notes=notes)
    gemm_names = check_gemm_owners(p.gemms, owners)
    for t, o in owners.items():
        if t not in gemm_names and converted_int8_kind(o.kind) != "table":
            raise LayerError(
                t,
                f"layer '{t}' is converted to an ncnn {o.kind} ('{o.name}'), which takes no table rows; keep it "
                f"in float (QATCallback(skip=[{t!r}]) / QATConfig(skip=...))",
            )
        by_torch[t].ncnn_name = o.name
        by_torch[t].kind = o.kind
    return {t: o.name for t, o in owners.items()}


def _write_int8(p: Prepared, report: ExportReport, nc: _Ncnn, float_weights: str) -> tuple[Int8Result, list[QuantizedRef]]:
    """model.int8.* as ncnn2int8 writes it from the float model and the QAT scales, and the
    per-layer check's reference of every int8 layer; the report's layer table completed."""
    by_torch = {r.torch_name: r for r in report.layers}
    specs, refs = {}, []
    for i in p.infos:
        wfq = ops.fake_quantize_per_channel(i.weight, i.num_groups, i.weight_bits)[0]
        n = nc.names[i.name]
        specs[n] = Int8Spec(n, i.name, i.weight_scales.numpy().astype(np.float32), float(i.input_scale), wfq.numpy().ravel())
        refs.append(QuantizedRef(i.name, n, wfq, i.bias, float(i.input_scale)))
    # Gemm stays float: ncnn2int8 would quantize it without a row, with one scale from the
    # first row of a transposed B (clipping the rest), which QAT never simulated
    gemm_specs, gemm_refs = gemm_specs_and_refs(p.gemms, nc.names)
    refs += gemm_refs
    mha = match_mha(p.qmodel, nc.param, nc.bin_bytes)  # attention QAT trained int8 (export/attention_export.py)
    sdpa, sdpa_notes = sdpa_int8(p.qmodel, nc.param)
    render(report, policy.facts("attention_int8", sdpa_notes))
    report.float_layers += matmul_float_layers(nc.param)  # products of activations: no int8 MatMul in ncnn
    res = write_int8(nc.param, nc.bin_bytes, specs, quantize_gemm=False, float_weights=float_weights, gemm_specs=gemm_specs,
                     mha_int8=set(mha.values()), sdpa_int8=sdpa)
    att = attention_refs(p.qmodel, mha, nc.param, sdpa)
    refs += att
    report.layers += attention_layer_reports(att, nc.param)
    render(report, policy.facts("gemm_int8", gemm_notes(res.gemm_int8, gemm_specs)))
    res.param_text, masked = mask_fp32_blobs(res.param_text)  # float32 blobs on ARMv8.2 too
    render(report, policy.facts("fp32_blobs", [fp32_blobs_note(masked)]))
    report.float_weights = float_weights
    float_gemms = [lay.name for lay in nc.param.layers if lay.type == "Gemm" and lay.name not in gemm_specs]
    render(report, policy.gemm_kept_float(float_gemms, float_weights))
    for t, n in nc.names.items():
        by_torch[t].int8_scale_term = res.int8_scale_term.get(n)
        if n in res.requantize:
            by_torch[t].requantize_to, by_torch[t].output_scale = res.requantize[n]
    return res, refs


def _run_checks(p: Prepared, report: ExportReport, export_dir: Path, verbose: bool, checks: Checks, nc: _Ncnn) -> None:
    """What ``checks`` asks for once the int8 model is written: in the preflight modes the float
    conversion judged (``report.conversion``); ``"layers"``: every int8 layer once on each target
    (``report.runtime["wrong_layers"]``); ``"full"``: parity, per-layer checks and timing on every
    target (:func:`~lightning_ncnnqat.verification.runtime_checks.measure`)."""
    wirings = None if p.wiring is None else (p.wiring, ncnn_wiring(nc.param, nc.in_blobs, nc.out_blobs))
    if checks.mode != FULL:  # the preflight: is the float conversion faithful? (the export judges it in measure)
        with step("conversion", verbose):
            report.conversion = preflight_conversion(export_dir, nc.param, p.folded, p.io, p.held, nc.names, nc.out_blobs,
                                                     wirings, p.qmodel)
    if checks.mode == NONE:
        return
    with step("parity", verbose):
        files = ModelFiles(export_dir, NcnnParam.parse(nc.int8.param_text), nc.in_blobs, nc.out_blobs,
                           target_time_limit_s=checks.target_time_limit_s)
        out_scales = {prod: s for prod, (_, s) in nc.int8.requantize.items()}
        if checks.mode == LAYERS:  # the preflight: which layers each target computes wrongly
            report.runtime = {"wrong_layers": measure_layers(
                files, p.qmodel, p.io, p.held, nc.refs, out_scales, list(checks.targets)
            )}
            return
        measure(report, files, p.qmodel, p.folded, p.io, p.held, nc.refs, out_scales, checks.layer_check_samples,
                checks.timing_runs, checks.timing_threads, targets=checks.targets, float_param=nc.param, wirings=wirings,
                say=(lambda m: print(m, flush=True)) if verbose else None)
