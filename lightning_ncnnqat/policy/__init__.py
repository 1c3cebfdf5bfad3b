"""Policy: every pass/fail threshold of the package and every rule that turns a measured figure
into a verdict, as :class:`Finding` objects (severity, layer, code, message, value, bar).

Measurements live in :mod:`lightning_ncnnqat.verification` (parity, per-layer checks, the float32
floor, the float conversion); what a figure MEANS is decided here, from numbers only; one place
renders the findings into ``report.json``'s notes and warnings and the printed summary
(:func:`lightning_ncnnqat.verification.verdicts.render`). This package imports nothing from the
rest of the package and nothing but the standard library, so every room may use it.

``bars``: the thresholds and numeric rules; ``findings``: :class:`Finding`; ``outputs``: output
cosine, float32 floor, top-1, approximation gap, float conversion; ``layers``: per-layer checks;
``steps``: the other steps' facts and checks (model.onnx, ranges, held batch, tables, targets).
"""

from __future__ import annotations

from .bars import (
    COLLAPSE_KEEP_FRACTION,
    COLLAPSE_LOSS_FACTOR,
    COLLAPSE_LOSS_MIN_RISE,
    FLOOR_FACTOR,
    FLOOR_MARGIN,
    MAX_ATTENTION_REL_ERR,
    MAX_LAYER_REL_ERR,
    MAX_ONNX_REL_ERR,
    MIN_ATTENTION_COSINE,
    MIN_ATTENTION_COSINE_DEFAULTS,
    MIN_DEFAULT_OPTIONS_COSINE,
    MIN_LAYER_COSINE,
    MIN_NOTED_GAP,
    MIN_OUTPUT_COSINE,
    MIN_TOP1_AGREEMENT,
    NEAR_TIE_SIGMAS,
    QAT_LR_FACTOR,
    approximation_gap,
    at_floor,
    attention_layer_ok,
    collapsed,
    conversion_departs,
    layer_cosine_ok,
    layer_ok,
    needs_floor,
    onnx_bar,
    output_failing,
)
from .findings import NOTE, WARNING, Finding, Severity
from .layers import approximation_notes, host_layer_findings, target_layer_findings
from .outputs import (
    OutputVerdict,
    conversion_departure,
    float_arithmetic_note,
    floor_not_measured,
    judge_approximation_gap,
    judge_output,
    judge_top1,
)
from .steps import (
    facts,
    gemm_kept_float,
    grouped_conv_rows,
    judge_onnx,
    onnx_folded_scales,
    onnx_not_checked,
    parity_on_example_input,
    ranges_from_held_batch,
    target_not_checked,
    validation_collapsed,
    wiring_not_traced,
)

__all__ = [
    "COLLAPSE_KEEP_FRACTION", "COLLAPSE_LOSS_FACTOR", "COLLAPSE_LOSS_MIN_RISE", "FLOOR_FACTOR", "FLOOR_MARGIN",
    "MAX_ATTENTION_REL_ERR", "MIN_ATTENTION_COSINE", "MIN_ATTENTION_COSINE_DEFAULTS", "attention_layer_ok",
    "MAX_LAYER_REL_ERR", "MAX_ONNX_REL_ERR", "MIN_DEFAULT_OPTIONS_COSINE", "MIN_LAYER_COSINE", "MIN_NOTED_GAP",
    "MIN_OUTPUT_COSINE", "MIN_TOP1_AGREEMENT", "NEAR_TIE_SIGMAS", "NOTE", "QAT_LR_FACTOR", "WARNING", "Finding",
    "OutputVerdict", "Severity", "approximation_gap", "approximation_notes", "at_floor", "collapsed",
    "conversion_departs", "conversion_departure", "facts", "float_arithmetic_note", "floor_not_measured", "gemm_kept_float",
    "grouped_conv_rows", "host_layer_findings", "judge_approximation_gap", "judge_onnx", "judge_output",
    "judge_top1", "layer_cosine_ok", "layer_ok", "needs_floor", "onnx_bar", "onnx_folded_scales",
    "onnx_not_checked", "output_failing", "parity_on_example_input", "ranges_from_held_batch",
    "target_layer_findings", "target_not_checked", "validation_collapsed", "wiring_not_traced",
]
