"""Calibrated start: QAT's input thresholds from ncnn2table's calibration of the float network
QAT starts from (``QATConfig(range_init="kl" | "aciq" | "absmax")``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from lightning_ncnnqat.calibration.api import calibrate
from lightning_ncnnqat.qat.plan import get_plan
from lightning_ncnnqat.qat.prepared import input_quantizers
from lightning_ncnnqat.qat.ranges import CALIBRATION_METHODS


def calibrated_thresholds(
    model: nn.Module, data: Iterable[Any] | Tensor, method: str, num_batches: int
) -> tuple[dict[str, float], list[str]]:
    """Thresholds of every range-owning layer of the QAT-prepared ``model`` from ``data``.

    ``method``: ``"kl"`` / ``"aciq"`` (ncnn2table's input threshold, computed as
    ``tools/quantize/ncnn2table.cpp`` does) or ``"absmax"`` (max |x| over the batches, ncnnqat's
    first-batch rule over more batches). Computed on the BN-folded float copy of ``model`` (the
    float network QAT starts from), in the unit of each layer's input. ``model`` is not changed.

    Returns ``(thresholds, warnings)``; a layer whose input was zero on every batch gets no
    threshold (its range is then set by the first training step) and a warning.
    Raises:
        ValueError: unknown method, no batch, a NaN/inf input (naming the layer).
        TypeError: a batch that holds no input tensor.
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"`method` must be one of {CALIBRATION_METHODS}, got {method!r}")
    result = calibrate(model, data, method="aciq" if method == "absmax" else method, num_batches=num_batches)
    out: dict[str, float] = {}
    warnings: list[str] = []
    for name in input_quantizers(model):
        c = result.layers[name]
        t = c.input_absmax if method == "absmax" else c.input_threshold
        if not t > 0:
            plan = get_plan(model)
            later = (
                "the export sets its range from the held batch (ranges='fixed')"
                if plan is not None and plan.config.ranges == "fixed"
                else "its range starts at the first training step"
            )
            warnings.append(f"layer '{name}': its input was zero on every calibration batch; {later}")
            continue
        out[name] = float(t)
    return out, warnings
