"""Which tensor of a batch is the model input: one rule for the callback and the export."""

from __future__ import annotations

from typing import Any

from torch import Tensor

INPUT_KEYS = ("x", "input", "inputs", "image", "images")
"""Keys tried, in order, for a dict batch before its first tensor value."""


def model_input(batch: Any) -> Tensor | None:
    """The model input of a batch, or None if it holds no tensor where one is looked for.

    A tensor is its own input; a list or tuple gives its first element (``(x, y)`` batches) if
    that is a tensor; a dict gives the value of the first of :data:`INPUT_KEYS` it has, else its
    first tensor value.
    """
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)):
        return batch[0] if batch and isinstance(batch[0], Tensor) else None
    if isinstance(batch, dict):
        for k in INPUT_KEYS:
            if isinstance(batch.get(k), Tensor):
                return batch[k]
        return next((v for v in batch.values() if isinstance(v, Tensor)), None)
    return None
