"""``export()``: everything a QAT-trained model becomes for ncnn, with measured proof.

Steps (each named in errors):

``validate``    scales and weights of every quantized layer are finite and positive; nothing is
                written before this passes.
``onnx``        ``model.onnx``: folded float model, exported and simplified with onnxsim.
``onnx_table``  ``model.table``: the calibration table keyed by ONNX node names (onnx2ncnn).
``pnnx``        ``model.ncnn.param/.bin``: float32 ncnn model converted by pnnx.
``ncnn_table``  ``model.ncnn.table``: the table keyed by the layer names in model.ncnn.param.
``int8``        ``model.int8.param/.bin``: what ncnn2int8 writes from model.ncnn.* + the table.
``parity``      ``report.json``: parity on the held batch, per-layer checks, timing.

The ONNX steps and the ncnn steps are independent: if one branch fails the other still runs,
its files land, and the error raised at the end names every failed step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import ops
from ..batches import INPUT_KEYS, model_input
from ..prepare import QuantLayerInfo, float_layers, folded_float_model, quantized_layers
from .errors import ExportError, LayerError
from .files import remove_stale_outputs, write_files_atomically
from .int8_writer import Int8Spec, write_int8
from .matching import WeightOwner, match_by_weights
from .ncnn_param import INT8_TYPES, NcnnParam, bin_layout
from .ncnn_runtime import NcnnNet
from .onnx_export import export_onnx, onnx_names, onnx_reference_output
from .parity import Agreement, LayerCheck, agreement, check_layers, torch_outputs
from .pnnx_convert import convert_with_pnnx
from .tables import TableRow, check_scales, format_table


@dataclass
class LayerReport:
    """One quantized layer, under each of its names."""

    torch_name: str
    onnx_name: str | None
    ncnn_name: str | None
    kind: str
    weight_bits: int
    input_scale: float
    num_weight_scales: int
    input_owner: str
    int8_scale_term: int | None = None  # param 8 in model.int8.param
    requantize_to: str | None = None  # first consumer whose input scale the output is requantized with
    output_scale: float | None = None


@dataclass
class ExportReport:
    """What was written and how closely it matches the PyTorch models (also ``report.json``)."""

    export_dir: str
    files: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    layers: list[LayerReport] = field(default_factory=list)
    float_layers: list[dict[str, str]] = field(default_factory=list)
    held_batch: dict[str, Any] = field(default_factory=dict)
    onnx: dict[str, Any] = field(default_factory=dict)
    int8_vs_qat: Agreement | None = None  # ncnn int8 vs PyTorch QAT model (eval)
    float_vs_torch: Agreement | None = None  # ncnn float32 vs folded float model (default options)
    float_vs_torch_fp32_storage: Agreement | None = None  # same with use_fp16_storage=False
    layer_checks: list[LayerCheck] = field(default_factory=list)
    timing: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    failures: list[dict[str, str | None]] = field(default_factory=list)

    @property
    def flagged_layers(self) -> list[str]:
        """Torch names of quantized layers the int8 runtime computes wrongly (default options)."""
        return [c.torch_name for c in self.layer_checks if c.ok is False]

    @property
    def ok(self) -> bool:
        return not self.failures and not self.flagged_layers

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        d["flagged_layers"] = self.flagged_layers
        return _jsonable(d)

    def summary(self) -> str:
        """A short human-readable summary."""
        out = [f"ncnn export -> {self.export_dir}"]
        if self.layers:
            w = max(len(r.torch_name) for r in self.layers)
            wn = max(len(r.ncnn_name or "-") for r in self.layers)
            out.append(f"  {'layer':<{w}}  {'ncnn':<{wn}}  {'type':<20} bits  input scale   scales  int8 check")
            checks = {c.torch_name: c for c in self.layer_checks}
            for r in self.layers:
                c = checks.get(r.torch_name)
                if c is None:
                    verdict = "-"
                elif c.ok is None:
                    verdict = "not judged (its ncnn input is garbage from upstream)"
                else:
                    verdict = f"ok (cos {c.isolated_cosine:.5f})" if c.ok else f"WRONG (cos {c.isolated_cosine:.3f})"
                out.append(
                    f"  {r.torch_name:<{w}}  {r.ncnn_name or '-':<{wn}}  {r.kind:<20} {r.weight_bits:>4}  "
                    f"{r.input_scale:<12.6g} {r.num_weight_scales:>6}  {verdict}"
                )
        for f in self.float_layers:
            out.append(f"  float: {f['name']}: {f['reason']}")
        hb = self.held_batch
        if hb:
            out.append(f"  held batch: {hb.get('n')} samples ({hb.get('source')})")
        if self.int8_vs_qat:
            a = self.int8_vs_qat
            top1 = "n/a" if a.top1_agreement is None else f"{100 * a.top1_agreement:.2f}%"
            out.append(
                f"  ncnn int8 vs PyTorch QAT: top-1 {top1}, cosine {a.cosine:.6f}, "
                f"max abs err {a.max_abs_err:.3g}, max rel err {a.max_rel_err:.3g}"
            )
        if self.float_vs_torch:
            a = self.float_vs_torch
            line = f"  ncnn fp32 vs PyTorch float: cosine {a.cosine:.6f}, max abs err {a.max_abs_err:.3g}"
            if self.float_vs_torch_fp32_storage:
                line += f" ({self.float_vs_torch_fp32_storage.max_abs_err:.3g} with use_fp16_storage=False)"
            out.append(line)
        if self.sizes.get("ratio"):
            out.append(
                f"  .bin size: fp32 {self.sizes['float32_bin']} B, int8 {self.sizes['int8_bin']} B "
                f"({self.sizes['ratio']:.2f}x smaller)"
            )
        if self.timing:
            t = self.timing
            out.append(
                f"  ncnn time/image ({t['threads']} threads): fp32 {t['float32_ms']:.3f} ms, "
                f"int8 {t['int8_ms']:.3f} ms (speed-up {t['speedup']:.2f}x)"
            )
        for msg in self.warnings:
            out.append(f"  WARNING: {msg}")
        for f in self.failures:
            out.append(f"  FAILED step '{f['step']}'" + (f" layer '{f['layer']}'" if f.get("layer") else "") + f": {f['message']}")
        return "\n".join(out)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else str(f)
    if isinstance(v, np.integer):
        return int(v)
    return v


_LAYER_RE = re.compile(r"layer '([^']+)'")


_STEP_TITLES = {
    "validate": "checking scales",
    "onnx": "ONNX export + onnxsim -> model.onnx",
    "onnx_table": "table keyed by ONNX names -> model.table",
    "pnnx": "pnnx conversion -> model.ncnn.param/.bin",
    "ncnn_table": "table keyed by ncnn layer names -> model.ncnn.table",
    "int8": "int8 model -> model.int8.param/.bin",
    "parity": "parity and timing in the ncnn runtime",
    "report": "report -> report.json",
}


@contextlib.contextmanager
def _step(name: str, verbose: bool = False) -> Iterator[None]:
    """Turn any failure inside a step into an ExportError naming the step (and layer).

    With ``verbose``, print one progress line per step (export takes seconds to minutes).
    """
    t0 = time.perf_counter()
    if verbose:
        print(f"ncnn export: {_STEP_TITLES.get(name, name)} ...", flush=True)
    try:
        yield
        if verbose:
            print(f"ncnn export: {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
    except ExportError:
        raise
    except LayerError as e:
        raise ExportError(name, e.layer, str(e)) from e
    except Exception as e:  # noqa: BLE001
        m = _LAYER_RE.search(str(e))
        raise ExportError(name, m.group(1) if m else None, f"{type(e).__name__}: {e}") from e


def _first_tensor(v: Any, what: str) -> torch.Tensor:
    x = model_input(v)
    if x is None:
        raise TypeError(
            f"`{what}` must be a tensor, or a batch holding the input tensor first (or under one of the keys "
            f"{', '.join(INPUT_KEYS)}), got {type(v).__name__}"
        )
    return x


def validate_layers(infos: list[QuantLayerInfo]) -> None:
    """Every quantized layer: finite positive input/weight scales, finite weights and bias."""
    for i in infos:
        check_scales(i.name, i.input_scale, [float(s) for s in i.weight_scales.reshape(-1)], i.num_groups)
        if not torch.isfinite(i.weight).all():
            raise LayerError(i.name, f"layer '{i.name}': its folded weight contains NaN or inf")
        if i.bias is not None and not torch.isfinite(i.bias).all():
            raise LayerError(i.name, f"layer '{i.name}': its folded bias contains NaN or inf")
        if i.kind not in INT8_TYPES:
            raise LayerError(i.name, f"layer '{i.name}': unknown ncnn type {i.kind!r}")


def _ncnn_owners(param: NcnnParam, data: bytes) -> list[WeightOwner]:
    layout = bin_layout(param, data)
    owners = []
    for lay in param.layers:
        if lay.type not in INT8_TYPES:
            continue
        es = {e.role: e for e in layout[lay.name]}
        if "weight" not in es:
            continue
        owners.append(
            WeightOwner(lay.name, lay.type, es["weight"].values(data), es["bias"].values(data) if "bias" in es else None)
        )
    return owners


def _table_rows(infos: list[QuantLayerInfo], names: dict[str, str], order: list[str]) -> list[TableRow]:
    pos = {n: i for i, n in enumerate(order)}
    rows = [
        TableRow(names[i.name], i.name, tuple(float(s) for s in i.weight_scales.reshape(-1)), float(i.input_scale))
        for i in infos
    ]
    return sorted(rows, key=lambda r: pos.get(r.layer, len(pos)))


def export(
    model: nn.Module,
    export_dir: str | Path,
    example_input: Any = None,
    held_batch: Any = None,
    held_batch_source: str = "held batch",
    *,
    verbose: bool = True,
    layer_check_samples: int = 4,
    timing_runs: int = 30,
    timing_threads: int | None = 1,
    check_onnx: bool = True,
    opset: int = 17,
) -> ExportReport:
    """Export a QAT-prepared model (nn.Module or LightningModule) for ncnn; see the module doc.

    Args:
        model: the QAT model (prepared by ``prepare_qat`` / ``QATCallback``, ranges initialised).
        export_dir: directory to write into (created; earlier outputs of an export are replaced).
        example_input: one input batch for tracing (the first sample is used); defaults to
            ``model.example_input_array``.
        held_batch: real inputs ``[N, ...]`` (or an ``(inputs, targets)`` batch) for the parity
            checks; defaults to the example input, which the report then says.
        held_batch_source: where the held batch came from, for the report.
        verbose: print a line per step and the summary at the end.
        layer_check_samples: samples of the held batch used for the per-layer check.
        timing_runs: timed inferences per model (median reported).
        timing_threads: ncnn threads for the timing (None: ncnn's default, all big cores). One
            thread by default: stable numbers on a shared or busy machine.
        check_onnx: also run model.onnx with onnx's reference evaluator on one sample.
        opset: ONNX opset.
    """
    export_dir = Path(export_dir)
    if example_input is None:
        example_input = getattr(model, "example_input_array", None)
    if example_input is None:
        raise ValueError(
            "export needs an input to trace: pass `example_input` or set `model.example_input_array` "
            f"(both are missing on {type(model).__name__})"
        )
    example = _first_tensor(example_input, "example_input").detach().cpu().float()
    if example.dim() == 0:
        raise ValueError("`example_input` must have a batch dimension")
    if held_batch is None:
        held, held_source = example, "example input (no held batch was given: parity on it is weak evidence)"
    else:
        held, held_source = _first_tensor(held_batch, "held_batch").detach().cpu().float(), held_batch_source
    if tuple(held.shape[1:]) != tuple(example.shape[1:]):
        raise ValueError(f"held batch shape {tuple(held.shape)} does not match the example input {tuple(example.shape)}")
    x1 = example[:1].contiguous()

    # -- validate: before anything is written
    with _step("validate", verbose):
        infos = quantized_layers(model)
        validate_layers(infos)
        floats = float_layers(model)
    with _step("validate", verbose):
        folded = folded_float_model(model).cpu().eval()
    report = ExportReport(str(export_dir))
    report.float_layers = [{"name": n, "reason": r} for n, r in floats]
    report.held_batch = {"source": held_source, "n": int(len(held))}
    report.layers = [
        LayerReport(
            i.name, None, None, i.kind, i.weight_bits, float(i.input_scale), int(i.weight_scales.numel()), i.input_owner
        )
        for i in infos
    ]
    by_torch = {r.torch_name: r for r in report.layers}

    export_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_outputs(export_dir)
    written: list[str] = []
    failures: list[ExportError] = []

    def land(contents: dict[str, Any]) -> None:
        for p in write_files_atomically(export_dir, contents):
            written.append(p.name)
            report.files[p.name] = p.stat().st_size

    # -- ONNX branch
    try:
        with _step("onnx", verbose):
            onnx_res = export_onnx(folded, x1, opset)
            report.onnx = {"exporter": onnx_res.exporter, "opset": onnx_res.opset}
            if check_onnx:
                ref = onnx_reference_output(onnx_res.model_bytes, x1.numpy())
                with torch.no_grad():
                    want = folded(x1).float().numpy()
                err = float(np.abs(ref.reshape(want.shape) - want).max())
                report.onnx["reference_max_abs_err_vs_torch_float"] = err
                if err > 1e-3 * max(1.0, float(np.abs(want).max())):
                    report.warnings.append(f"model.onnx (onnx reference evaluator) differs from PyTorch float by {err:.3g}")
            land({"model.onnx": onnx_res.model_bytes})
        with _step("onnx_table", verbose):
            names = onnx_names(onnx_res.model_bytes, infos)
            for t, n in names.items():
                by_torch[t].onnx_name = n
            land({"model.table": format_table(_table_rows(infos, names, onnx_res.node_names), "ONNX node")})
    except ExportError as e:
        failures.append(e)

    # -- ncnn branch
    try:
        with _step("pnnx", verbose):
            pn = convert_with_pnnx(folded, x1)
            f_param = NcnnParam.parse(pn.param_text)
            land({"model.ncnn.param": pn.param_text, "model.ncnn.bin": pn.bin_bytes})
        with _step("ncnn_table", verbose):
            ncnn_names = match_by_weights(infos, _ncnn_owners(f_param, pn.bin_bytes), "ncnn model (model.ncnn.param)")
            for t, n in ncnn_names.items():
                by_torch[t].ncnn_name = n
            order = [lay.name for lay in f_param.layers]
            land({"model.ncnn.table": format_table(_table_rows(infos, ncnn_names, order), "ncnn layer")})
        with _step("int8", verbose):
            specs = {}
            for i in infos:
                wfq = ops.fake_quantize_per_channel(i.weight, i.num_groups, i.weight_bits)[0]
                specs[ncnn_names[i.name]] = Int8Spec(
                    ncnn_names[i.name], i.name, i.weight_scales.numpy().astype(np.float32), float(i.input_scale),
                    wfq.numpy().ravel(),
                )
            res = write_int8(f_param, pn.bin_bytes, specs)
            for t, n in ncnn_names.items():
                by_torch[t].int8_scale_term = res.int8_scale_term.get(n)
                if n in res.requantize:
                    by_torch[t].requantize_to, by_torch[t].output_scale = res.requantize[n]
            land({"model.int8.param": res.param_text, "model.int8.bin": res.bin_bytes})
            report.sizes = {
                "float32_bin": len(pn.bin_bytes),
                "int8_bin": len(res.bin_bytes),
                "ratio": len(pn.bin_bytes) / max(1, len(res.bin_bytes)),
            }
        with _step("parity", verbose):
            _parity(
                model, folded, export_dir, report, ncnn_names, res.requantize, held,
                layer_check_samples, timing_runs, timing_threads,
            )
    except ExportError as e:
        failures.append(e)

    report.failures = [{"step": e.step, "layer": e.layer, "message": e.message} for e in failures]
    if report.int8_vs_qat is not None:
        with _step("report", verbose):
            land({"report.json": json.dumps(report.to_dict(), indent=2) + "\n"})
    if verbose:
        print(report.summary())
    if failures:
        first = failures[0]
        raise ExportError(
            first.step, first.layer, first.message, written=written,
            failures=[(e.step, e.layer, e.message) for e in failures],
        )
    return report


def _parity(
    model: nn.Module,
    folded: nn.Module,
    export_dir: Path,
    report: ExportReport,
    ncnn_names: dict[str, str],
    requantize: dict[str, tuple[str, float]],
    held: torch.Tensor,
    layer_check_samples: int,
    timing_runs: int,
    timing_threads: int | None,
) -> None:
    """Fill the parity, per-layer, size and timing parts of ``report``."""
    was_training = model.training
    model.eval()
    try:
        q_ref = torch_outputs(model, held)
        f_ref = torch_outputs(folded, held)
        xs = held.numpy()
        # parity runs single-threaded: same numbers, and no OpenMP oversubscription with torch
        int8_net = NcnnNet(export_dir / "model.int8.param", export_dir / "model.int8.bin", num_threads=1)
        fp32_net = NcnnNet(export_dir / "model.ncnn.param", export_dir / "model.ncnn.bin", num_threads=1)
        report.int8_vs_qat = agreement(q_ref, int8_net.run_batch(xs))
        report.float_vs_torch = agreement(f_ref, fp32_net.run_batch(xs))
        # ncnn's default use_fp16_storage keeps some float weights in fp16 on x86 (F16C): say how
        # much of the float difference that is
        fp32_strict = NcnnNet(
            export_dir / "model.ncnn.param", export_dir / "model.ncnn.bin", num_threads=1, use_fp16_storage=False
        )
        report.float_vs_torch_fp32_storage = agreement(f_ref, fp32_strict.run_batch(xs))
        out_scales = {p: s for p, (_, s) in requantize.items()}
        samples = held[: max(1, layer_check_samples)]
        in_scales = {r.torch_name: r.input_scale for r in report.layers}
        report.layer_checks = check_layers(model, int8_net, ncnn_names, out_scales, samples, in_scales)
        flagged = [c for c in report.layer_checks if c.ok is False]
        if flagged:
            unpacked = NcnnNet(
                export_dir / "model.int8.param", export_dir / "model.int8.bin", use_packing_layout=False, num_threads=1
            )
            again = {c.torch_name: c for c in check_layers(model, unpacked, ncnn_names, out_scales, samples, in_scales)}
            for c in flagged:
                c.ok_without_packing = again[c.torch_name].ok
                fix = (
                    "it is right with net.opt.use_packing_layout = False"
                    if c.ok_without_packing
                    else "it is wrong with use_packing_layout = False too"
                )
                report.warnings.append(
                    f"layer '{c.torch_name}' (ncnn '{c.ncnn_name}') is computed wrongly by the ncnn int8 runtime "
                    f"under default options (cosine {c.isolated_cosine:.4f}); {fix}. Keep it in float "
                    "(QATConfig.skip) or configure the runtime"
                )
        for c in report.layer_checks:
            if c.ok is None:
                report.warnings.append(
                    f"layer '{c.torch_name}' could not be checked: its input in the ncnn int8 runtime is non-finite or "
                    "beyond int32 range after scaling (an upstream layer is wrong)"
                )
        a = report.int8_vs_qat
        if a.top1_agreement is not None and a.top1_agreement < 0.995:
            report.warnings.append(f"int8 top-1 agreement with the QAT model is only {100 * a.top1_agreement:.2f}%")
        if a.cosine < 0.9999:
            report.warnings.append(f"int8 output cosine with the QAT model is only {a.cosine:.6f}")
        x0 = xs[0]
        opts = {} if timing_threads is None else {"num_threads": int(timing_threads)}
        t_fp32 = NcnnNet(export_dir / "model.ncnn.param", export_dir / "model.ncnn.bin", **opts)
        t_int8 = NcnnNet(export_dir / "model.int8.param", export_dir / "model.int8.bin", **opts)
        t_f = t_fp32.time_per_image(x0, runs=timing_runs)
        t_q = t_int8.time_per_image(x0, runs=timing_runs)
        report.timing = {
            "float32_ms": t_f,
            "int8_ms": t_q,
            "speedup": t_f / t_q if t_q > 0 else float("nan"),
            "threads": int(t_int8.net.opt.num_threads),
            "runs": timing_runs,
            "input_shape": list(x0.shape),
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "cpu_count": os.cpu_count(),
        }
    finally:
        model.train(was_training)
