"""The callback's export, from its :class:`ExportConfig`: the preflight at QAT start (the QAT
start's ``measure``) and the export at the end of fit (global rank 0): where it goes, what it
compares on, and the one ``export()`` call."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from typing import Any

from lightning_ncnnqat.callbacks._compat import rank_zero_info
from lightning_ncnnqat.callbacks._fit_start import debug_run
from lightning_ncnnqat.callbacks._held import held_batch, model_probe
from lightning_ncnnqat.callbacks._rank_zero import ranges_unsynced
from lightning_ncnnqat.export.api import export
from lightning_ncnnqat.export.config import ExportConfig
from lightning_ncnnqat.export.preflight import preflight
from lightning_ncnnqat.preprocessing import find_preprocessing
from lightning_ncnnqat.qat.dtypes import float32_example, float32_model
from lightning_ncnnqat.verification.report import ExportReport


def export_path(config: ExportConfig, trainer: Any) -> str:
    """``config.dir``; a relative one under ``trainer.default_root_dir``, as Lightning's logs."""
    if os.path.isabs(config.dir):
        return config.dir
    return os.path.join(trainer.default_root_dir, config.dir)


def preflight_measure(trainer: Any, pl_module: Any, config: ExportConfig | None, verbose: bool) -> Callable | None:
    """The QAT start's ``measure``: the export chain and every int8 layer once on each of
    ``config.targets`` (ranges set from the held batch); None without an export or a preflight."""
    if config is None or not config.preflight:
        return None

    def measure(model: Any, example: Any) -> dict[str, dict[str, float]]:
        held, _ = held_batch(trainer, pl_module, example, config.held_batch_size, model_probe(trainer, pl_module))
        return preflight(model, example, verbose=verbose, targets=config.targets, float_weights=config.float_weights,
                         held_batch=held)

    return measure


def export_at_fit_end(trainer: Any, pl_module: Any, config: ExportConfig, example: Any, verbose: bool) -> ExportReport:
    """Export ``pl_module`` with ``config``: the held batch is the first ``config.held_batch_size``
    validation inputs that fit the model, the model its float32 copy under a ``*-true`` precision,
    the preprocessing ``config``'s, else the datamodule's or the module's. Under ``fast_dev_run``
    into a temporary directory (Lightning's debug runs write nothing)."""
    example = float32_example(example)
    held, source = held_batch(trainer, pl_module, example, config.held_batch_size, model_probe(trainer, pl_module))
    debug = debug_run(trainer)
    with contextlib.ExitStack() as stack:
        export_dir = export_path(config, trainer)
        if debug:  # a debug run never overwrites an export
            export_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="ncnnqat_fast_dev_run_"))
        stack.enter_context(ranges_unsynced(pl_module))
        model = stack.enter_context(float32_model(pl_module))  # the float32 copy under a *-true precision
        report = export(
            model, export_dir, example_input=example, held_batch=held, held_batch_source=source, config=config,
            verbose=verbose and not debug,  # its summary would name files about to be removed
            preprocessing=find_preprocessing(config.preprocessing, getattr(trainer, "datamodule", None), pl_module),
        )
    if debug and verbose:
        rank_zero_info(
            f"QATCallback: fast_dev_run: the export chain ran in a temporary directory, now removed "
            f"(ok={report.ok}; {len(report.warnings)} warning(s)); a run without fast_dev_run writes "
            f"{export_path(config, trainer)!r}"
        )
    return report
