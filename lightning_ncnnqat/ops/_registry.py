"""The ``ncnnqat`` operators: schema (defined once, here), fake kernels, autograd, fallback.

Compiled kernels (``csrc/``) register CPU and CUDA implementations of these schemas when
their libraries load (``_cpp_lib``). The pure-PyTorch reference is registered as the
``CompositeExplicitAutograd`` kernel, so any device without a compiled kernel still computes
the same numbers; a backend kernel, when present, takes precedence over it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_ncnnqat.ops import _cpp_lib, dynamic_int8, reference

NAMESPACE = "ncnnqat"

SCHEMAS = {
    "fake_quantize_per_channel": "fake_quantize_per_channel(Tensor weight, int num_groups, int bits) -> (Tensor, Tensor)",
    "update_absmax_": "update_absmax_(Tensor x, Tensor(a!) running_absmax, float momentum) -> ()",
    "fake_quantize_per_tensor": "fake_quantize_per_tensor(Tensor x, Tensor running_absmax, int bits) -> Tensor",
    "fake_quantize_per_tensor_backward": (
        "fake_quantize_per_tensor_backward(Tensor grad, Tensor x, Tensor running_absmax, int bits) -> Tensor"
    ),
    "fake_quantize_per_tensor_threshold_backward": (
        "fake_quantize_per_tensor_threshold_backward(Tensor grad, Tensor x, Tensor running_absmax, int bits) "
        "-> (Tensor, Tensor)"
    ),
    "threshold_from_log": "threshold_from_log(Tensor log_threshold) -> Tensor",
    "fold_fake_quantize_weight": (
        "fold_fake_quantize_weight(Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "
        "Tensor bn_mean, Tensor bn_inv_std, int num_groups, int bits) -> (Tensor, Tensor, Tensor)"
    ),
    "fold_fake_quantize_weight_backward": (
        "fold_fake_quantize_weight_backward(Tensor grad_weight_fq, Tensor grad_bias, Tensor weight, Tensor? bias, "
        "Tensor? bn_weight, Tensor bn_mean, Tensor bn_inv_std) -> (Tensor, Tensor)"
    ),
    # ncnn's dynamic int8 (Gemm / MHA / SDPA activations): one scale per group of the last `dims` dims
    "dynamic_quantize": "dynamic_quantize(Tensor x, int dims) -> (Tensor, Tensor, Tensor)",
    "dynamic_fake_quantize": "dynamic_fake_quantize(Tensor x, int dims) -> (Tensor, Tensor)",
    # ncnn's int8 Gemm (Linear on 3-D/4-D input): dynamic per-row A, per-tensor B (ops/dynamic_int8.py)
    "fake_quantize_gemm": "fake_quantize_gemm(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
}

_lib = torch.library.Library(NAMESPACE, "DEF")
for _schema in SCHEMAS.values():
    _lib.define(_schema)

STATUS = _cpp_lib.load()

# Reference kernels: used wherever no compiled backend kernel is registered.
_lib.impl("fake_quantize_per_channel", reference.fake_quantize_per_channel, "CompositeExplicitAutograd")
_lib.impl("update_absmax_", reference.update_absmax_, "CompositeExplicitAutograd")
_lib.impl("fake_quantize_per_tensor", reference.fake_quantize_per_tensor, "CompositeExplicitAutograd")
_lib.impl(
    "fake_quantize_per_tensor_backward", reference.fake_quantize_per_tensor_backward, "CompositeExplicitAutograd"
)
_lib.impl(
    "fake_quantize_per_tensor_threshold_backward",
    reference.fake_quantize_per_tensor_threshold_backward,
    "CompositeExplicitAutograd",
)
if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::threshold_from_log", "CompositeExplicitAutograd"):
    # The compiled library registers ATen's exp in C++ (csrc/autograd.cpp): no Python per call.
    _lib.impl("threshold_from_log", reference.threshold_from_log, "CompositeExplicitAutograd")
_lib.impl("fold_fake_quantize_weight", reference.fold_fake_quantize_weight, "CompositeExplicitAutograd")
_lib.impl(
    "fold_fake_quantize_weight_backward", reference.fold_fake_quantize_weight_backward, "CompositeExplicitAutograd"
)


# Fake (meta) kernels: shapes and dtypes only, so torch.compile can trace the ops.
# Every real kernel returns contiguous outputs.
@torch.library.register_fake(f"{NAMESPACE}::fake_quantize_per_channel")
def _fake_per_channel(weight: Tensor, num_groups: int, bits: int) -> tuple[Tensor, Tensor]:
    return weight.new_empty(weight.shape), weight.new_empty((num_groups,), dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::update_absmax_")
def _fake_update(x: Tensor, running_absmax: Tensor, momentum: float) -> None:
    return None


@torch.library.register_fake(f"{NAMESPACE}::fake_quantize_per_tensor")
def _fake_per_tensor(x: Tensor, running_absmax: Tensor, bits: int) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.register_fake(f"{NAMESPACE}::fake_quantize_per_tensor_backward")
def _fake_per_tensor_bwd(grad: Tensor, x: Tensor, running_absmax: Tensor, bits: int) -> Tensor:
    return grad.new_empty(grad.shape)


@torch.library.register_fake(f"{NAMESPACE}::fake_quantize_per_tensor_threshold_backward")
def _fake_per_tensor_threshold_bwd(grad: Tensor, x: Tensor, running_absmax: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    return grad.new_empty(grad.shape), running_absmax.new_empty(running_absmax.shape, dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::threshold_from_log")
def _fake_threshold_from_log(log_threshold: Tensor) -> Tensor:
    return log_threshold.new_empty(log_threshold.shape)


@torch.library.register_fake(f"{NAMESPACE}::fold_fake_quantize_weight")
def _fake_fold(weight, bias, bn_weight, bn_bias, bn_mean, bn_inv_std, num_groups, bits):  # noqa: ANN001, ANN202
    return (
        weight.new_empty(weight.shape),
        weight.new_empty((weight.shape[0],)),
        weight.new_empty((num_groups,), dtype=torch.float32),
    )


@torch.library.register_fake(f"{NAMESPACE}::fold_fake_quantize_weight_backward")
def _fake_fold_bwd(grad_weight_fq, grad_bias, weight, bias, bn_weight, bn_mean, bn_inv_std):  # noqa: ANN001, ANN202
    return weight.new_empty(weight.shape), weight.new_empty((3, weight.shape[0]), dtype=torch.float32)


# Autograd: straight-through estimators; a per-tensor threshold that requires grad (a learned
# range) gets d out / d t (fake_quantize_per_tensor_threshold_backward), a buffer costs nothing
# extra. The compiled CPU library registers them in C++
# (csrc/autograd.cpp: no Python on the training step's hot path); these Python versions are
# registered only where it did not load (the pure-PyTorch fallback).
def _per_channel_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.mark_non_differentiable(output[1])  # the scales are a statistic, not a function to train


def _per_channel_backward(ctx, grad_w: Tensor, grad_scales: Tensor):  # noqa: ANN001
    # Weight scales come from absmax, so |w * scale| <= qmax: no weight is ever clipped and the
    # plain STE (gradient passes unchanged) is exact for the clamp; only rounding is skipped.
    return grad_w, None, None


def _per_tensor_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, running_absmax, bits = inputs
    ctx.bits = bits
    ctx.save_for_backward(x, running_absmax)


def _per_tensor_backward(ctx, grad: Tensor):  # noqa: ANN001
    x, running_absmax = ctx.saved_tensors
    if ctx.needs_input_grad[1]:  # a learned threshold (TQT/LSQ): both gradients in one pass
        grad_x, grad_t = torch.ops.ncnnqat.fake_quantize_per_tensor_threshold_backward(
            grad, x, running_absmax, ctx.bits
        )
        return (grad_x if ctx.needs_input_grad[0] else None), grad_t, None
    grad_x = torch.ops.ncnnqat.fake_quantize_per_tensor_backward(grad, x, running_absmax, ctx.bits)
    return grad_x, None, None


def _threshold_from_log_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.save_for_backward(output)


def _threshold_from_log_backward(ctx, grad: Tensor):  # noqa: ANN001
    (out,) = ctx.saved_tensors
    return grad * out  # d/dx exp(x) = exp(x)


def _fold_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    weight, bias, bn_weight, bn_bias, bn_mean, bn_inv_std, _, _ = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.has = (bias is not None, bn_weight is not None, bn_bias is not None)
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (bias, bn_weight, bn_bias))
    ctx.save_for_backward(weight, bias, bn_weight, bn_mean, bn_inv_std)


def _fold_backward(ctx, grad_wq: Tensor, grad_b: Tensor, grad_scales: Tensor):  # noqa: ANN001
    weight, bias, bn_weight, bn_mean, bn_inv_std = ctx.saved_tensors
    if grad_wq is None:
        grad_wq = torch.zeros_like(weight)
    if grad_b is None:
        grad_b = weight.new_zeros((weight.shape[0],))
    grad_w, vecs = torch.ops.ncnnqat.fold_fake_quantize_weight_backward(
        grad_wq, grad_b, weight, bias, bn_weight, bn_mean, bn_inv_std
    )
    grads = [vecs[i].to(dt) if has else None for i, (has, dt) in enumerate(zip(ctx.has, ctx.dtypes))]
    return (grad_w, *grads, None, None, None, None)


AUTOGRAD_IN_CPP = torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::fake_quantize_per_tensor", "Autograd")
"""True when the compiled library registered the autograd of the ops (csrc/autograd.cpp)."""

if not AUTOGRAD_IN_CPP:
    torch.library.register_autograd(
        f"{NAMESPACE}::fake_quantize_per_channel", _per_channel_backward, setup_context=_per_channel_setup
    )
    torch.library.register_autograd(
        f"{NAMESPACE}::fake_quantize_per_tensor", _per_tensor_backward, setup_context=_per_tensor_setup
    )
    torch.library.register_autograd(
        f"{NAMESPACE}::fold_fake_quantize_weight", _fold_backward, setup_context=_fold_setup
    )
if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::threshold_from_log", "Autograd"):
    torch.library.register_autograd(
        f"{NAMESPACE}::threshold_from_log", _threshold_from_log_backward, setup_context=_threshold_from_log_setup
    )


# --- Dynamic int8: CPU/CUDA kernels where built (csrc/fake_quant_cpu_dynamic.cpp, csrc/cuda/) ----
_lib.impl("dynamic_quantize", reference.dynamic_quantize, "CompositeExplicitAutograd")
_lib.impl("dynamic_fake_quantize", reference.dynamic_fake_quantize, "CompositeExplicitAutograd")


@torch.library.register_fake(f"{NAMESPACE}::dynamic_quantize")
def _fake_dynamic(x: Tensor, dims: int) -> tuple[Tensor, Tensor, Tensor]:
    lead = x.shape[: x.dim() - dims]
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(lead, dtype=torch.float32), x.new_empty(
        lead, dtype=torch.float32
    )


@torch.library.register_fake(f"{NAMESPACE}::dynamic_fake_quantize")
def _fake_dynamic_fq(x: Tensor, dims: int) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=torch.float32), x.new_empty(x.shape[: x.dim() - dims], dtype=torch.float32)


def _dynamic_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.mark_non_differentiable(*output)  # int8 levels and their statistics: no gradient


def _dynamic_backward(ctx, *grads: Tensor):  # noqa: ANN001, ANN202
    return None, None


def _dynamic_fq_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.x_dtype = inputs[0].dtype
    ctx.mark_non_differentiable(output[1])


def _dynamic_fq_backward(ctx, grad: Tensor, grad_scale: Tensor):  # noqa: ANN001, ANN202
    # straight-through: an absmax scale never clips, so only the rounding is skipped
    return grad.to(ctx.x_dtype), None


# Python autograd on every build: the forms call these ops below autograd (the Gemm op) or under
# no_grad (attention), so no training step pays for it per call.
torch.library.register_autograd(f"{NAMESPACE}::dynamic_quantize", _dynamic_backward, setup_context=_dynamic_setup)
torch.library.register_autograd(
    f"{NAMESPACE}::dynamic_fake_quantize", _dynamic_fq_backward, setup_context=_dynamic_fq_setup
)


# --- Gemm int8 (Linear on 3-D/4-D input): composed of the dynamic ops (ops/dynamic_int8.py) -------
_lib.impl("fake_quantize_gemm", dynamic_int8.fake_quantize_gemm, "CompositeExplicitAutograd")


@torch.library.register_fake(f"{NAMESPACE}::fake_quantize_gemm")
def _fake_gemm(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _gemm_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _gemm_backward(ctx, grad: Tensor):  # noqa: ANN001
    # straight-through: the fake-quantized operands are recomputed from the saved float inputs
    x, weight = ctx.saved_tensors
    gx, gw, gb = dynamic_int8.fake_quantize_gemm_backward(grad, x, weight, ctx.has_bias)
    need = ctx.needs_input_grad
    return (gx if need[0] else None), (gw if need[1] else None), (gb if need[2] else None)


torch.library.register_autograd(f"{NAMESPACE}::fake_quantize_gemm", _gemm_backward, setup_context=_gemm_setup)
