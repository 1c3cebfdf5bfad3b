"""The QAT plan inside the model's state dict, so every checkpoint form carries it.

A prepared model's ``state_dict()`` holds one extra entry, :data:`PLAN_KEY` (under the model's
prefix): the plan as UTF-8 JSON in a uint8 tensor. It is there because the state dict is the
one part every checkpoint form keeps: Lightning's weights-only checkpoints
(``ModelCheckpoint(save_weights_only=True)``; ``dump_checkpoint`` skips the callbacks'
``on_save_checkpoint`` then, see ``lightning/pytorch/trainer/connectors/checkpoint_connector.py``),
``torch.save(model.state_dict())``, averaged or copied models. A tensor (not a dict) keeps a
state dict all tensors, as safetensors and ``torch.load(weights_only=True)`` want.

The key's text says how to load the checkpoint: a class that was never prepared (a fresh process,
``LightningModule.load_from_checkpoint``) fails in torch's own "Unexpected key(s)" error, and that
error lists this key first (the root module's unexpected keys come before its children's), or,
with ``strict=False``, Lightning's warning names it.

Hooks (installed by ``prepare.apply_plan``, kept after ``unprepare``; they read the model's plan
when called): the state-dict post-hook writes the entry; the load pre-hook removes it before
torch matches keys, and raises :class:`PlanMismatchError` before any weight is copied when the
entry's plan is not the model's (a QAT state dict into a float model would otherwise load as a
float model under ``strict=False``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ncnnqat.errors import NcnnQatError
from lightning_ncnnqat.qat.plan import PLAN_ATTR, QATPlan

PLAN_KEY = "ncnnqat_plan (a QAT checkpoint: load it with lightning_ncnnqat.load_from_checkpoint or restore_from_checkpoint)"
_HOOKED = "_ncnnqat_plan_hooks"
_NO_ENTRY = "_ncnnqat_no_plan_entry"


class PlanMismatchError(NcnnQatError, RuntimeError):
    """A state dict whose QAT plan is not the model's (a RuntimeError, as torch's load errors)."""


def encode_plan(plan: QATPlan) -> Tensor:
    """``plan`` as a 1-D uint8 CPU tensor of UTF-8 JSON (keys sorted: equal plans, equal bytes)."""
    data = json.dumps(plan.to_dict(), sort_keys=True).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def decode_plan(value: Any) -> QATPlan:
    """The plan of an entry :func:`encode_plan` wrote (or of a plain plan dict, as the callback's
    ``checkpoint["ncnnqat"]``). ValueError when it cannot be read."""
    if isinstance(value, Mapping):
        return QATPlan.from_dict(dict(value))
    if not isinstance(value, Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise ValueError(f"the state dict's {PLAN_KEY!r} entry is not a QAT plan: {type(value).__name__}")
    try:
        d = json.loads(bytes(value.cpu().tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the state dict's QAT plan entry cannot be read: {e}") from e
    return QATPlan.from_dict(d)


def same_plan(a: QATPlan | None, b: QATPlan | None) -> bool:
    """Whether two plans (either may be None) make the same model."""
    if a is None or b is None:
        return a is b
    return bool(torch.equal(encode_plan(a), encode_plan(b)))


def state_of(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict of a Lightning checkpoint (full or weights-only), or ``checkpoint`` itself
    when it is a bare state dict."""
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise ValueError(f"the checkpoint's 'state_dict' is a {type(state).__name__}, not a dict")
    return dict(state)


def plan_key_in(state: Mapping[str, Any]) -> str | None:
    """The key of the plan entry in ``state`` (shortest prefix first), or None."""
    keys = [k for k in state if isinstance(k, str) and k.endswith(PLAN_KEY)]
    return min(keys, key=len) if keys else None


def checkpoint_plan(checkpoint: Mapping[str, Any]) -> QATPlan | None:
    """The QAT plan a checkpoint carries: the callback's ``checkpoint["ncnnqat"]`` (full Lightning
    checkpoints), else the state dict's :data:`PLAN_KEY` entry (every form: weights-only, a bare
    ``model.state_dict()``); None for a float checkpoint."""
    if isinstance(checkpoint.get("ncnnqat"), Mapping):
        return decode_plan(checkpoint["ncnnqat"])
    key = plan_key_in(state_of(checkpoint))
    return None if key is None else decode_plan(state_of(checkpoint)[key])


def without_plan(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` without its plan entries (what ``load_state_dict`` of a float model expects)."""
    return {k: v for k, v in state.items() if not (isinstance(k, str) and k.endswith(PLAN_KEY))}


def _save_plan(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    plan = module.__dict__.get(PLAN_ATTR)
    if plan is not None and not module.__dict__.get(_NO_ENTRY):
        state_dict[prefix + PLAN_KEY] = encode_plan(plan)


def _load_plan(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
    missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
) -> None:
    # ``state_dict`` is load_state_dict's own copy: removing the entry leaves the caller's dict as it is.
    raw = state_dict.pop(prefix + PLAN_KEY, None)
    current = module.__dict__.get(PLAN_ATTR)
    stored = None if raw is None else decode_plan(raw)
    if stored is None or same_plan(stored, current):
        return  # a float state dict into a prepared model: torch reports the missing ranges (strict)
    name = type(module).__name__
    if current is None:
        raise PlanMismatchError(
            f"the state dict holds a QAT plan ({len(stored.layers)} int8 layers) and {name} is a float model: "
            "load it with lightning_ncnnqat.restore_from_checkpoint(model, checkpoint) (or "
            "lightning_ncnnqat.load_from_checkpoint(Class, path)); nothing was loaded"
        )
    raise PlanMismatchError(
        f"the state dict holds another QAT plan than {name}'s ({len(stored.layers)} vs {len(current.layers)} "
        "int8 layers): load it with lightning_ncnnqat.restore_from_checkpoint(model, checkpoint) on the float "
        "model (lightning_ncnnqat.unprepare(model) first); nothing was loaded"
    )


def omit_plan_entry(module: nn.Module) -> None:
    """Keep :data:`PLAN_KEY` out of ``module``'s state dict although it holds a plan: ``module``
    is a copy of a *submodule* of a prepared model (an EMA of ``pl_module.net``), and its state
    dict must have the keys of the submodule it copies, which has no entry of its own (the
    model's entry sits at the model's root), so that ``pl_module.net.load_state_dict(copy.state_dict())``
    and key-by-key averaging of the two state dicts work."""
    module.__dict__[_NO_ENTRY] = True


def install_plan_hooks(model: nn.Module) -> None:
    """Install the save and load hooks on ``model`` (the unwrapped user model) once."""
    if model.__dict__.get(_HOOKED):
        return
    model.register_state_dict_post_hook(_save_plan)
    model.register_load_state_dict_pre_hook(_load_plan)
    model.__dict__[_HOOKED] = True
