"""Modules whose int8 SDPA exists only in their export form train in that form.

``qat.grid_forms`` / ``qat.conv_attention_forms`` rewrite LeViT / ultralytics attention (computed by hand: ``softmax(q @ k^T * s + bias)
@ v``) as one ``F.scaled_dot_product_attention`` for the plan and the export, so the plan
records its SDPA call (``QATPlan.sdpa_calls``) and the export writes it as ncnn's int8 SDPA. The
module's own forward never calls SDPA, so without this QAT would train that attention in float
while the deployed model runs it in int8. :func:`apply_training_forms` gives such a planned
module the same forward for training (the same function in float: checked on a probe when the
plan was made), so the int8 SDPA of ``qat.attention_plan`` applies to it while it trains;
:func:`remove_training_forms` takes it away (``unprepare``).
"""

from __future__ import annotations

import types
from typing import Any

from torch import nn

from lightning_ncnnqat.qat.conv_attention_forms import conv_attention_forward, is_conv_attention
from lightning_ncnnqat.qat.grid_forms import biased_attention_forward, is_biased_attention

TRAIN_FORM = "_ncnnqat_training_form"


def apply_training_forms(model: nn.Module, modules: dict[str, nn.Module], plan: Any) -> list[str]:
    """Install the SDPA form on every module of ``plan.sdpa_calls`` that computes attention by
    hand (LeViT's ``is_biased_attention``, ultralytics' ``is_conv_attention``) and has no forward of its own instance; the names installed."""
    done = []
    for name in plan.sdpa_calls:
        m = modules[name] if name else model
        form = biased_attention_forward if is_biased_attention(m) else (
            conv_attention_forward if is_conv_attention(m) else None)
        if form is not None and "forward" not in m.__dict__:
            m.__dict__["forward"] = types.MethodType(form, m)  # deepcopy rebinds
            m.__dict__[TRAIN_FORM] = True
            done.append(name)
    return done


def remove_training_forms(model: nn.Module) -> None:
    """Undo :func:`apply_training_forms` on every module of ``model``."""
    for m in model.modules():
        if m.__dict__.pop(TRAIN_FORM, None):
            m.__dict__.pop("forward", None)
