"""Rules and facts of the export's steps other than parity: model.onnx's own check, input ranges
filled for the export, parity on the example input alone, grouped convs in model.table, Gemm kept
in float, a target that could not be checked. Each returns findings; nothing here measures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .bars import onnx_bar
from .findings import Finding, note, warning


def judge_onnx(evaluator: str, max_abs_err: float, ref_absmax: float) -> list[Finding]:
    """model.onnx run with ``evaluator`` (onnxruntime) differs from the folded PyTorch model by
    ``max_abs_err`` on outputs of absmax ``ref_absmax``: a warning beyond :func:`~.bars.onnx_bar`."""
    bar = onnx_bar(ref_absmax)
    if max_abs_err <= bar:
        return []
    return [warning("onnx_differs", f"model.onnx ({evaluator}) differs from PyTorch float by {max_abs_err:.3g}",
                    value=max_abs_err, bar=bar)]


def onnx_not_checked(error: str) -> Finding:
    """model.onnx could not be run (``error``: the evaluator's exception, named): the file stays."""
    return warning("onnx_not_checked", f"model.onnx could not be checked ({error})")


def ranges_from_held_batch(layers: Sequence[str], samples: int) -> Finding:
    """Input ranges no training step set, filled from the held batch for this export only."""
    return warning(
        "ranges_from_held_batch",
        f"no training step set the input range of {', '.join(layers)}; it was set from the held batch "
        f"({samples} samples) for this export",
    )


def parity_on_example_input(samples: int) -> Finding:
    """No held batch was given: parity on the example input alone says little."""
    return warning(
        "parity_on_example_input",
        f"parity was measured on the example input alone ({samples} sample(s)), not on "
        "held-out data: pass held_batch= to export() (QATCallback takes it from the validation loader when "
        "its batches hold the model's inputs); the figures say little about the int8 model on real inputs",
        value=float(samples),
    )


def grouped_conv_rows(grouped: Sequence[str]) -> list[Finding]:
    """model.table holds rows for grouped (not depthwise) convs: through onnx2ncnn + ncnn2int8
    ncnn's packed int8 kernels can compute them wrongly under default options."""
    if not grouped:
        return []
    return [warning(
        "grouped_conv_table_rows",
        f"model.table holds int8 rows for grouped convs {list(grouped)}: through onnx2ncnn + ncnn2int8 (which keeps "
        "activations as separate layers, so no requantize is fused) ncnn's packed int8 kernels can compute them "
        "wrongly under default options; deploy model.int8.* (measured here), or set use_packing_layout=False",
    )]


def onnx_folded_scales(factors: Mapping[str, float]) -> list[Finding]:
    """onnxsim folded a constant input scale into some weights; model.table's rows follow."""
    if not factors:
        return []
    return [note(
        "onnx_folded_input_scale",
        "onnxsim folded a constant input scale into the weights of "
        + ", ".join(f"'{t}' (x{c:.6g})" for t, c in factors.items())
        + "; model.table's rows for them are rescaled to the same integers",
    )]


def gemm_kept_float(gemms: Sequence[str], float_weights: str) -> list[Finding]:
    """Gemm layers stay float in model.int8.*: ncnn2int8 would quantize them without table rows."""
    if not gemms:
        return []
    return [note(
        "gemm_kept_float",
        f"Gemm layers {list(gemms)} are kept in float ({float_weights} weights); ncnn2int8 would quantize them without "
        "table rows, per tensor, from the first row of B only",
    )]


def wiring_not_traced(error: str) -> Finding:
    """The folded model's data flow could not be traced: equal-weight layers cannot be told apart."""
    return note(
        "wiring_not_traced",
        f"the folded model's data flow could not be traced ({error}): "
        "layers with identical weights cannot be told apart by their place",
    )


def validation_collapsed(collapse: Mapping[str, tuple[float, float]]) -> Finding:
    """The export's warning for a validation metric that collapsed when QAT started
    (``{key: (last float value, first QAT value)}``, judged by :func:`~.bars.collapsed`): int8
    follows the QAT model faithfully, so nothing else in the report says so."""
    what = ", ".join(f"`{k}` {b:.4g} -> {a:.4g}" for k, (b, a) in collapse.items())
    return warning(
        "validation_collapsed",
        f"training: validation collapsed when QAT started ({what}); the int8 model follows this QAT model "
        "faithfully, but the QAT model itself lost its accuracy (see the training warning for the fix)",
    )


def facts(code: str, messages: Sequence[str]) -> list[Finding]:
    """Notes another room wrote as sentences (layer matching, activation folding, the int8 writer's
    Gemms and float32 blobs): facts that explain the files, no rule to apply; empty ones dropped."""
    return [note(code, m) for m in messages if m]


def target_not_checked(target: str, error: str, unavailable: bool) -> Finding:
    """An emulated target's runs failed: a note when it is not set up (``unavailable``; the error
    names the set-up command), a warning when its ncnn run crashed, timed out or failed."""
    if unavailable:
        return note("target_not_set_up", f"{target} not checked: {error}")
    return warning("target_run_failed", f"{target}: {error}")
