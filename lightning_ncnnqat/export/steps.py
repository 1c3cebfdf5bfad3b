"""The export's step runner and what the export runs after the int8 model.

:func:`step` names every failure after the step it happened in (and the layer, where the
exception carries one); :class:`Checks` says which checks run once the files are written: none
(the preflight at QAT start without targets), the per-layer checks only (the preflight with
targets), or everything a full export measures and reports.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal

from lightning_ncnnqat import policy
from lightning_ncnnqat.errors import ExportError, LayerError, NcnnQatError
from lightning_ncnnqat.ncnn.isolated import HOST
from lightning_ncnnqat.verification.report import ExportReport
from lightning_ncnnqat.verification.verdicts import render

STEP_TITLES = {
    "inputs": "model inputs and outputs",
    "validate": "checking scales",
    "onnx": "ONNX export + onnxsim -> model.onnx",
    "onnx_table": "table keyed by ONNX names -> model.table",
    "pnnx": "pnnx conversion -> model.ncnn.param/.bin",
    "ncnn_table": "table keyed by ncnn layer names -> model.ncnn.table",
    "int8": "int8 model -> model.int8.param/.bin",
    "conversion": "the float ncnn model vs PyTorch (preflight)",
    "parity": "parity and timing in the ncnn runtime (child process)",
    "deploy_kit": "deployment kit -> DEPLOY.md, run_int8.py, main.cpp",
    "report": "report -> report.json",
}


@contextlib.contextmanager
def step(name: str, verbose: bool = False) -> Iterator[None]:
    """Run one step; any exception inside becomes an :class:`ExportError` naming the step, and
    the layer where the exception carries one (:class:`~lightning_ncnnqat.errors.NcnnQatError`'s
    ``layer``: a LayerError, an ncnn format error, a diverged range). ``verbose`` prints the
    step's title before and its time after."""
    t0 = time.perf_counter()
    if verbose:
        print(f"ncnn export: {STEP_TITLES.get(name, name)} ...", flush=True)
    try:
        yield
        if verbose:
            print(f"ncnn export: {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
    except ExportError:
        raise
    except LayerError as e:  # its message already names the layer and the problem
        raise ExportError(name, e.layer, str(e)) from e
    except NcnnQatError as e:
        raise ExportError(name, e.layer, f"{type(e).__name__}: {e}") from e
    except Exception as e:  # noqa: BLE001 - not swallowed: re-raised naming the step, and report.json records it
        raise ExportError(name, None, f"{type(e).__name__}: {e}") from e


@contextlib.contextmanager
def noted(report: ExportReport, code: str) -> Iterator[list[str]]:
    """A list for the notes a conversion or writer function appends as sentences; on leaving (a
    failure included) they are rendered into ``report`` as ``code`` facts (:func:`policy.facts`)."""
    notes: list[str] = []
    try:
        yield notes
    finally:
        render(report, policy.facts(code, notes))


#: :attr:`Checks.mode` values.
NONE, LAYERS, FULL = "none", "layers", "full"


@dataclass(frozen=True)
class Checks:
    """What the export runs after the int8 model is written.

    ``mode``: ``"none"`` stops there (the float conversion is still judged; no runtime checks,
    no deploy kit, no report file: the preflight at QAT start); ``"layers"`` also runs every
    int8 layer once on each target (``report.runtime["wrong_layers"]``: the preflight with
    targets); ``"full"`` is the export: parity, per-layer checks and timing on ``targets``,
    the deploy kit and ``report.json``.
    """

    mode: Literal["none", "layers", "full"] = FULL
    targets: tuple[str, ...] = (HOST,)
    layer_check_samples: int = 4
    timing_runs: int = 30
    timing_threads: int | None = 1
    target_time_limit_s: float | None = None  # wall seconds for all runs on one emulated target

    def __post_init__(self) -> None:
        if self.mode not in (NONE, LAYERS, FULL):
            raise ValueError(f"Checks.mode must be one of {(NONE, LAYERS, FULL)}, got {self.mode!r}")

    @property
    def full(self) -> bool:
        """Whether this is a full export (deploy kit and report.json written)."""
        return self.mode == FULL

    def without_timing(self) -> Checks:
        """The same checks with no timing runs (the export times its models elsewhere)."""
        return replace(self, timing_runs=0)
