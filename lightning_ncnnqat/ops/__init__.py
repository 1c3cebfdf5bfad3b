"""Fake-quantization ops that compute exactly what ncnn's int8 layers compute.

Public functions:

* :func:`fake_quantize_per_channel`: weights, one symmetric scale per group of dim 0;
* :func:`fake_quantize_per_tensor`: activations, one scale from a moving-average range.

Both are backed by ``torch.library`` custom ops (namespace ``ncnnqat``) with compiled CPU and
CUDA kernels and a pure-PyTorch reference (:mod:`lightning_ncnnqat.ops.reference`). QAT layers
also use ``torch.ops.ncnnqat.fold_fake_quantize_weight``, which folds a frozen BatchNorm into
the weight and bias and fake-quantizes the folded weight in one call (one launch pair on a GPU
instead of about ten small ops). Autograd of the ops is registered in C++ by the compiled
library, in Python when it is not loaded.
Inputs may be float32, float16 or bfloat16 of any rank and layout; math is float32, outputs
keep the input dtype and are contiguous.

ncnn's dynamic int8 (Gemm, MultiHeadAttention, SDPA: activations quantized at run time from their
own absmax) is :func:`dynamic_quantize` (int8 levels and scales) and :func:`dynamic_fake_quantize`
(float32, straight-through gradient), with compiled CPU / CUDA kernels too; :func:`fake_quantize_gemm`
and ``ops.attention_reference`` are built on them.

Gradients (straight-through estimator): weights pass their gradient unchanged (an absmax
scale never clips a weight). Activations pass it only where the value was not clipped at
+-qmax: there the forward is constant, so the true derivative is 0, and passing it (as
ncnnqat does) pushes outliers further out without any effect on the loss.

Learned ranges (TQT / LSQ): when the threshold tensor passed to
``torch.ops.ncnnqat.fake_quantize_per_tensor`` requires grad (e.g. ``log_t.exp()``), its
backward runs ``torch.ops.ncnnqat.fake_quantize_per_tensor_threshold_backward``, which returns
the clipped STE for ``x`` and ``d loss / d threshold = sum(grad * d out / d t)`` with
``d out / d t = (q - x*s) / qmax`` where kept and ``q / qmax = +-1`` where clipped (one pass, a
float32 sum). A threshold that does not require grad (the moving-average buffer) costs nothing
extra. :class:`lightning_ncnnqat.qat.modules.InputQuantizer` ``(learned=True)`` uses this.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_ncnnqat.ops import _registry, reference  # noqa: F401  (registers the ops)
from lightning_ncnnqat.ops import exporters  # noqa: F401  (the ops in torch.onnx / decompositions)
from lightning_ncnnqat.ops._registry import STATUS

__all__ = [
    "fake_quantize_per_channel",
    "fake_quantize_per_tensor",
    "fake_quantize_gemm",
    "dynamic_quantize",
    "dynamic_fake_quantize",
    "STATUS",
    "reference",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_common(op: str, t: Tensor, arg: str, bits: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: `{arg}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{op}: `{arg}` must be float32, float16 or bfloat16, got {t.dtype}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{op}: `bits` must be an int in [2, 8], got {bits!r}")


def fake_quantize_per_channel(weight: Tensor, num_groups: int, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Fake-quantize ``weight`` with one symmetric scale per group of dim 0.

    ``num_groups`` is ``out_channels`` for Conv2d/Linear and ``groups`` for depthwise and
    grouped convolutions. Returns ``(weight_fq, scales)``; ``scales[g] = qmax / absmax(group g)``
    (``qmax = 2**(bits-1) - 1``: 127 for 8 bits, 31 for the 6-bit 3x3 rule) is exactly the
    weight row of the ncnn table.
    """
    op = "fake_quantize_per_channel"
    _check_common(op, weight, "weight", bits)
    if weight.dim() == 0:
        raise ValueError(f"{op}: `weight` must have at least 1 dimension, got a scalar")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"{op}: `num_groups` must be a positive int, got {num_groups!r}")
    if weight.shape[0] % num_groups != 0:
        raise ValueError(
            f"{op}: `num_groups`={num_groups} must divide weight.shape[0]={weight.shape[0]}"
        )
    return torch.ops.ncnnqat.fake_quantize_per_channel(weight, num_groups, bits)


def fake_quantize_per_tensor(
    x: Tensor, running_absmax: Tensor, momentum: float, training: bool, bits: int = 8
) -> Tensor:
    """Fake-quantize ``x`` with one scale from the moving-average range ``running_absmax``.

    ``running_absmax`` is a 1-element float32 buffer, ``-1`` until initialised. In training it
    is first updated in place, ``r += momentum * (batch_absmax - r)`` (the first batch sets it),
    then ``x`` is quantized with the updated value; outside training it is left untouched. The
    scale used is ``qmax / running_absmax``, exactly the input row of the ncnn table.
    """
    op = "fake_quantize_per_tensor"
    _check_common(op, x, "x", bits)
    if (
        not isinstance(running_absmax, Tensor)
        or running_absmax.dtype != torch.float32
        or running_absmax.numel() != 1
    ):
        got = f"{running_absmax.dtype} of shape {tuple(running_absmax.shape)}" if isinstance(
            running_absmax, Tensor
        ) else type(running_absmax).__name__
        raise TypeError(f"{op}: `running_absmax` must be a 1-element float32 tensor, got {got}")
    if running_absmax.device != x.device:
        raise ValueError(
            f"{op}: `running_absmax` is on {running_absmax.device} but `x` is on {x.device}"
        )
    if training:
        if not isinstance(momentum, (int, float)) or isinstance(momentum, bool) or not 0.0 < momentum <= 1.0:
            raise ValueError(f"{op}: `momentum` must be a float in (0, 1], got {momentum!r}")
        torch.ops.ncnnqat.update_absmax_(x.detach(), running_absmax, float(momentum))
    return torch.ops.ncnnqat.fake_quantize_per_tensor(x, running_absmax, bits)


def fake_quantize_gemm(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """What ncnn's int8 ``Gemm`` computes for ``nn.Linear`` on a 3-D/4-D input (pnnx's Gemm).

    ``x [..., K]`` is quantized at run time, one scale ``127 / absmax`` per row (the last dim),
    ``weight [N, K]`` with one scale ``127 / absmax`` for the whole tensor; the int8 products are
    summed exactly (int32 in ncnn), dequantized per row and ``bias [N]`` is added in float32.
    Returns ``[..., N]`` in ``x``'s dtype (see :func:`reference.fake_quantize_gemm`: bit-exact with
    ncnn's x86 and aarch64 kernels). Gradients are straight-through for ``x``, ``weight``, ``bias``.

    Raises TypeError for a non-tensor or a dtype other than float32/16/bf16, ValueError naming the
    argument for shapes that do not fit (``weight`` not 2-D, ``x.shape[-1] != K``, ``bias`` not
    ``[N]``) or tensors on different devices.
    """
    op = "fake_quantize_gemm"
    _check_common(op, x, "x", 8)
    _check_common(op, weight, "weight", 8)
    if weight.dim() != 2:
        raise ValueError(f"{op}: `weight` must be 2-D [N, K], got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: `x` must end with K={weight.shape[1]} features, got shape {tuple(x.shape)}")
    if bias is not None:
        _check_common(op, bias, "bias", 8)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{op}: `bias` must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: `{name}` is on {t.device} but `x` is on {x.device}")
    return torch.ops.ncnnqat.fake_quantize_gemm(x, weight, bias)


def _check_dynamic(op: str, x: Tensor, dims: int) -> None:
    _check_common(op, x, "x", 8)
    if isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= x.dim():
        raise ValueError(f"{op}: `dims` must be an int in [1, x.dim()={x.dim()}], got {dims!r}")


def dynamic_quantize(x: Tensor, dims: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """ncnn's run-time int8 quantization (Gemm / MultiHeadAttention / SDPA activations): one scale
    ``127 / absmax`` per group of the last ``dims`` dims of ``x`` (1: per row, ``x.dim()``: per tensor).

    Returns ``(levels, absmax, scale)``: int8 ``[x.shape]`` and float32 ``[x.shape[:-dims]]``; a
    group holding a NaN has ``absmax = scale = NaN`` and levels 0 (:func:`reference.dynamic_quantize`).
    Not differentiable (:func:`dynamic_fake_quantize` is). Raises TypeError for a dtype other than
    float32/16/bf16, ValueError for ``dims`` outside ``[1, x.dim()]``.
    """
    _check_dynamic("dynamic_quantize", x, dims)
    return torch.ops.ncnnqat.dynamic_quantize(x, dims)


def dynamic_fake_quantize(x: Tensor, dims: int = 1) -> tuple[Tensor, Tensor]:
    """:func:`dynamic_quantize` dequantized: ``(levels / scale`` float32 ``[x.shape]``, ``scale)``.
    The gradient of ``x`` is straight-through (an absmax scale never clips); same errors."""
    _check_dynamic("dynamic_fake_quantize", x, dims)
    return torch.ops.ncnnqat.dynamic_fake_quantize(x, dims)
