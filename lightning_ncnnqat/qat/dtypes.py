"""Float32 views for the export: ncnn runs float32 / int8 whatever dtype the model trained in.

Under Lightning's ``precision="bf16-true"`` / ``"16-true"`` (``HalfPrecision.convert_module``:
``module.to(dtype)``) the weights QAT trains are bfloat16 / float16. Every such value is exact in
float32, so a float32 copy computes the int8 weights and scales the QAT forward used (the ops
compute in float32), and the export traces, converts and compares it with float32 inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_ncnnqat.qat.batches import as_call, from_call, map_tensors
from lightning_ncnnqat.qat.prepared import deepcopy_model
from lightning_ncnnqat.qat.wrappers import unwrap


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating Parameter (float32 when it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@contextlib.contextmanager
def float32_model(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` itself when its weights are float32, else a float32 deep copy of the unwrapped
    model (plan, thresholds and flags copied; the user's model, its dtype and its optimizer
    state untouched)."""
    if float_dtype(model) == torch.float32:
        yield model
        return
    copy_ = deepcopy_model(unwrap(model)).float()
    try:
        yield copy_
    finally:
        del copy_


def float32_example(example: Any) -> Any:
    """``example`` (Tensor, tuple or dict) with its float16/bfloat16/float64 tensors as float32."""
    if example is None:
        return None
    cast = lambda t: t.float() if t.is_floating_point() and t.dtype != torch.float32 else t  # noqa: E731
    return from_call(*map_tensors(cast, as_call(example)))
