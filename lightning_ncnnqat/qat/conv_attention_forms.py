"""Attention on a feature map computed by hand (ultralytics' ``Attention``, YOLO11's C2PSA) as one SDPA.

ultralytics' ``nn.modules.block.Attention`` (``qkv`` / ``proj`` / ``pe`` convolutions,
``num_heads``, ``key_dim``, ``head_dim``, ``scale``) computes, for ``x [B, C, H, W]``::

    q, k, v = qkv(x).view(B, heads, 2 * key_dim + head_dim, H * W).split([key_dim, key_dim, head_dim], 2)
    y = (v @ ((q * scale).transpose(-2, -1) @ k).softmax(-1).transpose(-2, -1)).view(B, C, H, W)
    out = proj(y + pe(v.reshape(B, C, H, W)))

pnnx writes that as float MatMul / Softmax layers (ncnn has no int8 MatMul). The same values
are ``F.scaled_dot_product_attention(q^T, k^T, v^T, scale=scale)^T`` (ultralytics' own CoreML
export form): one ncnn ``SDPA``, which the export writes in int8. :func:`enter_conv_attention_form`
applies it in ``qat.export_form`` to modules with those attributes whose output it reproduces on
a probe; ``qat.training_forms`` gives a planned module the same forward for training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ncnnqat.qat.checked_forms import checked_form, probe_output, seeded_probe

CONV_ATTENTION_FORM_ATTR = "_ncnnqat_conv_attention_form"
_REQUIRED = ("qkv", "proj", "pe", "num_heads", "key_dim", "head_dim", "scale")


def is_conv_attention(m: nn.Module) -> bool:
    """``m`` has ultralytics ``Attention``'s attributes (convolutions, no bias table)."""
    return (all(hasattr(m, a) for a in _REQUIRED) and not hasattr(m, "attention_biases")
            and isinstance(m.qkv, nn.Module) and not isinstance(m.qkv, nn.Linear)
            and all(isinstance(getattr(m, a), int) for a in ("num_heads", "key_dim", "head_dim")))


def conv_attention_forward(m: nn.Module, x: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, C, H, W]``: the attention as one SDPA (see module doc)."""
    b, c, h, w = x.shape
    q, k, v = m.qkv(x).view(b, m.num_heads, 2 * m.key_dim + m.head_dim, h * w).split(
        [m.key_dim, m.key_dim, m.head_dim], dim=2)
    y = F.scaled_dot_product_attention(q.transpose(-2, -1), k.transpose(-2, -1), v.transpose(-2, -1),
                                       scale=float(m.scale))
    y = y.transpose(-2, -1).reshape(b, c, h, w) + m.pe(v.reshape(b, c, h, w))
    return m.proj(y)


def _probe(chs: int) -> Callable[[nn.Module], Tensor | None]:
    return lambda m: probe_output(m, seeded_probe(2, chs, 3, 4))


def enter_conv_attention_form(m: nn.Module, stack: contextlib.ExitStack) -> bool:
    """Enter the SDPA form of ``m`` on ``stack`` when it applies; whether ``m`` was rewritten."""
    if "forward" in m.__dict__ or not is_conv_attention(m):
        return False
    conv = next((c for c in m.qkv.modules() if isinstance(c, nn.Conv2d)), None)
    if conv is None:
        return False
    return stack.enter_context(checked_form(m, conv_attention_forward, CONV_ATTENTION_FORM_ATTR,
                                            "SDPA on q^T, k^T, v^T", _probe(conv.in_channels)))
