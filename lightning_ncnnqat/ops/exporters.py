"""The ``ncnnqat`` ops in torch's own exporters: an exported QAT model computes what it computes.

A prepared model calls ``torch.ops.ncnnqat.*`` in its forward. Torch's exporters know nothing of
them, so ``torch.onnx.export`` (both exporters, and Lightning's ``to_onnx``) failed with
"unrecognized namespace ncnnqat". Registered here, on import of :mod:`lightning_ncnnqat.ops`:

* the TorchScript-based ONNX exporter (``dynamo=False``): one symbolic per op, the reference
  math (:mod:`.reference`) in plain ONNX ops (Mul, Div, Floor, Sign, Clip, ReduceMax, MatMul),
  so ONNX Runtime runs the fake quantization of the QAT model, float32 step for step;
* the dynamo ONNX exporter (``dynamo=True``, torch's default) and anything else that decomposes
  an exported program: the reference functions as the ops' decompositions (aten ops only).

``torch.jit.trace`` and ``torch.export.export`` keep the ops as calls (they need this package
at load time); the ``.pt2`` / TorchScript file runs where ``lightning_ncnnqat`` is imported.
The ncnn model itself comes from ``lightning_ncnnqat.export`` (docs/export.md); the float model
without fake quantization from ``folded_float_model``. ``update_absmax_`` (training only) has
no export form: a model exported in training mode is refused by torch's exporter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._decomp import register_decomposition
from torch.onnx import symbolic_helper as sh

from lightning_ncnnqat.errors import UnsupportedModelError
from lightning_ncnnqat.ops import _registry, reference

FLT_MAX = float(torch.finfo(torch.float32).max)
_FLOAT = 1  # onnx.TensorProto.FLOAT
_DOUBLE = 11  # onnx.TensorProto.DOUBLE
_INT8 = 3  # onnx.TensorProto.INT8
OPSET = 13  # lowest opset the symbolics are written for (ReduceMax's axes attribute until 18)


def _const(g, value: float | list[int]):  # noqa: ANN001, ANN202
    dtype = torch.int64 if isinstance(value, list) else torch.float32
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def _float(g, v):  # noqa: ANN001, ANN202
    return g.op("Cast", v, to_i=_FLOAT)


def _finite_abs(g, v):  # noqa: ANN001, ANN202
    """``|v|`` with NaN and +-inf as 0: a range ignores non-finite values (reference.finite_absmax)."""
    a = g.op("Abs", v)
    bad = g.op("Or", g.op("IsNaN", a), g.op("IsInf", a))
    return g.op("Where", bad, _const(g, 0.0), a)


def _reduce_max(g, v, axis: int | None):  # noqa: ANN001, ANN202
    """max over ``axis`` (None: all), dimension dropped; ReduceMax's axes moved to an input in opset 18."""
    if axis is None:
        return g.op("ReduceMax", g.op("Reshape", v, _const(g, [-1])), keepdims_i=0)
    if g.opset >= 18:
        return g.op("ReduceMax", v, _const(g, [axis]), keepdims_i=0)
    return g.op("ReduceMax", v, axes_i=[axis], keepdims_i=0)


def _scale(g, absmax, qmax: float):  # noqa: ANN001, ANN202
    """``qmax / absmax`` (one float32 division), 1 where absmax is 0, at most FLT_MAX."""
    s = g.op("Div", _const(g, qmax), absmax)
    s = g.op("Where", g.op("Greater", absmax, _const(g, 0.0)), s, _const(g, 1.0))
    return g.op("Min", s, _const(g, FLT_MAX))


def _levels(g, x, scale, qmax: float):  # noqa: ANN001, ANN202
    """``round_half_away(clamp(x * scale, -qmax, qmax))``: floor of |v| plus one where its fraction
    is >= 0.5, signed (``floor(|v| + 0.5)`` would round 0.49999997 up)."""
    v = g.op("Clip", g.op("Mul", x, scale), _const(g, -qmax), _const(g, qmax))
    a = g.op("Abs", v)
    t = g.op("Floor", a)
    up = g.op("Cast", g.op("GreaterOrEqual", g.op("Sub", a, t), _const(g, 0.5)), to_i=_FLOAT)
    return g.op("Mul", g.op("Sign", v), g.op("Add", t, up))


def _per_group(g, w, shape_of, num_groups: int, bits: int):  # noqa: ANN001, ANN202
    """Per-group fake quantization of float32 ``w`` along dim 0: (w_fq in ``shape_of``'s shape, scales)."""
    qmax = reference.qmax_of(bits)
    rows = g.op("Reshape", w, _const(g, [num_groups, -1]))
    scales = _scale(g, _reduce_max(g, _finite_abs(g, rows), 1), qmax)
    col = g.op("Reshape", scales, _const(g, [num_groups, 1]))
    out = g.op("Div", _levels(g, rows, col, qmax), col)
    return g.op("Reshape", out, g.op("Shape", shape_of)), scales


@sh.parse_args("v", "v", "i")
def _sym_per_tensor(g, x, running_absmax, bits: int):  # noqa: ANN001, ANN202
    qmax = reference.qmax_of(bits)
    xf = _float(g, x)
    r = g.op("Reshape", _float(g, running_absmax), _const(g, []))
    s = _scale(g, r, qmax)
    out = g.op("Div", _levels(g, xf, s, qmax), s)
    # an uninitialised range (< 0) passes the input through
    return g.op("Where", g.op("Less", r, _const(g, 0.0)), xf, out)


@sh.parse_args("v", "i", "i")
def _sym_per_channel(g, weight, num_groups: int, bits: int):  # noqa: ANN001, ANN202
    return _per_group(g, _float(g, weight), weight, num_groups, bits)


def _column(g, v, rank: int):  # noqa: ANN001, ANN202
    return g.op("Reshape", v, _const(g, [-1] + [1] * (rank - 1)))


@sh.parse_args("v", "v", "v", "v", "v", "v", "i", "i")
def _sym_fold(g, weight, bias, bn_weight, bn_bias, bn_mean, bn_inv_std, num_groups: int, bits: int):  # noqa: ANN001, ANN202
    """reference.fold_fake_quantize_weight: s = gamma * inv_std, t = beta - mean * s, then
    (weight * s[row], t + bias * s), the folded weight fake-quantized per group."""
    s = _float(g, bn_inv_std)
    if not sh._is_none(bn_weight):
        s = g.op("Mul", _float(g, bn_weight), s)
    ms = g.op("Mul", _float(g, bn_mean), s)
    t = g.op("Neg", ms) if sh._is_none(bn_bias) else g.op("Sub", _float(g, bn_bias), ms)
    rank = sh._get_tensor_rank(weight)
    if rank is None:
        raise torch.onnx.errors.SymbolicValueError(
            "ncnnqat::fold_fake_quantize_weight: the weight's rank is unknown to the ONNX exporter", weight
        )
    w = g.op("Mul", _float(g, weight), _column(g, s, rank))
    b = t if sh._is_none(bias) else g.op("Add", t, g.op("Mul", _float(g, bias), s))
    w_fq, scales = _per_group(g, w, weight, num_groups, bits)
    return w_fq, b, scales


def _sym_threshold_from_log(g, log_threshold):  # noqa: ANN001, ANN202
    return g.op("Exp", _float(g, log_threshold))


def _sym_gemm(g, x, weight, bias):  # noqa: ANN001, ANN202
    """reference.fake_quantize_gemm: per-row int8 A, per-tensor int8 B, exact integer products,
    ``acc * (absmax_row * ((1 / 127) / b_scale)) + bias``."""
    sizes = sh._get_tensor_sizes(weight)
    if not sizes or any(d is None for d in sizes):
        raise torch.onnx.errors.SymbolicValueError("ncnnqat::fake_quantize_gemm: the weight's shape is unknown", weight)
    n, k = sizes
    qmax = reference.GEMM_QMAX
    rows = g.op("Reshape", _float(g, x), _const(g, [-1, k]))
    a_abs = _reduce_max(g, _finite_abs(g, rows), 1)
    qa = _levels(g, rows, g.op("Reshape", _scale(g, a_abs, qmax), _const(g, [-1, 1])), qmax)
    w = _float(g, weight)
    b_scale = _scale(g, _reduce_max(g, _finite_abs(g, w), None), qmax)
    qb = g.op("Transpose", _levels(g, w, b_scale, qmax), perm_i=[1, 0])
    if k <= reference._GEMM_F32_EXACT_K:
        acc = g.op("MatMul", qa, qb)
    else:  # float32 sums of int8 products stop being exact: float64, as the reference
        acc = _float(g, g.op("MatMul", g.op("Cast", qa, to_i=_DOUBLE), g.op("Cast", qb, to_i=_DOUBLE)))
    descale = g.op("Mul", a_abs, g.op("Div", g.op("Div", _const(g, 1.0), _const(g, qmax)), b_scale))
    y = g.op("Mul", acc, g.op("Reshape", descale, _const(g, [-1, 1])))
    if not sh._is_none(bias):
        y = g.op("Add", y, _float(g, bias))
    lead = g.op("Slice", g.op("Shape", x), _const(g, [0]), _const(g, [-1]))
    return g.op("Reshape", y, g.op("Concat", lead, _const(g, [n]), axis_i=0))


def _dynamic(g, x, dims: int, levels: bool):  # noqa: ANN001, ANN202
    """reference.dynamic_quantize over groups of the last ``dims`` dims: ``(levels int8, absmax,
    scale)``, or ``(level / scale`` float32, ``scale)``; a group holding a NaN gets NaN scales."""
    rank = sh._get_tensor_rank(x)
    if rank is None:
        raise torch.onnx.errors.SymbolicValueError("ncnnqat::dynamic_quantize: the input's rank is unknown", x)
    qmax = reference.GEMM_QMAX
    rows = g.op("Flatten", _float(g, x), axis_i=rank - dims)  # [groups, n]
    nan = g.op("Greater", _reduce_max(g, _float(g, g.op("IsNaN", rows)), 1), _const(g, 0.0))
    absmax = _reduce_max(g, _finite_abs(g, rows), 1)
    scale = _scale(g, absmax, qmax)
    col = g.op("Reshape", scale, _const(g, [-1, 1]))
    q = g.op("Where", g.op("Reshape", nan, _const(g, [-1, 1])), _const(g, 0.0), _levels(g, rows, col, qmax))
    lead = g.op("Slice", g.op("Shape", x), _const(g, [0]), _const(g, [rank - dims]))
    absmax, scale = (g.op("Reshape", g.op("Where", nan, _const(g, float("nan")), v), lead) for v in (absmax, scale))
    if levels:
        return g.op("Reshape", g.op("Cast", q, to_i=_INT8), g.op("Shape", x)), absmax, scale
    nan_col = g.op("Where", g.op("Reshape", nan, _const(g, [-1, 1])), _const(g, float("nan")), col)
    return g.op("Reshape", g.op("Div", q, nan_col), g.op("Shape", x)), scale


@sh.parse_args("v", "i")
def _sym_dynamic_quantize(g, x, dims: int):  # noqa: ANN001, ANN202
    return _dynamic(g, x, dims, True)


@sh.parse_args("v", "i")
def _sym_dynamic_fake_quantize(g, x, dims: int):  # noqa: ANN001, ANN202
    return _dynamic(g, x, dims, False)


SYMBOLICS: dict[str, Callable] = {
    "fake_quantize_per_tensor": _sym_per_tensor,
    "fake_quantize_per_channel": _sym_per_channel,
    "fold_fake_quantize_weight": _sym_fold,
    "threshold_from_log": _sym_threshold_from_log,
    "fake_quantize_gemm": _sym_gemm,
    "dynamic_quantize": _sym_dynamic_quantize,  # the int8 attention forms (ops/attention_reference.py)
    "dynamic_fake_quantize": _sym_dynamic_fake_quantize,
}
"""The ops a prepared model calls in eval mode, each with its TorchScript-exporter symbolic."""

DECOMPOSITIONS: dict[str, Callable] = {
    "fake_quantize_per_tensor": reference.fake_quantize_per_tensor,
    "fake_quantize_per_channel": reference.fake_quantize_per_channel,
    "fold_fake_quantize_weight": reference.fold_fake_quantize_weight,
    "threshold_from_log": reference.threshold_from_log,
    "fake_quantize_gemm": reference.fake_quantize_gemm,
    "dynamic_quantize": reference.dynamic_quantize,
    "dynamic_fake_quantize": reference.dynamic_fake_quantize,
}
"""The same ops as aten math, for exporters that decompose an exported program (dynamo ONNX)."""


def register() -> None:
    """Register the symbolics (opset >= :data:`OPSET`) and the decompositions (once per process)."""
    for name, fn in SYMBOLICS.items():
        torch.onnx.register_custom_op_symbolic(f"{_registry.NAMESPACE}::{name}", fn, OPSET)
    table = torch._decomp.decomposition_table
    for name, fn in DECOMPOSITIONS.items():
        op = getattr(torch.ops.ncnnqat, name).default
        if op not in table:
            register_decomposition(op)(fn)


register()


SCRIPT_REFUSAL = (
    "torch.jit.script cannot compile a QAT-prepared model (its layers' forwards are Python: "
    "fused kernels, ranges, BN statistics). Use torch.jit.trace(model.eval(), example) or "
    "torch.export.export(model.eval(), (example,)) (both keep the fake quantization; the file "
    "runs where lightning_ncnnqat is imported), torch.onnx.export / to_onnx (ONNX with the fake "
    "quantization as plain ONNX ops), lightning_ncnnqat.export(model, dir, example) for the "
    "ncnn int8 model, or lightning_ncnnqat.folded_float_model(model) for the float model"
)


def refuse_script(module: torch.nn.Module) -> torch.nn.Module:
    """``__prepare_scriptable__`` of the QAT modules: ``torch.jit.script`` (and Lightning's
    ``to_torchscript()``) calls it on every module before compiling, so a prepared model is
    refused in one line naming what works, instead of a TorchScript error on an annotation.

    Raises:
        UnsupportedModelError: always, naming ``module``'s class.
    """
    raise UnsupportedModelError(f"{type(module).__name__}: {SCRIPT_REFUSAL}")
