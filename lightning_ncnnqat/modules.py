"""The modules QAT swaps in: input quantizers, fake-quantized Conv2d/Linear (folded BNs: ``bn_fold``).

Layers are converted in place by changing their class (as ``torch.nn.utils.parametrize`` does),
so every Parameter object stays the same: the optimizer, its state and DDP keep training it,
and checkpoints keep the user's keys (plus the quantizer buffers). Nothing ever overwrites a
float weight: the forward computes the fake-quantized weight from it and the straight-through
gradient flows back to it, so there is nothing to restore before ``optimizer.step`` and
gradient accumulation cannot corrupt a float copy.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops  # noqa: F401  (registers torch.ops.ncnnqat)
from .bn_fold import FoldedBatchNorm, FoldedFrozenBatchNorm
from .ops.reference import fold_weight_bias, qmax_of, scale_from_absmax


# The ops, resolved once (a call through torch.ops.ncnnqat.<name> resolves them on every call).
_UPDATE_ABSMAX = torch.ops.ncnnqat.update_absmax_.default
_PER_TENSOR = torch.ops.ncnnqat.fake_quantize_per_tensor.default
_PER_CHANNEL = torch.ops.ncnnqat.fake_quantize_per_channel.default
_FOLD = torch.ops.ncnnqat.fold_fake_quantize_weight.default


class InputQuantizer(nn.Module):
    """Per-tensor input quantizer with a moving-average absmax range.

    One instance may be shared by several layers that read the same tensor (ncnn quantizes
    that blob once, with one scale); only the first reader (``update=True``) moves the range.
    ``running_absmax`` is -1 until the first training batch. Under torch.distributed the
    updated range is all-reduced with MAX, which equals updating with the global batch absmax
    (the update is monotone in the batch absmax), so every rank holds the same range.
    """

    running_absmax: Tensor

    def __init__(self, momentum: float = 0.1, bits: int = 8, sync: bool = True) -> None:
        super().__init__()
        self.momentum = float(momentum)
        self.bits = int(bits)
        self.sync = bool(sync)
        self.register_buffer("running_absmax", torch.full((1,), -1.0))
        self.record_stats = False  # set by the callback at its logging rate
        self.last_clip_fraction: Tensor | None = None

    def forward(self, x: Tensor, update: bool = True) -> Tensor:
        if self.training and update:
            _UPDATE_ABSMAX(x.detach(), self.running_absmax, self.momentum)
            if self.sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(self.running_absmax, op=dist.ReduceOp.MAX)
            if self.record_stats:
                with torch.no_grad():
                    v = x.detach().float().abs() * scale_from_absmax(self.running_absmax, self.bits)
                    self.last_clip_fraction = (v >= qmax_of(self.bits) + 0.5).float().mean()
        return _PER_TENSOR(x, self.running_absmax, self.bits)

    def scale(self) -> float:
        """The input scale ncnn's table carries: qmax / running_absmax."""
        return float(scale_from_absmax(self.running_absmax.detach().cpu(), self.bits).item())

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, bits={self.bits}"


class _QATLayer:
    """Shared logic of the fake-quantized layers (mixed into Conv2d and Linear subclasses)."""

    weight: Tensor
    bias: Tensor | None
    input_quantizer: InputQuantizer
    weight_bits: int
    weight_groups: int
    updates_range: bool

    @property
    def folded_bn(self) -> FoldedBatchNorm | FoldedFrozenBatchNorm | None:
        return self.__dict__.get("_ncnnqat_folded_bn")

    def folded_weight_bias(self) -> tuple[Tensor, Tensor | None]:
        """Weight and bias with the folded BatchNorm applied (differentiable, float32 math).

        The same float32 operations as the fused training op, so an export of these weights
        quantizes to exactly the values the QAT forward used.
        """
        bn = self.folded_bn
        if bn is None:
            return self.weight, self.bias
        w, b = fold_weight_bias(self.weight, self.bias, *bn.fold_args())
        return w.to(self.weight.dtype), b.to(self.weight.dtype)

    def quantized_weight_bias(self) -> tuple[Tensor, Tensor | None]:
        """Fake-quantized (BN-folded) weight and the (folded) bias, as the forward uses them.

        One fused op (fold, per-group fake quantization, and in backward the straight-through
        gradients of weight, bias and BN affine): per layer one call instead of about ten small
        ops, which is what keeps the QAT step's host time near the float step's on a GPU.
        """
        bn = self.folded_bn
        if bn is None:
            wq, _ = _PER_CHANNEL(self.weight, self.weight_groups, self.weight_bits)
            return wq, self.bias
        wq, b, _ = _FOLD(
            self.weight, self.bias, *bn.fold_args(), self.weight_groups, self.weight_bits
        )
        return wq, b


class QATConv2d(_QATLayer, nn.Conv2d):
    """nn.Conv2d whose input and (BN-folded) weight are fake-quantized as ncnn int8 does."""

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_quantizer(x, self.updates_range)
        w, b = self.quantized_weight_bias()
        return self._conv_forward(x, w, b)


class QATLinear(_QATLayer, nn.Linear):
    """nn.Linear whose input and (BN-folded) weight are fake-quantized as ncnn int8 does."""

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_quantizer(x, self.updates_range)
        w, b = self.quantized_weight_bias()
        return F.linear(x, w, b)


__all__ = [
    "InputQuantizer", "QATConv2d", "QATLinear", "FoldedBatchNorm", "FoldedFrozenBatchNorm", "QAT_CLASSES", "ORIG_CLASS",
]

ORIG_CLASS = "_ncnnqat_orig_class"
"""Key in a converted module's ``__dict__`` holding the class it had before QAT."""

QAT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: QATConv2d, nn.Linear: QATLinear}
