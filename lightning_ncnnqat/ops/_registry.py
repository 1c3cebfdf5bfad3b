"""The ``ncnnqat`` operators: schema (defined once, here), fake kernels, autograd, fallback.

Compiled kernels (``csrc/``) register CPU and CUDA implementations of these schemas when
their libraries load (``_cpp_lib``). The pure-PyTorch reference is registered as the
``CompositeExplicitAutograd`` kernel, so any device without a compiled kernel still computes
the same numbers; a backend kernel, when present, takes precedence over it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _cpp_lib, reference

NAMESPACE = "ncnnqat"

SCHEMAS = {
    "fake_quantize_per_channel": "fake_quantize_per_channel(Tensor weight, int num_groups, int bits) -> (Tensor, Tensor)",
    "update_absmax_": "update_absmax_(Tensor x, Tensor(a!) running_absmax, float momentum) -> ()",
    "fake_quantize_per_tensor": "fake_quantize_per_tensor(Tensor x, Tensor running_absmax, int bits) -> Tensor",
    "fake_quantize_per_tensor_backward": (
        "fake_quantize_per_tensor_backward(Tensor grad, Tensor x, Tensor running_absmax, int bits) -> Tensor"
    ),
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


# Autograd: straight-through estimators.
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
    grad_x = torch.ops.ncnnqat.fake_quantize_per_tensor_backward(grad, x, running_absmax, ctx.bits)
    return grad_x, None, None


torch.library.register_autograd(
    f"{NAMESPACE}::fake_quantize_per_channel", _per_channel_backward, setup_context=_per_channel_setup
)
torch.library.register_autograd(
    f"{NAMESPACE}::fake_quantize_per_tensor", _per_tensor_backward, setup_context=_per_tensor_setup
)
