"""Where QAT's input thresholds start (a calibrated start) and how learned thresholds train.

The threshold of an input is what ncnn's table carries as ``scale = 127 / threshold``
(``running_absmax`` of the layer's :class:`~lightning_ncnnqat.qat.modules.InputQuantizer`).

* :func:`lightning_ncnnqat.calibration.start.calibrated_thresholds` runs ncnn2table's calibration (:func:`~lightning_ncnnqat.calibrate`:
  ``"kl"``, ``"aciq"``, or the plain ``"absmax"``) on the BN-folded float model and gives one
  threshold per range-owning layer; :func:`set_thresholds` writes them into the quantizers.
* :class:`LearnedRanges` trains the thresholds of quantizers in learned mode (TQT-style: Adam on
  the natural log of each threshold) beside the user's optimizer, so a Lightning run's
  optimizer, its param groups and its checkpoint state stay the user's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ncnnqat.qat.config import QATConfig
from lightning_ncnnqat.errors import ConfigError
from lightning_ncnnqat.qat.plan import get_plan
from lightning_ncnnqat.qat.prepared import input_quantizers
from lightning_ncnnqat.qat.batches import required_positional
from lightning_ncnnqat.qat.wrappers import unwrap

CALIBRATION_METHODS = ("absmax", "kl", "aciq")


def check_one_input(model: nn.Module, config: QATConfig, who: str) -> None:
    """:class:`~lightning_ncnnqat.errors.ConfigError` (a ValueError) naming ``who``'s range arguments when ``config`` asks for a calibrated start and
    ``model.forward`` takes more than one input (the calibration reads one tensor per batch)."""
    if not config.calibrated_start:
        return
    required = required_positional(unwrap(model))
    if len(required) > 1:
        raise ConfigError(
            f"{who}(range_init={config.range_init!r}, ranges={config.ranges!r}): the calibrated start reads one "
            f"input tensor per batch, and {type(unwrap(model)).__name__}.forward takes {len(required)} "
            f"({', '.join(required)}); use range_init='first_batch' with ranges='moving_average' or 'learned' "
            "(they start from the first training step)",
            argument="range_init", value=config.range_init,
        )


@torch.no_grad()
def set_thresholds(model: nn.Module, thresholds: dict[str, float]) -> None:
    """Write ``thresholds`` (layer name -> threshold > 0) into the prepared ``model``'s quantizers.

    A learned quantizer stores ``log(t)`` and carries ``exp(log(t))`` (the value its forward
    uses); the others carry ``t`` rounded to float32.
    Raises:
        KeyError: a name that owns no input range; ValueError: a threshold that is not > 0.
    """
    qs = input_quantizers(model)
    for name, t in thresholds.items():
        if name not in qs:
            raise KeyError(f"layer '{name}' owns no input range (owners: {sorted(qs)[:8]}...)")
        if not float(t) > 0 or float(t) == float("inf"):
            raise ValueError(f"layer '{name}': threshold must be a finite float > 0, got {t!r}")
        q = qs[name]
        if getattr(q, "learned", False):
            q.set_threshold(float(t))
        else:
            q.running_absmax.fill_(float(t))


class LearnedRanges:
    """The optimizer of a prepared model's learned thresholds (Adam on ``log(threshold)``).

    Why its own optimizer: QAT starts mid-fit, after the user's optimizer (and DDP) were built,
    and a resumed run rebuilds the model before the user's ``configure_optimizers``; the
    thresholds therefore live outside ``model.parameters()`` and train here, in the log
    domain so one learning rate fits thresholds of any magnitude (TQT). Call :meth:`step`
    where the user's optimizer steps (after backward): it takes the accumulated gradients,
    optionally un-scales and all-reduces them, steps, clears them and writes the new thresholds
    into the quantizers (``running_absmax``, what the table carries).
    """

    def __init__(self, model: nn.Module, lr: float) -> None:
        self.model = model
        self.lr = float(lr)
        self.quantizers = {n: q for n, q in input_quantizers(model).items() if getattr(q, "learned", False)}
        if not self.quantizers:
            raise ValueError("the model has no learned input range (prepare it with QATConfig(ranges='learned'))")
        self._leaves: list[Tensor] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending_state: dict[str, Any] | None = None
        self.skipped_steps = 0

    def _current_leaves(self) -> list[Tensor]:
        leaves = [q.threshold_leaf() for q in self.quantizers.values()]
        if self.optimizer is None or any(a is not b for a, b in zip(leaves, self._leaves)):
            state = self.optimizer.state_dict() if self.optimizer is not None else self._pending_state
            self.optimizer = torch.optim.Adam(leaves, lr=self.lr)
            if state is not None:
                self.optimizer.load_state_dict(state)
            self._pending_state = None
            self._leaves = leaves
        return leaves

    def step(self, grad_divisor: float = 1.0, all_reduce: Callable[[Tensor], Tensor] | None = None) -> bool:
        """One Adam step of every learned threshold; False (and nothing changes) when a gradient
        is not finite (an AMP overflow step). ``grad_divisor``: the AMP loss scale;
        ``all_reduce``: a function returning the mean of a tensor over processes (DDP), so every
        rank takes the same step and the thresholds stay identical."""
        leaves = self._current_leaves()
        grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]
        flat = torch.cat([g.reshape(-1).float() for g in grads]) / float(grad_divisor)
        if all_reduce is not None:
            flat = all_reduce(flat)
        for t in leaves:
            t.grad = None
        if not bool(torch.isfinite(flat).all()):
            self.skipped_steps += 1
            return False
        for t, g in zip(leaves, flat.split(1)):
            t.grad = g.reshape(t.shape).to(t.dtype)
        assert self.optimizer is not None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for q in self.quantizers.values():
            q.commit_threshold()
        return True

    def zero_grad(self) -> None:
        for q in self.quantizers.values():
            q.threshold_leaf().grad = None

    def state_dict(self) -> dict[str, Any] | None:
        """The Adam state (moments, step count), for an exact resume; None before the first step."""
        if self.optimizer is not None:
            return self.optimizer.state_dict()
        return self._pending_state

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self._pending_state = state
        self.optimizer = None
