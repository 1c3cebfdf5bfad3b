"""Fail before training, not after: the export chain run on the just-prepared model.

The callback calls :func:`check_export_dir` when fit starts and :func:`preflight` right after
QAT starts (the model has just been prepared; no range is trained yet, so a copy gets ranges
from the example input). A model that cannot export then fails within seconds, naming the step
and the layer, instead of after the last epoch.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from collections.abc import Sequence
from dataclasses import replace

from torch import nn

from ..config import QATConfig
from ..plan import get_plan
from ..prepare import prepare_qat, unprepare
from ..wrappers import unwrap
from .api import preflight_export
from .errors import ExportError


def check_export_dir(path: str | os.PathLike) -> None:
    """Raise ValueError naming ``path`` if the export directory cannot be created or written.

    Creates the directory (as the export would) and writes and removes one temporary file.
    """
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".ncnnqat_write_check_", delete=True):
            pass
    except OSError as e:
        raise ValueError(f"`export_dir` {str(p)!r} cannot be written: {e.strerror or e}") from e


def measure_int8_layers(
    model: nn.Module, example_input: Any = None, targets: str | Sequence[str] = "auto"
) -> dict[str, dict[str, float]]:
    """Export ``model`` (ranges filled from the example on a copy) and run every int8 layer on
    each target with ncnn's default options: ``{target: {layer: isolated cosine}}`` of the layers
    a target computes WRONGLY (empty dicts when all are right). Targets not set up are left out.

    Raises :class:`ExportError` naming the step if the model cannot export.
    """
    rep = preflight_export(model, example_input, targets)
    return dict(rep.runtime.get("wrong_layers", {}))


def keep_wrong_layers_in_float(
    model: nn.Module, example_input: Any, config: QATConfig | None = None, targets: str | Sequence[str] = "auto"
) -> dict[str, str]:
    """Measure a just-prepared model's int8 layers on every target and re-plan the ones a target
    computes wrongly as float, before any training step (the model is unprepared and prepared
    again with them skipped, so nothing trained is lost). Returns ``{layer: reason}`` of the
    layers moved to float (empty when every target computes every layer right).

    This is how grouped convs (1 < groups < channels) get decided by measurement: ncnn's packed
    int8 kernels compute some of them wrongly where their output is dequantized (8 or 16
    channels per group on x86 and on ARMv8.2 under default options), and right where they are
    requantized into the next int8 conv.
    """
    wrong = measure_int8_layers(model, example_input, targets)
    worst: dict[str, list[str]] = {}
    for target, layers in wrong.items():
        for name, cos in layers.items():
            worst.setdefault(name, []).append(f"{target} (cosine {cos:.3f})")
    if not worst:
        return {}
    plan = get_plan(unwrap(model))
    config = config or (plan.config if plan is not None else QATConfig())
    unprepare(model)
    new_plan = prepare_qat(model, example_input, replace(config, skip=tuple(config.skip) + tuple(worst)))
    reasons = {
        name: f"ncnn's int8 runtime computes it wrongly under default options on {', '.join(where)}; measured at QAT start"
        for name, where in worst.items()
    }
    new_plan.float_layers.update(reasons)
    return reasons


def preflight(model: nn.Module, example_input: Any = None, verbose: bool = False) -> float:
    """Run ONNX export, pnnx, layer matching and the int8 writer on ``model`` (a copy is used
    where ranges must be filled; nothing of the user's model changes) in a temporary directory.

    Returns the seconds it took. Raises :class:`ExportError` naming the step and layer.
    """
    t0 = time.perf_counter()
    try:
        preflight_export(model, example_input)
    except ExportError as e:
        raise ExportError(
            e.step, e.layer,
            f"{e.message} [found by the export preflight at QAT start; QATCallback(preflight=False) skips it]",
            failures=e.failures,
        ) from e
    dt = time.perf_counter() - t0
    if verbose:
        print(f"ncnn export preflight: ONNX, pnnx, matching and the int8 writer passed in {dt:.1f} s", flush=True)
    return dt
