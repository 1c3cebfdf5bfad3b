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
``board_profile`` with ``ExportConfig.board_profile``: a board's int8 vs float figures, judged
                (:mod:`.board_speed`).
``deploy_kit``  ``DEPLOY.md``, ``run_int8.py``, ``main.cpp`` for the device.
``report``      ``report.json``: always written (failures included) once the directory exists.

The ONNX steps and the ncnn steps are independent: if one branch fails the other still runs,
its files land, and the error raised at the end names every failed step. The steps live by
concern: :mod:`.steps` (the step runner, :class:`~.steps.Checks`), :mod:`.inputs` (``inputs``,
``validate``), :mod:`.onnx_branch`, :mod:`.ncnn_branch` (``pnnx`` .. ``parity``); this module
runs them and writes the deploy kit and the report. The verdicts are :mod:`lightning_ncnnqat.policy`'s.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lightning_ncnnqat import policy
from lightning_ncnnqat.errors import ConfigTypeError, ExportError
from lightning_ncnnqat.export.config import ExportConfig, resolve_targets
from lightning_ncnnqat.export.board_speed import board_speed
from lightning_ncnnqat.export.deploy_kit import write_deploy_kit
from lightning_ncnnqat.export.inputs import Prepared, fill_missing_ranges, prepare, validate_layers  # noqa: F401  (public here)
from lightning_ncnnqat.export.ncnn_branch import ncnn_branch
from lightning_ncnnqat.export.onnx_branch import onnx_branch
from lightning_ncnnqat.export.steps import FULL, LAYERS, NONE, Checks, step
from lightning_ncnnqat.files import OUTPUT_NAMES, remove_stale_outputs, write_files_atomically
from lightning_ncnnqat.ncnn.int8_writer import check_float_weights
from lightning_ncnnqat.preprocessing import find_preprocessing
from lightning_ncnnqat.qat.dtypes import float32_example, float32_model
from lightning_ncnnqat.qat.export_form import in_export_form
from lightning_ncnnqat.qat.wrappers import unwrap
from lightning_ncnnqat.verification.speed import split_timing, time_export
from lightning_ncnnqat.verification.report import ExportReport
from lightning_ncnnqat.verification.verdicts import render


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
    checks = Checks(FULL, tuple(resolve_targets(cfg.targets)), cfg.layer_check_samples, cfg.timing_runs,
                    cfg.timing_threads, cfg.target_time_limit_s)
    with float32_model(model) as model32:  # a float16/bfloat16 QAT model exports in float32, as in the callback
        return _export(
            model32, cfg.dir, float32_example(example_input), held_batch, held_batch_source,
            verbose=verbose, check_onnx=cfg.check_onnx, opset=cfg.opset, checks=checks,
            preprocessing=find_preprocessing(cfg.preprocessing, unwrap(model)), float_weights=cfg.float_weights,
            board_profile=cfg.board_profile,
        )


def _example(model: nn.Module, example_input: Any) -> Any:
    """``example_input``, else ``model.example_input_array``; raises ValueError naming both."""
    if example_input is None:
        example_input = getattr(model, "example_input_array", None)
    if example_input is None:
        raise ValueError(
            "export needs an input to trace: pass `example_input` or set `model.example_input_array` "
            f"(both are missing on {type(model).__name__})"
        )
    return example_input


class _Run:
    """One export's state: its directory and report, the files written so far, the failed steps."""

    def __init__(self, export_dir: Path, verbose: bool) -> None:
        self.dir = export_dir
        self.verbose = verbose
        self.report = ExportReport(str(export_dir))
        self.written: list[str] = []
        self.failures: list[ExportError] = []
        try:
            export_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_outputs(export_dir)
        except OSError as e:
            raise ExportError("files", None, f"cannot write the export directory {str(export_dir)!r}: {e}") from e

    def land(self, contents: dict[str, Any]) -> None:
        """Write ``{file name: text or bytes}`` atomically into the export directory."""
        for path in write_files_atomically(self.dir, contents):
            self.written.append(path.name)

    def attempt(self, fn: Callable[[], Any]) -> Any:
        """``fn()``; a failed step is recorded (the export goes on with the other branch) and None returned."""
        try:
            return fn()
        except ExportError as e:
            self.failures.append(e)
            return None

    def finish(self, checks: Checks, preprocessing: Any) -> ExportReport:
        """A full export's deploy kit and ``report.json`` (failures included), the summary, and
        the error naming every failed step; else the report."""
        report = self.report
        if checks.full and (self.dir / "model.int8.param").is_file():
            self.attempt(lambda: self._deploy_kit(preprocessing))
        report.failures = [{"step": e.step, "layer": e.layer, "message": e.message} for e in self.failures]
        if checks.full:
            report.files = {n: (self.dir / n).stat().st_size for n in OUTPUT_NAMES if (self.dir / n).is_file()}
            self.attempt(self._report_json)
        if self.verbose:
            print(report.summary())
        if self.failures:
            first = self.failures[0]
            raise ExportError(
                first.step, first.layer, first.message, written=self.written,
                failures=[(e.step, e.layer, e.message) for e in self.failures],
            )
        return report

    def _deploy_kit(self, preprocessing: Any) -> None:
        with step("deploy_kit", self.verbose):
            write_deploy_kit(self.dir, self.report.to_dict(), preprocessing)

    def _report_json(self) -> None:
        with step("report", self.verbose):
            self.land({"report.json": json.dumps(self.report.to_dict(), indent=2) + "\n"})
            self.report.files["report.json"] = (self.dir / "report.json").stat().st_size


def _inputs(model: nn.Module, example_input: Any, held_batch: Any, source: str, run: _Run) -> Prepared:
    """The ``inputs`` and ``validate`` steps, and where the held batch came from (a warning when
    parity can only run on the example input)."""
    prepared = prepare(model, example_input, held_batch, run.report, run.verbose)
    src = source if held_batch is not None else "example input (no held batch was given: parity on it is weak evidence)"
    run.report.held_batch = {"source": src, "n": int(len(prepared.held[0]))}
    if held_batch is None:
        render(run.report, [policy.parity_on_example_input(run.report.held_batch["n"])])
    return prepared


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
    checks: Checks,
    preprocessing: Any = None,
    float_weights: str = "fp32",
    board_profile: str | None = None,
) -> ExportReport:
    """The export (see the module doc); ``checks`` says what runs once the int8 model is written;
    ``board_profile``: a board's figures added (:func:`.board_speed.board_speed`)."""
    checks, timing = split_timing(checks)  # float vs int8 timed interleaved below, and judged
    model = unwrap(model)
    example_input = _example(model, example_input)
    run = _Run(Path(export_dir), verbose)
    was_training = model.training
    model.eval()
    try:
        prepared = run.attempt(lambda: _inputs(model, example_input, held_batch, held_batch_source, run))
        if prepared is not None:  # the two branches are independent: one failing, the other still runs
            run.attempt(lambda: onnx_branch(prepared, run.report, run.land, verbose, check_onnx, opset))
            run.attempt(lambda: ncnn_branch(prepared, run.report, run.land, run.dir, verbose, checks, float_weights))
            time_export(run.report, run.dir, prepared.held, **timing)  # verification.speed; never raises
            if board_profile is not None and (run.dir / "model.int8.param").is_file():
                run.attempt(lambda: board_speed(run.report, run.dir, board_profile))
    finally:
        model.train(was_training)
    return run.finish(checks, preprocessing)


PREFLIGHT_TARGET_TIME_LIMIT_S = 600.0
"""Seconds the preflight's layer runs may take on one emulated target before it skips that target."""


def preflight_export(
    model: nn.Module, example_input: Any = None, targets: str | Sequence[str] | None = None, float_weights: str = "fp32",
    export_dir: str | Path | None = None,
) -> ExportReport:
    """Run the export chain up to the int8 model into a temporary directory (``export_dir``: into
    that one, which keeps the files: the QAT start's speed check times them); with ``targets``,
    also the per-layer checks there (one sample; ``report.runtime["wrong_layers"]`` says which
    layers each target computes wrongly). Raises :class:`ExportError` naming the step and layer."""
    checks = Checks(NONE) if targets is None else Checks(
        LAYERS, tuple(resolve_targets(targets)), layer_check_samples=1, target_time_limit_s=PREFLIGHT_TARGET_TIME_LIMIT_S,
    )
    with tempfile.TemporaryDirectory(prefix="ncnnqat_preflight_") as tmp:
        return _export(model, export_dir or tmp, example_input, None, "preflight", verbose=False, check_onnx=False,
                       opset=17, checks=checks, float_weights=check_float_weights(float_weights))
