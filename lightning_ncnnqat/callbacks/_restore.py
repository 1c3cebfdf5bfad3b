"""Checkpoints across the QAT boundary: the callback's plan follows a checkpoint before its
weights load (:mod:`lightning_ncnnqat.qat.checkpoint` does the loading, atomically)."""

from __future__ import annotations

from typing import Any

from lightning_ncnnqat.callbacks._compat import rank_zero_info
from lightning_ncnnqat.qat.checkpoint import follow_checkpoint_plan
from lightning_ncnnqat.qat.plan import get_plan


def install_restore_hook(callback: Any, pl_module: Any) -> None:
    """Re-apply the checkpoint's QAT plan before Lightning loads the state dict into the model.

    Lightning calls ``LightningModule.on_load_checkpoint`` with the loaded checkpoint just
    before loading the weights; the callbacks' own hook comes only after, too late to add the
    quantizer buffers and fold the BatchNorms the checkpoint's state dict expects.
    """
    if "on_load_checkpoint" in pl_module.__dict__:
        return
    original = pl_module.on_load_checkpoint

    def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
        # the plan of any checkpoint form (weights-only too); atomic: a checkpoint that does
        # not fit raises here and leaves the model as it was (lightning_ncnnqat.qat.checkpoint)
        before = get_plan(pl_module)
        follow_checkpoint_plan(pl_module, checkpoint, strict=pl_module.strict_loading)
        if pl_module._trainer is not None:  # averaging copies take the plan before their callbacks load
            callback._copies.follow(pl_module._trainer, pl_module, callback, sync=False)
        callback.plan = get_plan(pl_module)
        if before is not None and callback.plan is None:
            rank_zero_info(
                "QATCallback: the checkpoint was saved before QAT started; the model is returned to float "
                "to load it (QAT starts again at `start_epoch`)"
            )
        elif before is not None and callback.plan is not before:
            rank_zero_info("QATCallback: the checkpoint was saved with another QAT plan; the model takes its plan")
        return original(checkpoint)

    pl_module.__dict__["on_load_checkpoint"] = on_load_checkpoint
