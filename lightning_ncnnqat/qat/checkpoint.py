"""Loading a QAT checkpoint, in any of its forms, into a model: the plan first, then the weights.

A QAT model's state dict expects quantizer buffers and folded BatchNorms that a float model does
not have, so a checkpoint's plan (:func:`plan_state.checkpoint_plan`: the callback's
``checkpoint["ncnnqat"]`` or the state dict's own plan entry, present in weights-only checkpoints
too) must be applied before its weights load. Every switch here is atomic: when the checkpoint's
keys or shapes do not fit the model under the checkpoint's plan, the model is returned to the
plan (and ranges) it had and :class:`CheckpointMismatchError` names the keys, before any weight
is copied (torch's ``load_state_dict`` copies what matches before it raises).

Entry points: :func:`restore_from_checkpoint` (a checkpoint dict into a fresh model),
:func:`load_from_checkpoint` (``LightningModule.load_from_checkpoint`` for QAT checkpoints, in a
process without the callback), :func:`follow_checkpoint_plan` (the callback, right before
Lightning loads the weights).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ncnnqat.errors import NcnnQatError
from lightning_ncnnqat.qat.model_copies import follow_inner_copies
from lightning_ncnnqat.qat.plan import QATPlan, get_plan
from lightning_ncnnqat.qat.plan_state import PLAN_KEY, checkpoint_plan, same_plan, state_of, without_plan
from lightning_ncnnqat.qat.prepare import apply_plan, unprepare
from lightning_ncnnqat.qat.prepared import input_quantizers, strip_wrapper_prefixes
from lightning_ncnnqat.qat.wrappers import unwrap

__all__ = ["CheckpointMismatchError", "follow_checkpoint_plan", "load_from_checkpoint", "restore_from_checkpoint"]


class CheckpointMismatchError(NcnnQatError, RuntimeError):
    """The checkpoint's keys or shapes do not fit the model (which is left as it was); ``problem``
    is the keys / shapes part of the message."""

    def __init__(self, message: str, problem: str = "") -> None:
        super().__init__(message)
        self.problem = problem or message


def _listed(what: str, keys: list[str]) -> str:
    more = f" ({len(keys)} in all)" if len(keys) > 3 else ""
    return f"{what} {keys[:3]}{more}"


def fit_problem(model: nn.Module, state: Mapping[str, Any], strict: bool = True) -> str | None:
    """What keeps ``state`` from loading into ``model`` as it is now (missing / unexpected keys
    when ``strict``, shape mismatches always), in one line; None when it fits."""
    own = without_plan(model.state_dict())
    theirs = without_plan(state)
    parts = []
    if strict:
        missing = sorted(set(own) - set(theirs))
        unexpected = sorted(set(theirs) - set(own))
        if missing:
            parts.append(_listed("missing keys", missing))
        if unexpected:
            parts.append(_listed("unexpected keys", unexpected))
    shapes = [
        f"{k}: {tuple(theirs[k].shape)} in the checkpoint, {tuple(v.shape)} in the model"
        for k, v in own.items()
        if k in theirs and isinstance(v, Tensor) and isinstance(theirs[k], Tensor)
        and not isinstance(v, nn.parameter.UninitializedParameter) and v.shape != theirs[k].shape
    ]
    if shapes:
        more = f" ({len(shapes)} in all)" if len(shapes) > 2 else ""
        parts.append("size mismatch for " + "; ".join(shapes[:2]) + more)
    return ", ".join(parts) or None


def switch_plan(model: nn.Module, plan: QATPlan | None, state: Mapping[str, Any], strict: bool = True) -> None:
    """Bring ``model`` to ``plan`` (None: the float model) so that ``state`` loads into it.

    Atomic: if ``state`` does not fit the switched model (:func:`fit_problem`), or applying the
    plan raises, the model gets back its plan and input ranges and the error propagates
    (:class:`CheckpointMismatchError` for keys / shapes). A model already at ``plan`` is left to
    torch's own checks. The Parameters are the same objects throughout.
    """
    inner = unwrap(model)
    before = get_plan(inner)
    if same_plan(before, plan):
        return
    kept: dict[str, dict[str, Tensor]] = {}
    if before is not None:  # the input ranges, to give back if the switch fails
        kept = {n: {k: v.clone() for k, v in q.state_dict().items()} for n, q in input_quantizers(inner).items()}

    def back() -> None:
        unprepare(inner)
        if before is not None:
            apply_plan(inner, before)
            for name, q in input_quantizers(inner).items():
                q.load_state_dict(kept[name])
        follow_inner_copies(inner)

    unprepare(inner)
    try:
        if plan is not None:
            apply_plan(inner, plan)
        follow_inner_copies(inner)  # an EMA inside the model: its QAT buffers are in the state too
        problem = fit_problem(inner, state, strict)
    except BaseException:  # undo, then re-raise: nothing is swallowed
        back()
        raise
    if problem is not None:
        back()
        what = "float" if plan is None else f"with the checkpoint's QAT plan ({len(plan.layers)} int8 layers)"
        raise CheckpointMismatchError(
            f"the checkpoint does not fit {type(inner).__name__} {what}: {problem}; the model is left as it was",
            problem,
        )


def follow_checkpoint_plan(model: nn.Module, checkpoint: Mapping[str, Any], strict: bool = True) -> tuple[bool, bool]:
    """Switch ``model`` to the plan of the Lightning ``checkpoint`` about to be loaded into it
    (called from ``LightningModule.on_load_checkpoint``, before Lightning loads the weights).

    Returns ``(was_prepared, is_prepared)``. Raises :class:`CheckpointMismatchError` (model
    unchanged) when the checkpoint does not fit.
    """
    before = get_plan(model)
    plan = checkpoint_plan(checkpoint)
    switch_plan(model, plan, state_of(checkpoint), strict)
    return before is not None, get_plan(model) is not None


def restore_from_checkpoint(model: nn.Module, checkpoint: Mapping[str, Any], strict: bool = True) -> nn.Module:
    """Apply the QAT plan ``checkpoint`` carries to a fresh float ``model`` and load its weights.

    ``checkpoint``: a Lightning checkpoint dict (full or weights-only, ``torch.load``'ed), or a
    QAT model's ``state_dict()``. Wrapper prefixes in the keys (``module.``, ``_orig_mod.``...)
    and wrapped models are handled. Raises ValueError for a checkpoint without a QAT plan, and
    :class:`CheckpointMismatchError` (the model left as it was) when it does not fit ``model``.
    """
    plan = checkpoint_plan(checkpoint)
    if plan is None:
        raise ValueError(
            "the checkpoint holds no QAT state (no 'ncnnqat' key, no QAT plan in its state dict): "
            "was it saved after QAT started?"
        )
    inner = unwrap(model)
    state = without_plan(strip_wrapper_prefixes(state_of(checkpoint)))
    switch_plan(inner, plan, state, strict)
    inner.load_state_dict(state, strict=strict)
    return model


def _qat_only(key: str, plan: QATPlan) -> bool:
    return key.endswith(PLAN_KEY) or any(key.startswith(f"{n}.input_quantizer.") for n in plan.layers)


def load_from_checkpoint(
    cls: type,
    checkpoint_path: str | os.PathLike | io.IOBase,
    map_location: Any = None,
    hparams_file: str | os.PathLike | None = None,
    strict: bool | None = None,
    weights_only: bool | None = None,
    **kwargs: Any,
) -> Any:
    """``cls.load_from_checkpoint(checkpoint_path, ...)`` (a LightningModule class) that also
    loads QAT checkpoints, full or weights-only: the model is built from the checkpoint's float
    weights by Lightning, the checkpoint's QAT plan is applied, then every weight loads
    (``strict`` as Lightning's, but the plan is always applied: never a float model from a QAT
    checkpoint). A float checkpoint gives what ``cls.load_from_checkpoint`` gives.
    Raises :class:`CheckpointMismatchError` when the checkpoint does not fit ``cls``.
    """
    where = map_location if map_location is not None else (None if torch.cuda.is_available() else "cpu")
    ckpt = torch.load(checkpoint_path, map_location=where, weights_only=weights_only)
    if isinstance(checkpoint_path, io.IOBase):
        checkpoint_path.seek(0)
    plan = checkpoint_plan(ckpt) if isinstance(ckpt, Mapping) else None
    args = dict(map_location=map_location, hparams_file=hparams_file, strict=strict, weights_only=weights_only)
    args.update(kwargs)
    if plan is None:
        return cls.load_from_checkpoint(checkpoint_path, **args)
    state = state_of(ckpt)
    buf = io.BytesIO()
    torch.save({**ckpt, "state_dict": {k: v for k, v in state.items() if not _qat_only(k, plan)}}, buf)
    buf.seek(0)
    model = cls.load_from_checkpoint(buf, **args)
    strict = model.strict_loading if strict is None else strict
    switch_plan(model, plan, state, strict)
    model.load_state_dict(without_plan(state), strict=strict)
    return model
