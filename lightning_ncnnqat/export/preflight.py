"""Fail before training, not after: the export chain run on the just-prepared model.

The callback calls :func:`check_export_dir` when fit starts; the QAT start
(:func:`lightning_ncnnqat.start.start_qat`, run by the callback and by ``prepare_qat(...,
targets=...)``) calls :func:`preflight` right after the model is prepared (no range is trained
yet, so a copy gets ranges from the example input). A model that cannot export then fails within seconds, naming the step
and the layer, instead of after the last epoch.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from collections.abc import Sequence
from torch import nn

from lightning_ncnnqat.qat.config import QATConfig
from lightning_ncnnqat.qat.prepare import measured_float_reasons
from lightning_ncnnqat.qat.prepare import replan_as_float as replan_layers_as_float
from lightning_ncnnqat.qat.batches import positional_names
from lightning_ncnnqat.qat.dtypes import float32_example, float32_model
from lightning_ncnnqat.errors import config_error
from lightning_ncnnqat.export.api import fill_missing_ranges, preflight_export
from lightning_ncnnqat.verification.float_conversion import conversion_message
from lightning_ncnnqat.conversion.model_io import held_inputs, model_io
from lightning_ncnnqat.errors import ExportError


def check_export_dir(path: str | os.PathLike) -> None:
    """Raise :class:`~lightning_ncnnqat.errors.ConfigError` (a ValueError) naming ``path`` if the
    export directory cannot be created or written.

    Creates the directory (as the export would) and writes and removes one temporary file.
    """
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".ncnnqat_write_check_", delete=True):
            pass
    except OSError as e:  # one line naming the argument, no chained OSError traceback
        raise config_error("export_dir", str(p), f"cannot be written: {e.strerror or e}") from None


def measure_int8_layers(
    model: nn.Module, example_input: Any = None, targets: str | Sequence[str] = "auto"
) -> dict[str, dict[str, float]]:
    """Export ``model`` (ranges filled from the example on a copy) and run every int8 layer on
    each target with ncnn's default options: ``{target: {layer: isolated cosine}}`` of the layers
    a target computes WRONGLY (empty dicts when all are right). Targets not set up are left out.

    Raises :class:`ExportError` naming the step if the model cannot export.
    """
    return preflight(model, example_input, targets=targets)


def replan_as_float(
    model: nn.Module, example_input: Any, wrong: dict[str, dict[str, float]], config: QATConfig | None = None
) -> dict[str, str]:
    """Re-plan as float the layers ``wrong`` (``{target: {layer: cosine}}``, from
    :func:`measure_int8_layers`) names, before any training step (the core's
    :func:`~lightning_ncnnqat.qat.prepare.measured_float_reasons` and
    :func:`~lightning_ncnnqat.qat.prepare.replan_as_float`; the QAT start,
    :func:`lightning_ncnnqat.start.start_qat`, runs them). ``config`` is unused: the model's
    plan holds it. Returns ``{layer: reason}`` of the layers moved to float."""
    reasons = measured_float_reasons(model, wrong)
    replan_layers_as_float(model, example_input, reasons)
    return reasons


def keep_wrong_layers_in_float(
    model: nn.Module, example_input: Any, config: QATConfig | None = None, targets: str | Sequence[str] = "auto"
) -> dict[str, str]:
    """Measure a just-prepared model's int8 layers on every target and re-plan the ones a target
    computes wrongly as float, before any training step (:func:`measure_int8_layers`, then
    :func:`replan_as_float`). Returns ``{layer: reason}`` of the layers moved to float.

    This is how grouped convs (1 < groups < channels) get decided by measurement: ncnn's packed
    int8 kernels compute some of them wrongly where their output is dequantized (8 or 16
    channels per group on x86 and on ARMv8.2 under default options), and right where they are
    requantized into the next int8 conv.
    """
    return replan_as_float(model, example_input, measure_int8_layers(model, example_input, targets), config)


def preflight(
    model: nn.Module,
    example_input: Any = None,
    verbose: bool = False,
    targets: str | Sequence[str] | None = None,
    float_weights: str = "fp32",
    held_batch: Any = None,
) -> dict[str, dict[str, float]]:
    """Run ONNX export, pnnx, layer matching and the int8 writer on ``model`` (a copy is used
    where ranges must be filled; nothing of the user's model changes) in a temporary directory;
    with ``targets``, also run every int8 layer there once (see :func:`measure_int8_layers`).

    The preflight runs before any training step, so no range is set yet: they are set on a copy
    from ``held_batch`` (real inputs, as the export does at the end), else from the example
    input (often all zeros: a learned threshold cannot start from an all-zero input).

    Returns ``{target: {layer: isolated cosine}}`` of wrongly computed layers (empty without
    ``targets``). Raises :class:`ExportError` naming the step and layer.
    """
    t0 = time.perf_counter()
    with float32_model(model) as model32:  # a bf16/fp16 model (precision="*-true") exports in float32
        return _preflight(model32, float32_example(example_input), verbose, targets, float_weights, held_batch, t0)


def _preflight(
    model: nn.Module, example_input: Any, verbose: bool, targets: str | Sequence[str] | None, float_weights: str,
    held_batch: Any, t0: float,
) -> dict[str, dict[str, float]]:
    if held_batch is not None:
        try:
            io = model_io(model, example_input)
            held = held_inputs(io, held_batch, positional_names(model))
        except (TypeError, ValueError):
            held = None  # preflight_export below reports the example's fault as an ExportError
        if held is not None:
            model, _ = fill_missing_ranges(model, io, held)
    try:
        rep = preflight_export(model, example_input, targets, float_weights)
    except ExportError as e:
        raise ExportError(
            e.step, e.layer,
            f"{e.message} [found by the export preflight at QAT start; QATCallback(preflight=False) skips it]",
            failures=e.failures,
        ) from e
    wrong = dict(rep.runtime.get("wrong_layers", {}))
    departs = conversion_message(rep.conversion)
    if departs:  # known now, before training: the export would judge it only after the last epoch
        warnings.warn(f"export preflight at QAT start: {departs}", UserWarning, stacklevel=3)
    if verbose:
        checked = f"; int8 layers run on {', '.join(wrong)}" if wrong else ""
        print(f"ncnn export preflight: ONNX, pnnx, matching and the int8 writer passed{checked} "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
    return wrong
