"""What the callback can know when fit starts: refused there, never after the float epochs.

* the Trainer's precision (:func:`check_precision`, in ``setup``): ``"32-true"``, the
  ``*-mixed`` (autocast) and the ``*-true`` half precisions (``HalfPrecision``: the module and
  every batch are cast to float16/bfloat16) work; ``"64-true"`` and the plugins that replace
  layers (Transformer Engine, bitsandbytes) are refused naming ``precision`` and what to use;
* whether QAT will start at all (:func:`check_start_reachable`, in ``on_train_start``, where
  ``trainer.num_training_batches`` is known and no training step has run);
* ``fast_dev_run`` (:func:`debug_run`): Lightning's "run one batch of everything" convention,
  so QAT starts at once and the export runs in a temporary directory, never in ``export_dir``.

Dtype rules under a ``*-true`` precision (Lightning 2.6 ``HalfPrecision.convert_module`` is
``module.to(dtype)``, ``convert_input`` casts every floating tensor of a batch): the example the
model is traced with is cast the same way (:func:`model_example`); the quantizers' thresholds
stay float32 (the fake-quant ops compute in float32 and require it; ``InputQuantizer._apply``);
the export and its preflight run on a float32 copy (:func:`lightning_ncnnqat.qat.dtypes.float32_model`):
ncnn runs float32 / int8, and a bf16 or fp16 weight is exact in float32, so the int8 weights and
scales computed from it are the ones the QAT forward used.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ncnnqat.qat.batches import as_call, from_call, map_tensors
from lightning_ncnnqat.errors import ConfigError, config_error
from lightning_ncnnqat.qat.plan import get_plan
from lightning_ncnnqat.qat.wrappers import unwrap
from lightning_ncnnqat.callbacks._compat import rank_zero_info, rank_zero_warn

_USE_INSTEAD = "use precision='32-true', 'bf16-mixed' or '16-mixed' (or 'bf16-true' / '16-true')"

# Precision plugin classes QAT refuses, by class name (found in both `lightning` and
# `pytorch_lightning`), and why. DeepSpeed/FSDP precisions come with strategies refused separately.
_REFUSED = {
    "DoublePrecision": (
        "QAT fake-quantizes in float32 and ncnn runs float32/int8, so float64 weights and activations "
        "would only be cast down at every quantizer"
    ),
    "TransformerEnginePrecision": (
        "Transformer Engine replaces nn.Linear/LayerNorm with its own fp8 modules, which QAT cannot "
        "fake-quantize and ncnn cannot run"
    ),
    "BitsandbytesPrecision": (
        "bitsandbytes replaces nn.Linear with its own quantized modules, which QAT cannot fake-quantize "
        "for ncnn's int8 and the export cannot read"
    ),
}


def _class_names(obj: Any) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def check_precision(trainer: Any) -> None:
    """Refuse a Trainer precision QAT cannot train with, naming ``precision`` and what to use.

    Raises:
        ConfigError: ``precision="64-true"`` (also 64 / "64"), ``"transformer-engine*"``, or a
            bitsandbytes plugin.
    """
    plugin = getattr(trainer, "precision_plugin", None)
    if plugin is None:
        return
    names = _class_names(plugin)
    for cls, why in _REFUSED.items():
        if cls in names:
            value = getattr(plugin, "precision", None) or cls
            raise config_error("precision", value, f"QATCallback cannot train with it: {why}; {_USE_INSTEAD}")


def model_example(trainer: Any, pl_module: nn.Module, example: Any) -> Any:
    """``example`` on the module's device and cast as the precision plugin casts a batch
    (``convert_input``: float16/bfloat16 under ``*-true``; unchanged under 32-true and ``*-mixed``),
    so the model can be traced with it."""
    plugin = getattr(trainer, "precision_plugin", None)
    args, kwargs = map_tensors(lambda t: t.to(pl_module.device), as_call(example))
    if plugin is not None:
        args, kwargs = plugin.convert_input(args), plugin.convert_input(kwargs)
    return from_call(tuple(args), dict(kwargs))


def _shapes(call: tuple[tuple, dict]) -> str:
    args, kwargs = call
    parts = [f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in args if isinstance(t, Tensor)]
    parts += [f"{k}={tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" for k, v in kwargs.items()
              if isinstance(v, Tensor)]
    return ", ".join(parts) or "no tensor"


def check_example_runs(pl_module: nn.Module, example: Any, name: str) -> None:
    """One eval-mode forward of the model on ``example`` (already cast by :func:`model_example`),
    without gradients, at fit start: QAT traces the model on it when QAT starts, so an example the
    model cannot take must stop the run now, not after the float epochs. The model's training
    flags are restored.

    Raises:
        ConfigError: naming ``name`` (``"example_input"`` or ``"example_input_array"``), the
            example's shapes and dtypes and the model's own error (its first line).
    """
    model = unwrap(pl_module)
    modes = {m: m.training for m in model.modules()}
    call = as_call(example)
    try:
        model.eval()
        with torch.no_grad():
            model(*call[0], **call[1])
    except Exception as exc:  # noqa: BLE001 - the user's forward: any error means this example does not fit
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ConfigError(
            f"QATCallback: `{name}` ({_shapes(call)}) cannot be fed to {type(model).__name__}: "
            f"{type(exc).__name__}: {first}. QAT traces the model on it when QAT starts; give an input of "
            "the shape and dtype the model takes",
            argument=name,
        ) from None
    finally:
        for m, mode in modes.items():
            m.training = mode


def debug_run(trainer: Any) -> bool:
    """Whether this is a ``Trainer(fast_dev_run=...)`` run (Lightning: one batch of everything,
    no checkpoints, no logs): QAT starts at once and nothing is written to ``export_dir``."""
    return bool(getattr(trainer, "fast_dev_run", False))


def qat_start_epoch(trainer: Any, start_epoch: int) -> int:
    """The epoch QAT starts at: ``start_epoch``, or 0 under ``fast_dev_run``."""
    return 0 if debug_run(trainer) else start_epoch


def note_debug_run(trainer: Any, start_epoch: int, export_dir: str | None) -> None:
    """The one line saying what ``fast_dev_run`` changes."""
    where = "nothing is exported" if export_dir is None else (
        f"the export runs in a temporary directory (export_dir={export_dir!r} is not touched)")
    rank_zero_info(f"QATCallback: fast_dev_run: QAT starts at once (start_epoch={start_epoch} ignored); {where}")


def check_max_epochs(trainer: Any, start_epoch: int) -> None:
    """Refuse in ``setup`` a fit that runs no training step (``max_steps=0``,
    ``limit_train_batches=0``: Lightning skips the fit loop, so no training hook runs) or ends
    before ``start_epoch`` (``start_epoch >= max_epochs``; not under ``fast_dev_run``)."""
    for name in ("max_steps", "limit_train_batches"):
        value = getattr(trainer, name, None)
        if value is not None and not isinstance(value, bool) and value == 0:
            raise ConfigError(
                f"QATCallback: the Trainer's `{name}`={value!r} runs no training step, so QAT never starts "
                "and nothing is exported; raise it, or leave QATCallback out of an evaluation-only fit.",
                argument=name, value=value,
            )
    max_epochs = trainer.max_epochs
    if debug_run(trainer) or max_epochs is None or max_epochs < 0 or start_epoch < max_epochs:
        return
    raise ConfigError(
        f"QATCallback: `start_epoch`={start_epoch} is not before the Trainer's `max_epochs`={max_epochs}: "
        "QAT would never start. Lower start_epoch or raise max_epochs.",
        argument="start_epoch", value=start_epoch,
    )


def _limits(trainer: Any) -> str:
    """The Trainer settings that shaped the optimizer steps per epoch, for a message."""
    out = [
        f"`{name}`={getattr(trainer, name)!r}"
        for name, default in (("limit_train_batches", 1.0), ("overfit_batches", 0.0), ("accumulate_grad_batches", 1))
        if getattr(trainer, name, default) != default
    ]
    return (" (" + ", ".join(out) + ")") if out else ""


def check_start_reachable(trainer: Any, pl_module: nn.Module, start_epoch: int) -> None:
    """In ``on_train_start`` (batches per epoch known, no training step run yet): refuse a
    ``start_epoch`` that ``max_steps`` ends fit before, naming the values; warn that
    ``max_time`` may (it cannot be known).

    Lightning 2.6 steps the optimizer ``ceil(num_training_batches / accumulate_grad_batches)``
    times an epoch under automatic optimization and stops once ``global_step >= max_steps``,
    so epoch ``e`` starts only when ``global_step`` after epoch ``e-1`` is below ``max_steps``.
    Under manual optimization the steps per batch are the user's: not checked.

    Raises:
        ConfigError: naming ``start_epoch``, ``max_steps`` and the batches per epoch.
    """
    epochs_left = start_epoch - trainer.current_epoch
    if get_plan(unwrap(pl_module)) is not None or epochs_left <= 0 or debug_run(trainer):
        return
    max_time = _timer_limit(trainer)
    if max_time:
        rank_zero_warn(
            f"QATCallback: the Trainer's `max_time`={max_time} may end fit before `start_epoch`={start_epoch}; "
            "then QAT never starts and nothing is exported"
        )
    n, max_steps = trainer.num_training_batches, trainer.max_steps
    if max_steps is None or max_steps < 0 or not isinstance(n, int) or n <= 0 or math.isinf(n):
        return
    if not getattr(pl_module, "automatic_optimization", True):
        return
    per_epoch = math.ceil(n / max(1, int(trainer.accumulate_grad_batches)))
    # Optimizer steps before epoch `start_epoch` begins (a resumed run may be mid-epoch: a lower bound).
    g = trainer.global_step
    needed = start_epoch * per_epoch if g == 0 and trainer.current_epoch == 0 else g + (epochs_left - 1) * per_epoch
    if needed >= max_steps:
        raise ConfigError(
            f"QATCallback: `start_epoch`={start_epoch} is never reached: the Trainer's `max_steps`={max_steps} "
            f"ends fit after {max_steps / per_epoch:.2f} epoch(s) of {n} training batch(es){_limits(trainer)} "
            f"({per_epoch} optimizer step(s) each). Lower start_epoch or raise max_steps.",
            argument="start_epoch", value=start_epoch,
        )


def _timer_limit(trainer: Any) -> Any:
    """``max_time`` as Lightning's Timer callback holds it (the Trainer adds one for max_time)."""
    for cb in getattr(trainer, "callbacks", []):
        if type(cb).__name__ == "Timer":
            return getattr(cb, "_duration", None)
    return None
