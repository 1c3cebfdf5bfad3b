"""Copies of the model held by other callbacks (weight averaging) follow the QAT plan.

Lightning's ``StochasticWeightAveraging`` deep-copies the LightningModule in ``setup`` and
averages ``parameters()`` into the copy; the ``WeightAveraging`` family (``EMAWeightAveraging``)
builds a ``torch.optim.swa_utils.AveragedModel`` in ``setup`` and, with ``use_buffers=True``
(its default), averages ``chain(parameters(), buffers())`` pairwise with the model's and swaps
them for validation (``lightning/pytorch/callbacks/weight_averaging.py``). Both copies are made
before QAT starts, so they are float models: QAT's class swap adds buffers to the live model
(input ranges, the folded BN's cached ``1/sqrt(var + eps)``), the zipped pairs shift, and the
first averaging step after QAT starts fails (or silently mixes unrelated tensors where shapes
happen to match). A copy made *after* QAT starts is a QAT model already: ``copy.deepcopy``
keeps the swapped classes, the ``__dict__`` attributes (plan, fold links, shared quantizers).

So when QAT starts, every model copy found on a callback (an ``AveragedModel``'s ``module``, or
an ``nn.Module`` attribute whose name says it averages, ``_average_model``, ``ema``..., of the
model's class, or of a submodule's class holding every quantized layer, with the same parameter
shapes; a distillation teacher is left alone), or held inside the LightningModule itself outside
its forward (timm's ``ModelEmaV3`` as ``self.ema``, an ``AveragedModel`` attribute), gets the
same plan (a copy of a submodule writes no plan entry in its state dict, as the submodule), and the QAT state that is
not averaged but defines the model takes the live model's values: the folded BN statistics
(constants of the fold the weights are trained with) and the input ranges. Ranges that start
at the first training step (``range_init="first_batch"``) are copied again after that step, so
no average starts from the uninitialised -1. On a checkpoint restore the copies take the
checkpoint's plan before the callbacks load their state (Lightning restores the LightningModule
first: ``checkpoint_connector._restore_modules_and_callbacks``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from lightning_ncnnqat.qat.bn_fold import is_folded, set_stats_live, stats_live
from lightning_ncnnqat.qat.model_copies import AVERAGE_NAME, follow, inner_copies, prefix_of, sub_plan
from lightning_ncnnqat.qat.plan import QATPlan, get_plan
from lightning_ncnnqat.qat.wrappers import unwrap


def model_copies(trainer: Any, pl_module: nn.Module, exclude: Any = None) -> list[tuple[str, nn.Module, str]]:
    """``(where, copy, prefix)`` for every copy of the model held by a callback of ``trainer``
    (``where``: ``"Callback.attribute"``) or inside the model itself, outside its forward
    (``where``: ``"Model.ema.module"``); ``prefix``: the copied submodule's name, "" for all."""
    model = unwrap(pl_module)
    plan = get_plan(model)
    found = [(f"{type(model).__name__}.{name}", m, prefix) for name, m, prefix in inner_copies(model, plan)]
    seen = {id(pl_module)} | {id(m) for m in model.modules()}  # the model's own modules are no callback's copies
    for cb in getattr(trainer, "callbacks", None) or []:
        if cb is exclude:
            continue
        for attr, value in vars(cb).items():
            m = value.module if isinstance(value, AveragedModel) else value
            if not isinstance(m, nn.Module) or id(m) in seen:
                continue
            if not isinstance(value, AveragedModel) and not AVERAGE_NAME.search(attr):
                continue  # another model of the same class (a distillation teacher) is not ours to change
            prefix = prefix_of(m, model, plan)
            if prefix is not None:
                seen.add(id(m))
                found.append((f"{type(cb).__name__}.{attr}", m, prefix))
    return found


def _owners(root: nn.Module, plan: QATPlan) -> dict[str, nn.Module]:
    """The input quantizer of each range-owning layer of ``plan``, looked up in ``root`` (the
    model's copied submodule has no plan of its own)."""
    return {n: root.get_submodule(n).input_quantizer for n, p in plan.layers.items() if p.input_owner == n}


@torch.no_grad()
def _copy_ranges(src: nn.Module, dst: nn.Module) -> None:
    """The input quantizers' buffers (range, learned log-threshold) of ``src`` into ``dst``."""
    plan = get_plan(dst)
    assert plan is not None
    targets = _owners(dst, plan)
    for name, q in _owners(src, plan).items():
        dq = targets[name]
        for key, buf in q._buffers.items():
            if buf is not None and dq._buffers.get(key) is not None:
                dq._buffers[key].copy_(buf)


@torch.no_grad()
def _copy_folded_stats(src: nn.Module, dst: nn.Module, plan: QATPlan) -> None:
    """The folded BNs' statistics, cached ``inv_std`` and live flag of ``src`` into ``dst``."""
    src_modules, dst_modules = dict(src.named_modules()), dict(dst.named_modules())
    for p in plan.layers.values():
        if not p.bn:
            continue
        s, d = src_modules[p.bn], dst_modules[p.bn]
        if is_folded(d):
            set_stats_live(d, stats_live(s))
        for key in ("running_mean", "running_var", "num_batches_tracked", "inv_std"):
            a, b = s._buffers.get(key), d._buffers.get(key)
            if a is not None and b is not None and a.shape == b.shape:
                b.copy_(a)


class AveragedCopies:
    """Keeps the model copies of averaging callbacks on the model's QAT plan (one per QATCallback)."""

    def __init__(self) -> None:
        self._pending: list[tuple[nn.Module, str]] = []  # copies whose ranges wait for the first step

    def follow(self, trainer: Any, pl_module: nn.Module, exclude: Any, sync: bool) -> list[str]:
        """Give every copy the model's plan (or make it float); with ``sync``, also the model's
        folded statistics and input ranges (QAT start). Returns where the copies are."""
        model = unwrap(pl_module)
        plan = get_plan(model)
        where = []
        for name, copy, prefix in model_copies(trainer, pl_module, exclude):
            sub = model.get_submodule(prefix) if prefix else model
            if copy.__dict__.get("on_load_checkpoint") is model.__dict__.get("on_load_checkpoint"):
                copy.__dict__.pop("on_load_checkpoint", None)  # our restore hook, copied by deepcopy
            follow(copy, None if plan is None else sub_plan(plan, prefix), whole=not prefix)
            if sync and plan is not None:
                own = get_plan(copy)
                assert own is not None
                _copy_folded_stats(sub, copy, own)
                _copy_ranges(sub, copy)
                if any(float(q.running_absmax.reshape(-1)[0]) < 0 for q in _owners(sub, own).values()):
                    self._pending.append((copy, prefix))
            where.append(name)
        return where

    def after_step(self, pl_module: nn.Module) -> None:
        """After a QAT training step: copies that started with uninitialised ranges take the
        model's (set by this step), before or after the averaging callback's own update."""
        if not self._pending:
            return
        model = unwrap(pl_module)
        for copy, prefix in self._pending:
            if get_plan(copy) is not None:
                _copy_ranges(model.get_submodule(prefix) if prefix else model, copy)
        self._pending = []

    def freeze_bn_stats(self, trainer: Any, pl_module: nn.Module, exclude: Any, frozen: bool) -> None:
        """Freeze (or let train) the folded statistics of every copy, as the model's."""
        for _, copy, _ in model_copies(trainer, pl_module, exclude):
            for m in copy.modules():
                if is_folded(m):
                    set_stats_live(m, not frozen)


def averaging_window_warnings(trainer: Any, start_epoch: int) -> list[str]:
    """One line per Lightning ``StochasticWeightAveraging`` whose average would include the
    weights QAT starts from: it averages at the start of epoch ``swa_start`` (0-based,
    ``swa_epoch_start - 1``; a float is a fraction of ``max_epochs``) the weights the previous
    epoch ended with, so ``swa_start <= start_epoch`` averages in weights never trained with
    quantization (measured on digits: 0.734 / 0.688 top-1 vs 0.844 / 0.781 when it starts one
    epoch later, 2 seeds)."""
    out = []
    for cb in getattr(trainer, "callbacks", None) or []:
        first = getattr(cb, "_swa_epoch_start", None)
        if first is None or not isinstance(getattr(type(cb), "swa_start", None), property) or isinstance(first, bool):
            continue
        if isinstance(first, float):
            if trainer.max_epochs is None or trainer.max_epochs < 0:
                continue
            first = int(trainer.max_epochs * first)
        swa_start = max(int(first) - 1, 0)
        if swa_start <= start_epoch:
            out.append(
                f"QATCallback: {type(cb).__name__}(swa_epoch_start={getattr(cb, '_swa_epoch_start')}) averages from "
                f"epoch {swa_start} the weights of the epoch before, and QAT starts at start_epoch={start_epoch}: "
                "the average includes weights never trained with quantization; use swa_epoch_start >= "
                f"{start_epoch + 2}"
            )
    return out
