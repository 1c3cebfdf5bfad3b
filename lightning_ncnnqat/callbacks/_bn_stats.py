"""When the folded BatchNorms' statistics stop training (``QATConfig.freeze_bn_after``).

torch.ao's QAT recipe and the QAT literature (Krishnamoorthi 2018, "Quantizing deep
convolutional networks for efficient inference", section 3.2) let BN statistics follow the
quantized weights for a while, then freeze them (``torch.ao.nn.intrinsic.qat.freeze_bn_stats``)
so the last epochs train against the statistics the deployed fold uses. ``prepare.apply_plan``
makes the folded modules live when ``freeze_bn_after > 0``; the callback freezes them at the start
of epoch ``qat_epoch + freeze_bn_after`` (``qat_epoch``: the epoch QAT started in), in the model
and in the averaging callbacks' copies.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_ncnnqat.qat.bn_fold import is_folded, set_bn_stats_frozen, stats_live
from lightning_ncnnqat.qat.plan import QATPlan
from lightning_ncnnqat.qat.wrappers import unwrap


def any_live(model: nn.Module) -> bool:
    """Whether a folded BN of ``model`` still trains its statistics."""
    return any(is_folded(m) and stats_live(m) for m in unwrap(model).modules())


def freeze_due(plan: QATPlan | None, epoch: int, qat_epoch: int) -> bool:
    """Whether the folded statistics must be frozen at the start of ``epoch``."""
    return plan is not None and epoch >= qat_epoch + plan.config.freeze_bn_after


def freeze_if_due(trainer: Any, pl_module: nn.Module, plan: QATPlan | None, qat_epoch: int) -> bool:
    """Freeze the model's folded statistics when due; True when it froze live ones now."""
    if not freeze_due(plan, int(trainer.current_epoch), qat_epoch) or not any_live(pl_module):
        return False
    set_bn_stats_frozen(unwrap(pl_module), True)
    return True
