"""BatchNorm-like modules: recognising BN math, folding it into the layer before, unfolding it.

ncnn's converters (onnxsim's conv-BN fusion, pnnx) fold any batch normalization that alone reads
a Conv/Gemm output into that layer, whatever module computed it. So QAT must fold the same
modules, or the calibration table it writes would belong to weights the converter never emits.
A module is folded when its *eval-mode math* is BN, checked numerically on a probe tensor:
``module(x) == tail(F.batch_norm(x, running_mean, running_var, weight, bias, eps))`` where the
tail is nothing or the module's own submodules in order (timm's ``BatchNormAct2d``: BN, then
``drop``, then ``act``). Candidates are every ``_BatchNorm`` subclass (``SyncBatchNorm``, bare
subclasses) and modules holding ``running_mean``/``running_var`` tensors (torchvision's
``FrozenBatchNorm2d``, whose gamma/beta are buffers). Names are never trusted alone.

Folding changes the module's class in place (parameters and buffers kept, so checkpoint keys
stay the user's) to one whose forward is only the tail; the original class is recorded so
:func:`unfold_bn` restores it exactly.

A folded module is no longer a ``_BatchNorm``: it normalises nothing, and once frozen its
statistics are constants of the fold the weights were trained with. Every utility that picks
BatchNorms by class to reset or re-estimate statistics (``torch.optim.swa_utils.update_bn``,
Lightning's ``StochasticWeightAveraging``, which set them to mean 0 / var 1 and re-estimate them
in train mode, ``SyncBatchNorm.convert_sync_batchnorm``) therefore leaves it alone; had it still
been one, the reset would stick (a folded module never runs BN in train mode) and the fold, the
accuracy and the export would be built from mean 0 / var 1.

Statistics can keep training for a while after QAT starts (``QATConfig.freeze_bn_after``, the
QAT literature's delayed ``freeze_bn_stats``): while :func:`stats_live`, the layer's training
forward normalises with batch statistics and updates the running ones (:meth:`_FoldedMixin.live_forward`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ncnnqat.qat.recompute import recomputing

_ORIG = "_ncnnqat_orig_class"
_TAIL = "_ncnnqat_tail"
_EPS = "_ncnnqat_eps"
_HOOK = "_ncnnqat_load_hook"
_LIVE = "_ncnnqat_stats_live"  # True while the statistics still train (QATConfig.freeze_bn_after)
_PROBE_SPATIAL = 6  # BN math is per channel and elementwise: a small probe map decides it


@dataclass(frozen=True)
class BNMatch:
    """How a BN-like module computes in eval mode: batch_norm with ``eps``, then its children ``tail``."""

    eps: float
    tail: tuple[str, ...] = ()


def _vec(m: nn.Module, name: str) -> Tensor | None:
    t = getattr(m, name, None)
    return t if isinstance(t, Tensor) and t.dim() == 1 else None


def is_bn_like(m: nn.Module) -> bool:
    """A ``_BatchNorm`` (any subclass) or a module holding 1-D ``running_mean``/``running_var`` tensors."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return True
    rm, rv = _vec(m, "running_mean"), _vec(m, "running_var")
    return rm is not None and rv is not None and rm.shape == rv.shape


def is_folded(m: nn.Module) -> bool:
    """Whether ``m`` is a BN-like module folded by :func:`fold_bn` (QAT layers also record their
    original class under the same key, so the class decides)."""
    return isinstance(m, _FoldedMixin)


def _tail_candidates(m: nn.Module) -> list[tuple[str, ...]]:
    children = tuple(n for n, _ in m.named_children())
    cands: list[tuple[str, ...]] = [()]
    for c in (children, tuple(n for n in ("drop", "act") if n in children), ("act",) if "act" in children else ()):
        if c and c not in cands:
            cands.append(c)
    return cands


def _apply_tail(m: nn.Module, tail: tuple[str, ...], x: Tensor) -> Tensor:
    for name in tail:
        x = m._modules[name](x)  # type: ignore[misc]
    return x


def _probe(m: nn.Module, input_shape: tuple[int, ...], channels: int) -> Tensor:
    rm, rv = m.running_mean, m.running_var  # type: ignore[union-attr]
    shape = [2, channels] + [min(s, _PROBE_SPATIAL) for s in input_shape[2:]]
    g = torch.Generator(device="cpu").manual_seed(1234)
    z = torch.randn(shape, generator=g, dtype=torch.float32).to(rm.device, rm.dtype)
    view = [1, channels] + [1] * (len(shape) - 2)
    std = torch.sqrt(rv.detach().clamp_min(0) + 1e-5).reshape(view)
    return rm.detach().reshape(view) + 2 * std * z  # both signs after BN: an activation shows


def match_bn(m: nn.Module, input_shape: tuple[int, ...]) -> tuple[BNMatch | None, str]:
    """``(match, "")`` if ``m`` computes BN (plus a known tail) in eval mode, else ``(None, reason)``.

    ``input_shape`` is the shape ``m`` was called with in the traced forward (N, C, ...). Runs
    ``m`` once per candidate in eval mode under no_grad; no state changes (eval BN moves no
    statistics; the train flags are restored).
    """
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and (not m.track_running_stats or m.running_var is None):
        return None, "does not track running statistics (uses batch statistics in eval too)"
    rm, rv = _vec(m, "running_mean"), _vec(m, "running_var")
    if rm is None or rv is None:
        return None, "has no running_mean/running_var"
    if len(input_shape) < 2 or input_shape[1] != rm.numel():
        return None, f"input of shape {tuple(input_shape)} does not match its {rm.numel()} channels"
    if not rm.is_floating_point():
        return None, f"running statistics of dtype {rm.dtype}"
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    w = w if isinstance(w, Tensor) else None
    b = b if isinstance(b, Tensor) else None
    eps_attr = getattr(m, "eps", None)
    eps_cands = [float(eps_attr)] if isinstance(eps_attr, (int, float)) else [1e-5, 0.0]
    x = _probe(m, input_shape, rm.numel())
    modes = {mod: mod.training for mod in m.modules()}
    try:
        m.eval()
        with torch.no_grad():
            try:
                y = m(x)
            except Exception as exc:  # noqa: BLE001 - the user's module on a probe input may raise anything: not BN math
                return None, f"its eval forward failed on a probe input ({type(exc).__name__}: {exc})"
            if not isinstance(y, Tensor) or y.shape != x.shape:
                return None, "its eval output is not one tensor of its input's shape"
            best: tuple[float, BNMatch] | None = None  # the closest candidate (eps 0 vs 1e-5 differ by ~1e-5)
            for eps in eps_cands:
                bn = F.batch_norm(x, rm, rv, w, b, False, 0.0, eps)
                for tail in _tail_candidates(m):
                    ref = _apply_tail(m, tail, bn.clone())
                    if not isinstance(ref, Tensor) or ref.shape != y.shape:
                        continue
                    tol = 1e-5 * max(1.0, float(ref.abs().max()))
                    err = float((y - ref).abs().max())
                    if torch.allclose(y, ref, rtol=1e-4, atol=tol) and (best is None or err < best[0]):
                        best = (err, BNMatch(eps, tail))
            if best is not None:
                return best[1], ""
    finally:
        for mod, mode in modes.items():
            mod.training = mode
    return None, "its eval output is not batch_norm(x) (followed by its own submodules)"


def _refresh_inv_std(module: nn.Module, incompatible_keys: object = None) -> None:
    """Recompute the cached 1/sqrt(var + eps) after the frozen statistics were (re)loaded.

    Computed on the CPU in float64 and rounded once: the same bits whatever the device (on an
    H100, torch.rsqrt differed from the CPU's in about 30% of values, float32 1/sqrt in 0.5%;
    this path in none of 12M). So a model trained on a GPU and exported on a CPU folds to the
    same weights. Runs only when a BN is folded or its statistics are loaded, not per step.
    """
    with torch.no_grad():
        rv = module.running_var
        var = rv.detach().to("cpu", torch.float64)
        inv = (1.0 / torch.sqrt(var + module.__dict__[_EPS])).to(rv.dtype)
        module.inv_std = inv.to(rv.device)


class _FoldedMixin:
    """Shared behaviour of folded BN-like modules: forward is the tail, statistics frozen.

    ``training`` follows the model as any module's does; it changes nothing here. The statistics
    train only while :func:`stats_live` (set by :func:`set_stats_live`), in the layer's forward.
    """

    inv_std: Tensor
    running_mean: Tensor
    running_var: Tensor
    _modules: dict[str, nn.Module]

    def forward(self, x: Tensor) -> Tensor:
        for name in self.__dict__.get(_TAIL, ()):
            x = self._modules[name](x)
        return x

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        # The user's class's loading rules (e.g. FrozenBatchNorm2d drops num_batches_tracked),
        # run with the user's class in place so its zero-argument super() works.
        folded, orig = self.__class__, self.__dict__[_ORIG]
        self.__class__ = orig
        try:
            orig._load_from_state_dict(self, *args, **kwargs)
        finally:
            self.__class__ = folded

    def fold_args(self) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:
        """(gamma, beta, running_mean, inv_std): the operands of the fold (gamma/beta None without affine)."""
        w, b = getattr(self, "weight", None), getattr(self, "bias", None)
        return (w if isinstance(w, Tensor) else None, b if isinstance(b, Tensor) else None, self.running_mean,
                self.inv_std)

    def extra_repr(self) -> str:
        live = ", statistics training" if self.__dict__.get(_LIVE) else ""
        return f"folded {self.__dict__[_ORIG].__name__}, tail={list(self.__dict__.get(_TAIL, ()))}{live}"

    def live_forward(self, x: Tensor, op: Callable[..., Tensor], weight: Tensor, bias: Tensor | None,
                     quantize: Callable[..., Tensor]) -> Tensor:
        """Training output of the layer ``op`` (``F.linear`` or a conv: ``op(x, w, b)``) followed by
        this BN while its statistics train: torch.ao's ConvBn QAT math (``_forward_slow``).

        The layer runs once in float to give the batch statistics (mean and biased variance over
        every dim but 1, differentiable, as BN trains); the running statistics take a momentum
        step from them; the weight is folded with the *running* statistics and fake-quantized
        (``quantize(gamma, beta, mean, inv_std)`` returns it: what ncnn will run), and its output
        is rescaled by ``running_std / batch_std`` and shifted by ``beta - gamma * batch_mean /
        batch_std``, which is exactly BN in train mode up to the weight's quantization. The
        layer's own bias cancels in train-mode BN (it enters the running mean only).
        """
        raw = op(x, weight, None)
        dims = [0] + list(range(2, raw.dim()))
        shape = [1, -1] + [1] * (raw.dim() - 2)
        r32 = raw.float()
        mean = r32.mean(dims)
        var = (r32 - mean.reshape(shape)).square().mean(dims)
        if not recomputing():  # a checkpoint's recompute folds with the statistics its forward left
            with torch.no_grad():
                shift = 0.0 if bias is None else bias.detach().float()
                self._momentum_step(mean.detach() + shift, var.detach(), raw.numel() // max(raw.shape[1], 1))
        gamma, beta, rmean, inv_std = self.fold_args()
        # clones: the next step updates the statistics in place before this graph's backward may run
        wq = quantize(gamma, beta, rmean.clone(), inv_std)
        y = op(x, wq, None)
        std = torch.sqrt(var + self.__dict__[_EPS])
        g = torch.ones_like(std) if gamma is None else gamma.float()
        b = torch.zeros_like(std) if beta is None else beta.float()
        unscale = 1.0 / (inv_std.float() * std)  # running_std / batch_std
        return y * unscale.reshape(shape).to(y.dtype) + (b - g * mean / std).reshape(shape).to(y.dtype)

    def _momentum_step(self, mean: Tensor, var: Tensor, n: int) -> None:
        """BN's running-statistics update (``momentum`` None: cumulative average, as
        ``_BatchNorm.forward``; unbiased variance), then a new ``inv_std`` (a new tensor: the
        previous one may be saved by a graph not yet back-propagated)."""
        tracked = getattr(self, "num_batches_tracked", None)
        if isinstance(tracked, Tensor):
            tracked.add_(1)
        momentum = getattr(self, "momentum", 0.1)
        if momentum is None:
            factor = 1.0 / float(tracked.item()) if isinstance(tracked, Tensor) else 0.1
        else:
            factor = float(momentum)
        unbiased = var * (n / (n - 1)) if n > 1 else var
        rm, rv = self.running_mean, self.running_var
        rm.mul_(1 - factor).add_(mean.to(rm.dtype), alpha=factor)
        rv.mul_(1 - factor).add_(unbiased.to(rv.dtype), alpha=factor)
        self._buffers["inv_std"] = (1.0 / torch.sqrt(rv.double() + self.__dict__[_EPS])).to(rv.dtype)


class FoldedBatchNorm(_FoldedMixin, nn.Module):
    """A ``_BatchNorm`` (any subclass) folded into the layer before it: its forward is only its tail.

    Its affine parameters stay registered and keep training through the folded weight of
    that layer, so every parameter the optimizer and DDP know is still used. The frozen
    ``1/sqrt(running_var + eps)`` is cached (a non-persistent buffer, refreshed whenever a state
    dict is loaded); the fold itself runs inside the layer's fused weight op. Not a
    ``_BatchNorm`` subclass (see the module docstring): statistics resets leave it alone.
    """


class FoldedFrozenBatchNorm(_FoldedMixin, nn.Module):
    """A BN-like module that is not a ``_BatchNorm`` (torchvision's ``FrozenBatchNorm2d``), folded."""


def stats_live(bn: nn.Module) -> bool:
    """Whether the folded ``bn``'s statistics still train (see :func:`set_stats_live`)."""
    return bool(bn.__dict__.get(_LIVE, False))


def can_train_stats(bn: nn.Module) -> bool:
    """Whether a folded module's statistics may train: its own class was a ``_BatchNorm`` that
    tracks running statistics (a frozen BN such as ``FrozenBatchNorm2d`` never trains them)."""
    orig = bn.__dict__.get(_ORIG)
    return (
        orig is not None
        and issubclass(orig, nn.modules.batchnorm._BatchNorm)
        and bool(getattr(bn, "track_running_stats", False))
    )


def set_stats_live(bn: nn.Module, live: bool) -> bool:
    """Let a folded ``bn``'s statistics train (``live=True``: the layer's training forward uses
    batch statistics and updates the running ones) or freeze them (the cached ``inv_std`` is
    recomputed exactly, :func:`_refresh_inv_std`). Returns whether the module is live afterwards
    (never for modules that cannot train statistics, :func:`can_train_stats`)."""
    if not is_folded(bn):
        raise ValueError(f"set_stats_live: {type(bn).__name__} is not a folded BatchNorm")
    live = bool(live) and can_train_stats(bn)
    was = stats_live(bn)
    bn.__dict__[_LIVE] = live
    if was and not live:
        _refresh_inv_std(bn)
    return live


def set_bn_stats_frozen(model: nn.Module, frozen: bool = True) -> int:
    """Freeze (or let train) the statistics of every folded BatchNorm in ``model``; returns how
    many folded modules are live afterwards. Without a Trainer, a model prepared with
    ``QATConfig(freeze_bn_after=n)`` keeps training its statistics until this is called."""
    return sum(set_stats_live(m, not frozen) for m in model.modules() if is_folded(m))


def fold_bn(bn: nn.Module, match: BNMatch | None = None) -> nn.Module:
    """Fold ``bn`` in place (class changed, parameters and buffers kept); idempotent.

    ``match`` (from :func:`match_bn`) gives eps and the tail; default: the module's ``eps``, no tail.
    """
    if is_folded(bn):
        return bn
    match = match or BNMatch(float(getattr(bn, "eps", 1e-5)))
    orig = type(bn)
    bn.__dict__[_ORIG] = orig
    bn.__dict__[_TAIL] = tuple(match.tail)
    bn.__dict__[_EPS] = float(match.eps)
    bn.__class__ = FoldedBatchNorm if isinstance(bn, nn.modules.batchnorm._BatchNorm) else FoldedFrozenBatchNorm
    # ``training`` follows model.train()/eval() like any module's (Lightning counts modules left in
    # eval at fit start); whether the statistics train is the separate stats_live flag.
    bn.register_buffer("inv_std", torch.empty_like(bn.running_var), persistent=False)
    _refresh_inv_std(bn)
    bn.__dict__[_HOOK] = bn.register_load_state_dict_post_hook(_refresh_inv_std)
    return bn


def unfold_bn(bn: nn.Module, training: bool) -> nn.Module:
    """Undo :func:`fold_bn`: the user's class back, the cache and hook gone, train flag ``training``."""
    if not is_folded(bn):
        return bn
    bn.__dict__.pop(_HOOK).remove()
    bn._buffers.pop("inv_std", None)
    bn.__dict__.pop("inv_std", None)
    bn.__class__ = bn.__dict__.pop(_ORIG)
    for attr in (_TAIL, _EPS, _LIVE):
        bn.__dict__.pop(attr, None)
    bn.train(training)
    return bn


def float_replacement(bn: nn.Module) -> nn.Module:
    """What a folded BN becomes in the folded float model: Identity, or its tail (names kept)."""
    tail = bn.__dict__.get(_TAIL, ())
    if not tail:
        return nn.Identity()
    return nn.Sequential(OrderedDict((n, bn._modules[n]) for n in tail))
