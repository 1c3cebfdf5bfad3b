"""Watching the QAT start: a validation collapse, and training divergence, named with their fix.

Users keep their float schedule: QAT started at the float run's learning rate can wreck a model
(the issue's CNN: validation accuracy 0.705 float, 0.098 one QAT epoch later at SGD lr 0.05),
and nothing else says so: the export's parity compares int8 with the QAT model, not with the
labels. :class:`CollapseWatch` compares the value of a validation metric logged in the last
float validation with the first validation after a QAT training step (``trainer.callback_metrics``,
read in ``on_validation_end``, after Lightning has gathered the epoch's logged values) and warns
with the fix. The metric: the key a ``ModelCheckpoint`` / ``EarlyStopping`` monitors (its
``mode`` says which way is better), else the logged validation keys that read as an accuracy
(higher is better) or a loss (lower). Thresholds: :mod:`lightning_ncnnqat.policy`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from lightning_ncnnqat.policy import QAT_LR_FACTOR, collapsed, validation_collapsed
from lightning_ncnnqat.verification.verdicts import render

_HIGHER = ("acc", "top", "f1", "map", "auc", "iou", "dice", "precision", "recall", "psnr", "ssim", "score")
_LOWER = ("loss", "err", "mse", "mae", "nll", "ppl", "perplexity", "cer", "wer")


def first_lr(trainer: Any) -> float | None:
    """The learning rate of the first optimizer's first parameter group, or None."""
    try:
        return float(trainer.optimizers[0].param_groups[0]["lr"])
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None


def divergence_hint(trainer: Any, start_epoch: int) -> str:
    """What a NaN/inf in a QAT range or weight most likely means, naming the learning rate and
    ``start_epoch`` (appended to :func:`~lightning_ncnnqat.qat.prepared.check_ranges`' error)."""
    lr = first_lr(trainer)
    at = f"the first optimizer's learning rate {lr:g}" if lr is not None else "the optimizer's learning rate"
    lower = f" (e.g. {QAT_LR_FACTOR:g}x: {lr * QAT_LR_FACTOR:g})" if lr is not None else " (e.g. 0.1x)"
    return (
        f"QAT (QATCallback start_epoch={start_epoch}, epoch {trainer.current_epoch}) diverged at {at}; "
        f"fine-tune QAT at a lower learning rate{lower}, or start it from a trained float model"
    )


def _direction(key: str) -> bool | None:
    """True: higher is better; False: lower; None: cannot tell from the name."""
    k = key.lower()
    if any(w in k for w in _LOWER):
        return False
    if any(w in k for w in _HIGHER):
        return True
    return None


def watched_keys(trainer: Any, metrics: dict[str, Any]) -> dict[str, bool]:
    """``{key: higher_is_better}`` of the validation metrics to compare: the monitored keys of
    the checkpoint / early-stopping callbacks (their ``mode``), else every logged key naming
    validation (``val``) that reads as an accuracy or a loss."""
    keys: dict[str, bool] = {}
    for cb in getattr(trainer, "callbacks", None) or []:
        monitor, mode = getattr(cb, "monitor", None), getattr(cb, "mode", None)
        if isinstance(monitor, str) and monitor in metrics and mode in ("min", "max"):
            keys[monitor] = mode == "max"
    if keys:
        return keys
    for key in metrics:
        direction = _direction(key)
        if "val" in key.lower() and direction is not None:
            keys[key] = direction
    return keys


def _scalar(v: Any) -> float | None:
    try:
        return float(v.detach().float().cpu().item()) if hasattr(v, "detach") else float(v)
    except (TypeError, ValueError, RuntimeError):
        return None


class CollapseWatch:
    """The last float validation's metrics, compared once with the first QAT validation's."""

    def __init__(self) -> None:
        self.before: dict[str, float] = {}
        self.before_epoch: int | None = None
        self.qat_step: int | None = None  # global step when QAT started
        self.done = False
        self.collapse: dict[str, tuple[float, float]] = {}  # key -> (float value, first QAT value)

    def qat_started(self, trainer: Any) -> None:
        self.qat_step = int(trainer.global_step)

    def on_validation_end(self, trainer: Any, active: bool, start_epoch: int) -> str | None:
        """Record (float) or judge (first QAT validation after a QAT step); the warning, or None."""
        if getattr(trainer, "sanity_checking", False) or self.done:
            return None
        metrics = dict(getattr(trainer, "callback_metrics", {}) or {})
        if not active:
            values = {k: _scalar(metrics[k]) for k in watched_keys(trainer, metrics)}
            self.before = {k: v for k, v in values.items() if v is not None}
            self.before_epoch = int(trainer.current_epoch)
            return None
        if self.qat_step is None or trainer.global_step <= self.qat_step:
            return None  # no QAT step yet (validation right at the start): not a QAT result
        self.done = True
        if not self.before:
            return None
        keys = watched_keys(trainer, metrics)
        for key, higher in keys.items():
            after = _scalar(metrics[key])
            if key in self.before and after is not None and collapsed(self.before[key], after, higher):
                self.collapse[key] = (self.before[key], after)
        return self.message(trainer, start_epoch) if self.collapse else None

    def message(self, trainer: Any, start_epoch: int) -> str:
        lr = first_lr(trainer)
        what = ", ".join(
            f"`{k}` {b:.4g} -> {'nan' if math.isnan(a) else f'{a:.4g}'}" for k, (b, a) in self.collapse.items()
        )
        lr_text = f"the first optimizer's learning rate {lr:g}" if lr is not None else "the optimizer's learning rate"
        lower = f"e.g. {QAT_LR_FACTOR:g}x = {lr * QAT_LR_FACTOR:g}" if lr is not None else "e.g. 0.1x"
        return (
            f"QATCallback: validation collapsed when QAT started (start_epoch={start_epoch}): {what} "
            f"(last float validation, epoch {self.before_epoch}, vs the first QAT one, epoch {trainer.current_epoch}) "
            f"at {lr_text}. Fine-tune QAT at a lower learning rate ({lower}, e.g. a scheduler step at start_epoch) "
            "or start it from a trained float model (a later start_epoch); freeze_bn_after=1 may also help. "
            "The export's parity compares int8 with this QAT model, not with the labels."
        )


def note_collapse(report: Any, watch: CollapseWatch) -> None:
    """Add the collapse (if any) to the export report's warnings and rewrite its ``report.json``:
    the report's parity compares int8 with the QAT model, so a collapsed model exports "ok"
    (the issue's run: 100% int8 vs QAT top-1 at validation accuracy 0.098)."""
    if not watch.collapse or report is None:
        return
    render(report, [validation_collapsed(watch.collapse)])
    path = os.path.join(str(report.export_dir), "report.json")
    if os.path.isfile(path):
        with open(path, "w") as f:
            f.write(json.dumps(report.to_dict(), indent=2) + "\n")
