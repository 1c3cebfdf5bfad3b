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

from torch import nn

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
