"""The modules QAT swaps in: input quantizers, fake-quantized Conv2d/Linear (folded BNs: ``bn_fold``).

Layers are converted in place by changing their class (as ``torch.nn.utils.parametrize`` does),
so every Parameter object stays the same: the optimizer, its state and DDP keep training it,
and checkpoints keep the user's keys (plus the quantizer buffers). Nothing ever overwrites a
float weight: the forward computes the fake-quantized weight from it and the straight-through
gradient flows back to it, so there is nothing to restore before ``optimizer.step`` and
gradient accumulation cannot corrupt a float copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ncnnqat import ops  # noqa: F401  (registers torch.ops.ncnnqat)
from lightning_ncnnqat.qat.bn_fold import FoldedBatchNorm, FoldedFrozenBatchNorm, stats_live
from lightning_ncnnqat.qat.computed_weights import refresh
from lightning_ncnnqat.qat.recompute import recomputing
from lightning_ncnnqat.ops.reference import fold_weight_bias, qmax_of, scale_from_absmax
from lightning_ncnnqat.ops.exporters import refuse_script


# The ops, resolved once (a call through torch.ops.ncnnqat.<name> resolves them on every call).
_UPDATE_ABSMAX = torch.ops.ncnnqat.update_absmax_.default
_PER_TENSOR = torch.ops.ncnnqat.fake_quantize_per_tensor.default
_PER_CHANNEL = torch.ops.ncnnqat.fake_quantize_per_channel.default
_FOLD = torch.ops.ncnnqat.fold_fake_quantize_weight.default
_EXP = torch.ops.ncnnqat.threshold_from_log.default


class _LearnedState:
    """A learned quantizer's threshold leaf, the buffer it mirrors, and whether it is initialised."""

    __slots__ = ("buffer", "leaf", "ready")

    def __init__(self, buffer: Tensor, leaf: Tensor, ready: bool) -> None:
        self.buffer = buffer
        self.leaf = leaf
        self.ready = ready


_LEARNED_KEY = "_ncnnqat_learned_state"
"""Key in a learned InputQuantizer's ``__dict__`` holding its :class:`_LearnedState`."""


class InputQuantizer(nn.Module):
    """Per-tensor input quantizer: a moving-average absmax range, or a learned threshold.

    One instance may be shared by several layers that read the same tensor (ncnn quantizes
    that blob once, with one scale); only the first reader (``update=True``) moves the range.
    ``running_absmax`` is -1 until the first training batch and is always the threshold the
    export writes (``scale() = qmax / running_absmax``).

    Moving average (``learned=False``, the default): under torch.distributed the updated range
    is all-reduced with MAX, which equals updating with the global batch absmax (the update is
    monotone in the batch absmax), so every rank holds the same range.

    Learned (``learned=True``, TQT / LSQ): the threshold ``t = exp(log_threshold)`` is trained by
    gradient descent on ``log t``. The extra persistent float32 ``[1]`` buffer ``log_threshold``
    (NaN until initialised) holds it; ``running_absmax`` always equals ``exp(log_threshold)``
    computed in float32 on the buffers' device (-1 while ``log_threshold`` is NaN), so the
    table carries exactly the value the forward uses. The first training batch of the first
    reader initialises it from the batch absmax (all-reduced with MAX when ``sync``), as the
    moving average does; afterwards every reader's training forward uses
    ``exp(threshold_leaf())`` so the threshold gets gradients from all of them (the exp is the
    opaque op ``ncnnqat::threshold_from_log``, ATen's exp even under torch.compile). The optimizer
    of the leaves is the caller's: after each of its steps call :meth:`commit_threshold`.
    Evaluation uses ``running_absmax``.
    """

    running_absmax: Tensor
    log_threshold: Tensor

    __prepare_scriptable__ = refuse_script

    def __init__(self, momentum: float = 0.1, bits: int = 8, sync: bool = True, learned: bool = False) -> None:
        super().__init__()
        self.momentum = float(momentum)
        self.bits = int(bits)
        self.sync = bool(sync)
        self.learned = bool(learned)
        self.register_buffer("running_absmax", torch.full((1,), -1.0, dtype=torch.float32))
        if self.learned:
            self.register_buffer("log_threshold", torch.full((1,), math.nan, dtype=torch.float32))
        self.record_stats = False  # set by the callback at its logging rate
        self.last_clip_fraction: Tensor | None = None

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202
        """Device moves apply; dtype casts do not: the thresholds stay float32, bit-exact, under
        ``.half()`` / ``.double()`` / ``.to(dtype)`` and Lightning's ``precision="*-true"``
        (``convert_module`` casts the whole model, after a checkpoint re-applied the plan): the
        ops compute scales in float32 and the table holds the float32 value."""
        before = {k: b for k, b in self._buffers.items() if b is not None}
        out = super()._apply(fn, recurse)
        for k, old in before.items():
            new = self._buffers[k]
            if new is not None and new.dtype != old.dtype:
                self._buffers[k] = old.to(device=new.device)
        return out

    def forward(self, x: Tensor, update: bool = True) -> Tensor:
        if update and self.training and recomputing():
            update = False  # a checkpoint's recompute in backward: this step's forward updated already
        if self.learned:
            return self._forward_learned(x, update)
        if self.training and update:
            _UPDATE_ABSMAX(x.detach(), self.running_absmax, self.momentum)
            if self._distributed():
                dist.all_reduce(self.running_absmax, op=dist.ReduceOp.MAX)
            if self.record_stats:
                self._record_clip_fraction(x, self.running_absmax)
        return _PER_TENSOR(x, self.running_absmax, self.bits)

    def _distributed(self) -> bool:
        return self.sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _record_clip_fraction(self, x: Tensor, threshold: Tensor) -> None:
        with torch.no_grad():
            v = x.detach().float().abs() * scale_from_absmax(threshold.detach(), self.bits)
            self.last_clip_fraction = (v >= qmax_of(self.bits) + 0.5).float().mean()

    def _forward_learned(self, x: Tensor, update: bool) -> Tensor:
        if not self.training:
            return _PER_TENSOR(x, self.running_absmax, self.bits)
        state = self._state()
        if not state.ready and update:
            self._initialise(x)
        if not state.ready:  # uninitialised (a reader before the first, or an all-zero batch): identity
            return _PER_TENSOR(x, self.running_absmax, self.bits)
        t = _EXP(state.leaf)  # the same float32 exp as running_absmax = exp(log_threshold), also compiled
        if self.record_stats and update:
            self._record_clip_fraction(x, t)
        return _PER_TENSOR(x, t, self.bits)

    def _initialise(self, x: Tensor) -> None:
        """Threshold = the batch's finite absmax (global MAX under torch.distributed), if > 0."""
        # float32 whatever the default dtype (Lightning's "*-true" forward_context sets it to bf16/fp16)
        b = torch.full((1,), -1.0, dtype=torch.float32, device=self.running_absmax.device)
        _UPDATE_ABSMAX(x.detach(), b, 1.0)  # from -1: b = the batch absmax, as the moving average's first batch
        if self._distributed():
            dist.all_reduce(b, op=dist.ReduceOp.MAX)
        if float(b.item()) > 0.0:  # one host read, once
            self.set_threshold(b)

    def _require_learned(self, what: str) -> None:
        if not self.learned:
            raise RuntimeError(f"InputQuantizer.{what}: this quantizer is not learned (learned=False)")

    def _state(self) -> _LearnedState:
        """The learned state, (re)created when missing or when ``log_threshold`` was replaced
        (a move to another device): a new leaf from ``log_threshold``, one host read."""
        buf = self._buffers["log_threshold"]
        state = self.__dict__.get(_LEARNED_KEY)
        if state is not None and state.buffer is buf and state.leaf.device == buf.device:
            return state
        leaf = buf.detach().float().clone().requires_grad_(True)
        state = _LearnedState(buf, leaf, bool(self.running_absmax.detach().reshape(-1)[0].item() >= 0.0))
        self.__dict__[_LEARNED_KEY] = state
        return state

    def threshold_leaf(self) -> Tensor:
        """The trainable ``log(threshold)``: a float32 ``[1]`` leaf tensor (requires grad) on the
        buffers' device, created from ``log_threshold`` on first use (NaN until initialised).

        Not a Parameter or buffer: the caller's optimizer owns it. The same tensor object is
        returned for the module's lifetime: initialisation, :meth:`set_threshold` and
        ``load_state_dict`` write into it in place; only moving the module to another device
        (which replaces the buffer) gives a new leaf, so compare identities to rebuild an optimizer.
        Raises RuntimeError when the quantizer is not learned.
        """
        self._require_learned("threshold_leaf")
        return self._state().leaf

    @torch.no_grad()
    def _sync_running(self) -> None:
        """running_absmax = exp(log_threshold) (float32, this device); -1 where it is NaN."""
        lt = self.log_threshold
        self.running_absmax.copy_(torch.where(torch.isnan(lt), torch.full_like(lt, -1.0), _EXP(lt)))

    @torch.no_grad()
    def set_threshold(self, t: float | Tensor) -> None:
        """Set the learned threshold: ``log_threshold = log(t)``, ``running_absmax =
        exp(log_threshold)`` (float32, on the buffers' device), and the leaf to ``log_threshold``.

        Raises RuntimeError when not learned; ValueError when ``t`` is not a finite float > 0.
        """
        self._require_learned("set_threshold")
        v = torch.as_tensor(t, dtype=torch.float32).detach().reshape(-1).to(self.log_threshold.device)
        value = float(v[0].item()) if v.numel() == 1 else math.nan
        if v.numel() != 1 or not (0.0 < value < math.inf):
            raise ValueError(f"InputQuantizer.set_threshold: `t` must be one finite float > 0, got {t!r}")
        self.log_threshold.copy_(torch.log(v))
        self.running_absmax.copy_(_EXP(self.log_threshold))
        state = self._state()
        state.leaf.copy_(self.log_threshold)
        state.ready = True

    @torch.no_grad()
    def commit_threshold(self) -> None:
        """After an optimizer step on the leaf: ``log_threshold = leaf`` and ``running_absmax =
        exp(leaf)`` (the exported threshold). No host synchronisation; a no-op before the leaf exists."""
        self._require_learned("commit_threshold")
        state = self.__dict__.get(_LEARNED_KEY)
        if state is None or state.buffer is not self._buffers["log_threshold"]:
            return
        self.log_threshold.copy_(state.leaf)
        self._sync_running()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # noqa: ANN001
        """Learned: ``log_threshold`` is the truth; ``running_absmax`` is recomputed from it on this
        device. A checkpoint without ``log_threshold`` (a moving-average run) starts the learned
        threshold from its ``running_absmax`` (``log`` of it; uninitialised when not > 0)."""
        key = prefix + "log_threshold"
        derive = self.learned and key not in state_dict and prefix + "running_absmax" in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not self.learned:
            return
        with torch.no_grad():
            if derive:
                if key in missing_keys:
                    missing_keys.remove(key)
                r = self.running_absmax
                self.log_threshold.copy_(torch.where(r > 0, torch.log(r), torch.full_like(r, math.nan)))
            self._sync_running()
            state = self.__dict__.get(_LEARNED_KEY)
            if state is not None and state.buffer is self._buffers["log_threshold"]:
                state.leaf.copy_(self.log_threshold)  # same leaf object: an optimizer over it stays valid
                state.ready = bool(self.running_absmax.reshape(-1)[0].item() >= 0.0)

    def scale(self) -> float:
        """The input scale ncnn's table carries: qmax / running_absmax."""
        return float(scale_from_absmax(self.running_absmax.detach().cpu(), self.bits).item())

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, bits={self.bits}, learned={self.learned}"


class _QATLayer:
    """Shared logic of the fake-quantized layers (mixed into Conv2d and Linear subclasses)."""

    weight: Tensor
    bias: Tensor | None
    input_quantizer: InputQuantizer
    weight_bits: int
    weight_groups: int
    updates_range: bool
    __prepare_scriptable__ = refuse_script  # torch.jit.script: one clear refusal (ops/exporters.py)

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
        if bn._forward_pre_hooks:  # a pruned / weight-normed BN: its gamma as its own call computes it
            refresh(bn)
        wq, b, _ = _FOLD(
            self.weight, self.bias, *bn.fold_args(), self.weight_groups, self.weight_bits
        )
        return wq, b

    def _folded_forward(self, x: Tensor, op: Callable[..., Tensor]) -> Tensor:
        """``op(x, w, b)`` with the fake-quantized (BN-folded) weight; in a training step while the
        folded BN's statistics still train (``QATConfig.freeze_bn_after``), BN's train-mode math
        around the same quantized weight (``_FoldedMixin.live_forward``)."""
        bn = self.folded_bn
        if bn is None or not self.training or not stats_live(bn):
            w, b = self.quantized_weight_bias()
            return op(x, w, b)
        if bn._forward_pre_hooks:
            refresh(bn)
        weight, bias = self.weight, self.bias

        def quantize(gamma: Tensor | None, beta: Tensor | None, mean: Tensor, inv_std: Tensor) -> Tensor:
            return _FOLD(weight, bias, gamma, beta, mean, inv_std, self.weight_groups, self.weight_bits)[0]

        return bn.live_forward(x, op, weight, bias, quantize)


class QATConv2d(_QATLayer, nn.Conv2d):
    """nn.Conv2d whose input and (BN-folded) weight are fake-quantized as ncnn int8 does."""

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_quantizer(x, self.updates_range)
        return self._folded_forward(x, self._conv_forward)


class QATLinear(_QATLayer, nn.Linear):
    """nn.Linear whose input and (BN-folded) weight are fake-quantized as ncnn int8 does."""

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_quantizer(x, self.updates_range)
        return self._folded_forward(x, F.linear)


__all__ = [
    "InputQuantizer", "QATConv2d", "QATLinear", "FoldedBatchNorm", "FoldedFrozenBatchNorm", "QAT_CLASSES", "ORIG_CLASS",
    "qat_class_for", "QATGemmLinear",
]

ORIG_CLASS = "_ncnnqat_orig_class"
"""Key in a converted module's ``__dict__`` holding the class it had before QAT."""

QAT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: QATConv2d, nn.Linear: QATLinear}


_PARAMETRIZED_QAT: dict[type[nn.Module], type[nn.Module]] = {}


def qat_class_for(m: nn.Module, base: type[nn.Module]) -> type[nn.Module]:
    """The class ``m`` (a ``base`` instance) gets under QAT: ``QAT_CLASSES[base]``, or for a module
    ``torch.nn.utils.parametrize`` has made ``Parametrized<Class>`` (whose ``weight`` is a property
    computed from ``parametrizations.weight.original*``) a subclass of the QAT class holding that
    class's properties, so the QAT forward reads the computed weight and gradients reach its
    sources (created once per class; torch makes one such class per module)."""
    qat = QAT_CLASSES[base]
    cls = type(m)
    if "parametrizations" not in m._modules or not cls.__name__.startswith("Parametrized"):
        return qat
    if cls not in _PARAMETRIZED_QAT:
        # torch made ``cls`` for this module alone (parametrize._inject_new_class) and keeps its
        # properties in its own __dict__: copied into a class whose single base is the QAT class,
        # so ``remove_parametrizations`` (which deletes the property from ``type(m)`` and then sets
        # the class to ``type(m).__bases__[0]``) leaves a plain QAT layer.
        own = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__", "__module__", "__doc__")}
        _PARAMETRIZED_QAT[cls] = type(f"QAT{cls.__name__}", (qat,), {**own, "__module__": __name__})
    return _PARAMETRIZED_QAT[cls]


_GEMM = torch.ops.ncnnqat.fake_quantize_gemm.default


class QATGemmLinear(nn.Linear):
    """nn.Linear on a 3-D/4-D input, computed as ncnn's int8 ``Gemm`` (pnnx writes it so).

    No input range and no table row: ncnn quantizes every row of the input at run time
    (``127 / absmax`` per row) and the weight with one scale for the whole tensor
    (``ops.fake_quantize_gemm``, bit-exact with ncnn's kernels). Swapped in by class like the
    other QAT layers (``qat/gemm.py``), so the Parameters stay the same objects.
    """

    __prepare_scriptable__ = refuse_script

    def forward(self, x: Tensor) -> Tensor:
        return _GEMM(x, self.weight, self.bias)
