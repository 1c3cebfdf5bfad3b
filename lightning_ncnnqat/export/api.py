"""``export()``: everything a QAT-trained model becomes for ncnn, with measured proof.

Steps (each named in errors and in ``report.json``):

``inputs``      the flat signature: input blobs ``in0..`` (tensors of the example), output blobs
                ``out0..`` (tensor leaves of the output); the held batch in that structure.
``validate``    scales and weights of every quantized layer are finite and positive.
``onnx``        ``model.onnx``: folded float model, exported and simplified with onnxsim, then
                run with onnxruntime against PyTorch (a disagreement is a warning: the file stays).
``onnx_table``  ``model.table``: the calibration table keyed by ONNX node names (onnx2ncnn).
``pnnx``        ``model.ncnn.param/.bin``: float32 ncnn model converted by pnnx.
``ncnn_table``  ``model.ncnn.table``: the table keyed by the layer names in model.ncnn.param.
``int8``        ``model.int8.param/.bin``: what ncnn2int8 writes from model.ncnn.* + the table.
``parity``      parity on the held batch per output, per-layer checks, timing: in a child process.
``report``      ``report.json``: always written (failures included) once the directory exists.

The ONNX steps and the ncnn steps are independent: if one branch fails the other still runs,
its files land, and the error raised at the end names every failed step.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_ncnnqat import ops
from lightning_ncnnqat.qat.batches import positional_names, to_model
from lightning_ncnnqat.qat.dtypes import float32_example, float32_model
from lightning_ncnnqat.qat.export_form import in_export_form
from lightning_ncnnqat.qat.plan import QuantLayerInfo, get_plan
from lightning_ncnnqat.qat.prepared import float_layers, folded_float_model, input_quantizers, quantized_layers
from lightning_ncnnqat.qat.prepared import deepcopy_model
from lightning_ncnnqat.preprocessing import find_preprocessing
from lightning_ncnnqat.qat.wrappers import unwrap
from lightning_ncnnqat.export.config import ExportConfig, resolve_targets
from lightning_ncnnqat.export.deploy_kit import write_deploy_kit
from lightning_ncnnqat.errors import ConfigTypeError, ExportError, LayerError
from lightning_ncnnqat.files import OUTPUT_NAMES, remove_stale_outputs, write_files_atomically
from lightning_ncnnqat.ncnn.int8_writer import Int8Spec, check_float_weights, write_int8
from lightning_ncnnqat.verification.layer_checks import QuantizedRef
from lightning_ncnnqat.verification.float_conversion import preflight_conversion
from lightning_ncnnqat.conversion.graph_match import Wiring, ncnn_wiring, torch_wiring
from lightning_ncnnqat.conversion.matching import converted_int8_kind, match_owners, ncnn_weight_owners
from lightning_ncnnqat.conversion.model_io import FlatModel, ModelIO, held_inputs, input_tensor, model_io, torch_outputs
from lightning_ncnnqat.ncnn.param import INT8_TYPES, NcnnParam
from lightning_ncnnqat.conversion.onnx import export_onnx, onnx_names, run_onnx
from lightning_ncnnqat.conversion.pnnx import convert_with_pnnx
from lightning_ncnnqat.conversion.activation_fold import fold_converted
from lightning_ncnnqat.verification.report import ExportReport, LayerReport
from lightning_ncnnqat.ncnn.isolated import HOST
from lightning_ncnnqat.verification.runtime_checks import ModelFiles, blob_names, measure, measure_layers
from lightning_ncnnqat.ncnn.table import TableRow, check_scales, format_table

_LAYER_RE = re.compile(r"layer '([^']+)'")

_STEP_TITLES = {
    "inputs": "model inputs and outputs",
    "validate": "checking scales",
    "onnx": "ONNX export + onnxsim -> model.onnx",
    "onnx_table": "table keyed by ONNX names -> model.table",
    "pnnx": "pnnx conversion -> model.ncnn.param/.bin",
    "ncnn_table": "table keyed by ncnn layer names -> model.ncnn.table",
    "int8": "int8 model -> model.int8.param/.bin",
    "parity": "parity and timing in the ncnn runtime (child process)",
    "deploy_kit": "deployment kit -> DEPLOY.md, run_int8.py, main.cpp",
    "report": "report -> report.json",
}


@contextlib.contextmanager
def _step(name: str, verbose: bool = False) -> Iterator[None]:
    """Turn any failure inside a step into an ExportError naming the step (and layer)."""
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


def _table_rows(
    infos: list[QuantLayerInfo], names: dict[str, str], order: list[str], factors: dict[str, float] | None = None
) -> list[TableRow]:
    """Table rows in graph order; ``factors[name] = c``: the graph's layer holds ``c * w`` (a folded
    input scale), so its rows are ``weight_scales / c`` and ``input_scale * c``."""
    pos = {n: i for i, n in enumerate(order)}
    f = factors or {}
    rows = [
        TableRow(
            names[i.name], i.name,
            tuple(float(np.float32(s) / np.float32(f.get(i.name, 1.0))) for s in i.weight_scales.reshape(-1)),
            float(np.float32(i.input_scale) * np.float32(f.get(i.name, 1.0))),
        )
        for i in infos
    ]
    rows = list({r.layer: r for r in reversed(rows)}.values())  # one row per converted layer (see matching._share_merged)
    return sorted(rows, key=lambda r: pos.get(r.layer, len(pos)))


def fill_missing_ranges(model: nn.Module, io: ModelIO, inputs: list[torch.Tensor]) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` whose input ranges that no training step set are set from ``inputs``
    (absmax of one eval forward), and the names of those layers; ``model`` itself when none is
    missing. The user's model is never changed."""
    missing = [n for n, q in input_quantizers(model).items() if float(q.running_absmax.reshape(-1)[0]) < 0]
    if not missing:
        return model, []
    copy_ = deepcopy_model(model)
    copy_.eval()
    qs = input_quantizers(copy_)
    for q in qs.values():
        q.sync = False  # one process fills them: a DDP all-reduce here would wait for the others forever
    modules = dict(unwrap(copy_).named_modules())
    for n in missing:
        qs[n].training = True  # only these move; the forward runs the rest in eval
        modules[n].updates_range = True  # also under ranges="fixed", where no training step moves them
    device = next((p.device for p in copy_.parameters()), torch.device("cpu"))
    with torch.no_grad():
        dtype = next((p.dtype for p in copy_.parameters() if p.is_floating_point()), torch.float32)
        a, k = io.call([to_model(t, device, dtype) for t in inputs])
        copy_(*a, **k)
    for n in missing:
        qs[n].training = False
    return copy_, missing


@dataclass
class _Prepared:
    """What every step after ``validate`` works from."""

    qmodel: nn.Module
    io: ModelIO
    held: list[torch.Tensor]
    infos: list[QuantLayerInfo]
    folded: nn.Module
    wiring: Wiring | None  # the folded model's traced graph: tells layers with equal weights apart


def _prepare(model: nn.Module, example_input: Any, held_batch: Any, report: ExportReport, verbose: bool) -> _Prepared:
    with _step("inputs", verbose):
        io = model_io(model, example_input)
        if held_batch is None:
            held = [input_tensor(t) for t in io.example_tensors()]
        else:
            held = held_inputs(io, held_batch, positional_names(model))
        report.io = io.describe()
    with _step("validate", verbose):
        if get_plan(model) is None:
            raise ValueError(f"{type(model).__name__} is not prepared for QAT (call prepare_qat or use QATCallback)")
        qmodel, filled = fill_missing_ranges(model, io, held)
        if filled:
            report.warnings.append(
                f"no training step set the input range of {', '.join(filled)}; it was set from the held batch "
                f"({len(held[0])} samples) for this export"
            )
        infos = quantized_layers(qmodel)
        validate_layers(infos)
        report.float_layers = [{"name": n, "reason": r} for n, r in float_layers(qmodel)]
        report.layers = [
            LayerReport(i.name, None, None, i.kind, i.weight_bits, float(i.input_scale), int(i.weight_scales.numel()), i.input_owner)
            for i in infos
        ]
        folded = folded_float_model(qmodel).cpu().eval()
        wiring = _traced_wiring(folded, io, held, report)
    return _Prepared(qmodel, io, held, infos, folded, wiring)


def _traced_wiring(folded: nn.Module, io: ModelIO, held: list[torch.Tensor], report: ExportReport) -> Wiring | None:
    """The folded model's traced graph (graph_match.torch_wiring); None, with a note, if the trace
    fails: weight matching then works as before, and only layers with equal weights go unresolved."""
    try:
        return torch_wiring(folded, io, [t[:1] for t in held])
    except Exception as e:  # noqa: BLE001 - a model that exports must not fail on this extra trace
        report.notes.append(f"the folded model's data flow could not be traced ({type(e).__name__}: {str(e)[:200]}): "
                            "layers with identical weights cannot be told apart by their place")
        return None


def _onnx_branch(p: _Prepared, report: ExportReport, land, verbose: bool, check_onnx: bool, opset: int) -> None:  # noqa: ANN001
    by_torch = {r.torch_name: r for r in report.layers}
    x1 = [t[:1] for t in p.held]
    with _step("onnx", verbose):
        res = export_onnx(FlatModel(p.folded, p.io), x1, opset, p.io.input_names, p.io.output_names, strip_prefix="model")
        report.onnx = {"exporter": res.exporter, "opset": res.opset}
        land({"model.onnx": res.model_bytes})
    if check_onnx:  # a self-check never throws a correct model.onnx away: warnings only
        try:
            got, evaluator = run_onnx(res.model_bytes, {n: t.numpy() for n, t in zip(p.io.input_names, x1)})
            want = torch_outputs(p.folded, p.io, x1)
            errs = [float(np.abs(g.reshape(w.shape) - w).max()) for g, w in zip(got, want)]
            report.onnx.update({"checked_with": evaluator, "max_abs_err_vs_torch_float": max(errs)})
            scale = max(1.0, max(float(np.abs(w).max()) for w in want))
            if max(errs) > 1e-3 * scale:
                report.warnings.append(f"model.onnx ({evaluator}) differs from PyTorch float by {max(errs):.3g}")
        except Exception as e:  # noqa: BLE001
            report.warnings.append(f"model.onnx could not be checked ({type(e).__name__}: {str(e)[:300]})")
    with _step("onnx_table", verbose):
        names, factors = onnx_names(res.model_bytes, p.infos, p.wiring, report.notes)
        for t, n in names.items():
            by_torch[t].onnx_name = n
        if factors:
            report.notes.append(
                "onnxsim folded a constant input scale into the weights of "
                + ", ".join(f"'{t}' (x{c:.6g})" for t, c in factors.items())
                + "; model.table's rows for them are rescaled to the same integers"
            )
        land({"model.table": format_table(_table_rows(p.infos, names, res.node_names, factors), "ONNX node")})
        grouped = [i.name for i in p.infos if i.kind == "ConvolutionDepthWise" and i.weight.dim() == 4 and i.weight.shape[1] > 1]
        if grouped:
            report.warnings.append(
                f"model.table holds int8 rows for grouped convs {grouped}: through onnx2ncnn + ncnn2int8 (which keeps "
                "activations as separate layers, so no requantize is fused) ncnn's packed int8 kernels can compute them "
                "wrongly under default options; deploy model.int8.* (measured here), or set use_packing_layout=False"
            )


def _ncnn_branch(
    p: _Prepared, report: ExportReport, land, export_dir: Path, verbose: bool, measure_kw: dict[str, Any] | None,  # noqa: ANN001
    float_weights: str = "fp32",
) -> None:
    by_torch = {r.torch_name: r for r in report.layers}
    x1 = [t[:1] for t in p.held]
    with _step("pnnx", verbose):
        pn = convert_with_pnnx(FlatModel(p.folded, p.io), x1)
        f_param = NcnnParam.parse(pn.param_text)
        in_blobs, out_blobs = blob_names(f_param, p.io)
        pn = fold_converted(pn, out_blobs, report.notes)  # activations ncnn fuses, so int8 chains through them
        f_param = NcnnParam.parse(pn.param_text)
        land({"model.ncnn.param": pn.param_text, "model.ncnn.bin": pn.bin_bytes})
    with _step("ncnn_table", verbose):
        owners = match_owners(p.infos, ncnn_weight_owners(f_param, pn.bin_bytes), "ncnn model (model.ncnn.param)",
                              graphs=None if p.wiring is None else (p.wiring, ncnn_wiring(f_param, in_blobs, out_blobs)),
                              notes=report.notes)
        for t, o in owners.items():
            if converted_int8_kind(o.kind) != "table":
                raise LayerError(
                    t,
                    f"layer '{t}' is converted to an ncnn {o.kind} ('{o.name}'), which takes no table rows; keep it "
                    f"in float (QATCallback(skip=[{t!r}]) / QATConfig(skip=...))",
                )
            by_torch[t].ncnn_name = o.name
            by_torch[t].kind = o.kind
        ncnn_names = {t: o.name for t, o in owners.items()}
        order = [lay.name for lay in f_param.layers]
        land({"model.ncnn.table": format_table(_table_rows(p.infos, ncnn_names, order), "ncnn layer")})
    with _step("int8", verbose):
        specs, refs = {}, []
        for i in p.infos:
            wfq = ops.fake_quantize_per_channel(i.weight, i.num_groups, i.weight_bits)[0]
            n = ncnn_names[i.name]
            specs[n] = Int8Spec(n, i.name, i.weight_scales.numpy().astype(np.float32), float(i.input_scale), wfq.numpy().ravel())
            refs.append(QuantizedRef(i.name, n, wfq, i.bias, float(i.input_scale)))
        # Gemm stays float: ncnn2int8 would quantize it without a row, with one scale from the
        # first row of a transposed B (clipping the rest), which QAT never simulated
        res = write_int8(f_param, pn.bin_bytes, specs, quantize_gemm=False, float_weights=float_weights)
        report.float_weights = float_weights
        gemms = [lay.name for lay in f_param.layers if lay.type == "Gemm"]
        if gemms:
            report.notes.append(
                f"Gemm layers {gemms} are kept in float ({float_weights} weights); ncnn2int8 would quantize them without table "
                "rows, per tensor, from the first row of B only"
            )
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
    wirings = None if p.wiring is None else (p.wiring, ncnn_wiring(f_param, in_blobs, out_blobs))
    if measure_kw is None or "layers_only" in measure_kw:  # the preflight: is the float conversion faithful?
        report.conversion = preflight_conversion(export_dir, f_param, p.folded, p.io, p.held, ncnn_names, out_blobs, wirings,
                                                 p.qmodel)
    if measure_kw is None:
        return
    with _step("parity", verbose):
        measure_kw = dict(measure_kw)
        files = ModelFiles(export_dir, NcnnParam.parse(res.param_text), in_blobs, out_blobs,
                           target_time_limit_s=measure_kw.pop("target_time_limit_s", None))
        out_scales = {prod: s for prod, (_, s) in res.requantize.items()}
        if "layers_only" in measure_kw:  # the preflight: which layers each target computes wrongly
            report.runtime = {"wrong_layers": measure_layers(
                files, p.qmodel, p.io, p.held, refs, out_scales, measure_kw["targets"]
            )}
            return
        measure(report, files, p.qmodel, p.folded, p.io, p.held, refs, out_scales, **measure_kw,
                float_param=f_param, wirings=wirings, say=(lambda m: print(m, flush=True)) if verbose else None)


def export(
    model: nn.Module,
    export_dir: str | Path | None = None,
    example_input: Any = None,
    held_batch: Any = None,
    held_batch_source: str = "held batch",
    *,
    config: ExportConfig | None = None,
    verbose: bool = True,
    **settings: Any,
) -> ExportReport:
    """Export a QAT-prepared model (nn.Module, LightningModule, or one wrapped by DataParallel,
    DDP, torch.compile or Fabric) for ncnn; see the module doc for the steps and files.

    Args:
        model: the QAT model (prepared by ``prepare_qat`` / ``QATCallback``). Input ranges that
            no training step set (layers that run only in eval mode) are set from the held batch
            on a copy, with a warning in the report.
        export_dir: directory to write into (created; earlier outputs of an export are
            replaced); default: ``config.dir``.
        example_input: one input for tracing, in Lightning's ``example_input_array`` form (Tensor,
            tuple of positional inputs, dict of keyword inputs); the first sample of each tensor
            is used. Defaults to ``model.example_input_array``.
        held_batch: real inputs for the parity checks, structured like the example (``[N, ...]``
            tensors) or as a dataloader batch holding them (``(inputs, targets)``, dict); defaults
            to the example input, which the report then says.
        held_batch_source: where the held batch came from, for the report.
        config: the export's settings (:class:`~lightning_ncnnqat.ExportConfig`: targets, float
            weights, preprocessing, timing ...), the object ``QATCallback(export=...)`` and the
            export command take; default: ``ExportConfig()``. Its ``preprocessing`` defaults to
            ``model.preprocessing`` if the model has one.
        verbose: print a line per step and the summary at the end.
        **settings: :class:`~lightning_ncnnqat.ExportConfig` fields by name, over ``config``'s
            (``targets=["x86"]``, ``timing_runs=0``, ``float_weights="fp16"`` ...).

    Returns:
        The :class:`ExportReport` (also written to ``report.json``).

    Raises:
        ConfigError / ConfigTypeError: a setting's value (or an unknown setting), named.
        ExportError: a step failed (``step``/``layer`` name it; every failed step is listed and
            ``report.json`` records them). The files of the steps that succeeded stay.
        ValueError: no example input.
    """
    if export_dir is not None and "dir" in settings:
        raise ConfigTypeError("export() got the directory twice: `export_dir` and `dir`", argument="dir")
    if export_dir is not None:
        settings["dir"] = export_dir
    cfg = ExportConfig.coerce(config, "config").replace("export()", **settings)
    measure_kw = {
        "layer_check_samples": cfg.layer_check_samples,
        "timing_runs": cfg.timing_runs,
        "timing_threads": cfg.timing_threads,
        "targets": resolve_targets(cfg.targets),
        "target_time_limit_s": cfg.target_time_limit_s,
    }
    with float32_model(model) as model32:  # a float16/bfloat16 QAT model exports in float32, as in the callback
        return _export(
            model32, cfg.dir, float32_example(example_input), held_batch, held_batch_source,
            verbose=verbose, check_onnx=cfg.check_onnx, opset=cfg.opset, measure_kw=measure_kw,
            preprocessing=find_preprocessing(cfg.preprocessing, unwrap(model)), float_weights=cfg.float_weights,
        )


@in_export_form  # every trace and reference forward of the export in the form it deploys
def _export(
    model: nn.Module,
    export_dir: str | Path,
    example_input: Any,
    held_batch: Any,
    held_batch_source: str,
    *,
    verbose: bool,
    check_onnx: bool,
    opset: int,
    measure_kw: dict[str, Any] | None,
    preprocessing: Any = None,
    float_weights: str = "fp32",
) -> ExportReport:
    """The export; ``measure_kw=None`` stops after the int8 model (no runtime, no report file)."""
    model = unwrap(model)
    export_dir = Path(export_dir)
    if example_input is None:
        example_input = getattr(model, "example_input_array", None)
    if example_input is None:
        raise ValueError(
            "export needs an input to trace: pass `example_input` or set `model.example_input_array` "
            f"(both are missing on {type(model).__name__})"
        )
    report = ExportReport(str(export_dir))
    try:
        export_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_outputs(export_dir)
    except OSError as e:
        raise ExportError("files", None, f"cannot write the export directory {str(export_dir)!r}: {e}") from e
    written: list[str] = []
    failures: list[ExportError] = []

    def land(contents: dict[str, Any]) -> None:
        for path in write_files_atomically(export_dir, contents):
            written.append(path.name)

    was_training = model.training
    model.eval()
    try:
        prepared = None
        try:
            prepared = _prepare(model, example_input, held_batch, report, verbose)
            src = held_batch_source if held_batch is not None else "example input (no held batch was given: parity on it is weak evidence)"
            report.held_batch = {"source": src, "n": int(len(prepared.held[0]))}
            if held_batch is None:
                report.warnings.append(
                    f"parity was measured on the example input alone ({report.held_batch['n']} sample(s)), not on "
                    "held-out data: pass held_batch= to export() (QATCallback takes it from the validation loader when "
                    "its batches hold the model's inputs); the figures say little about the int8 model on real inputs"
                )
        except ExportError as e:
            failures.append(e)
        if prepared is not None:
            for branch in (
                lambda: _onnx_branch(prepared, report, land, verbose, check_onnx, opset),
                lambda: _ncnn_branch(prepared, report, land, export_dir, verbose, measure_kw, float_weights),
            ):
                try:
                    branch()
                except ExportError as e:
                    failures.append(e)
    finally:
        model.train(was_training)

    if measure_kw is not None and "layers_only" not in measure_kw and (export_dir / "model.int8.param").is_file():
        try:
            with _step("deploy_kit", verbose):
                write_deploy_kit(export_dir, report.to_dict(), preprocessing)
        except ExportError as e:
            failures.append(e)
    report.failures = [{"step": e.step, "layer": e.layer, "message": e.message} for e in failures]
    if measure_kw is not None and "layers_only" not in measure_kw:
        report.files = {n: (export_dir / n).stat().st_size for n in OUTPUT_NAMES if (export_dir / n).is_file()}
        try:
            with _step("report", verbose):
                text = json.dumps(report.to_dict(), indent=2) + "\n"
                land({"report.json": text})
                report.files["report.json"] = (export_dir / "report.json").stat().st_size
        except ExportError as e:
            failures.append(e)
    if verbose:
        print(report.summary())
    if failures:
        first = failures[0]
        raise ExportError(
            first.step, first.layer, first.message, written=written,
            failures=[(e.step, e.layer, e.message) for e in failures],
        )
    return report


PREFLIGHT_TARGET_TIME_LIMIT_S = 600.0
"""Seconds the preflight's layer runs may take on one emulated target before it skips that target."""


def preflight_export(
    model: nn.Module, example_input: Any = None, targets: str | Sequence[str] | None = None, float_weights: str = "fp32"
) -> ExportReport:
    """Run the export chain up to the int8 model into a temporary directory; with ``targets``,
    also the per-layer checks there (one sample; ``report.runtime["wrong_layers"]`` says which
    layers each target computes wrongly). Raises :class:`ExportError` naming the step and layer."""
    kw = None if targets is None else {
        "layers_only": True, "targets": resolve_targets(targets), "target_time_limit_s": PREFLIGHT_TARGET_TIME_LIMIT_S,
    }
    with tempfile.TemporaryDirectory(prefix="ncnnqat_preflight_") as tmp:
        return _export(model, tmp, example_input, None, "preflight", verbose=False, check_onnx=False, opset=17,
                       measure_kw=kw, float_weights=check_float_weights(float_weights))
