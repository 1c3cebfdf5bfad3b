"""Attention modules in a form pnnx converts: fused qkv -> 5-D reshape -> unbind, rewritten.

The common self-attention module of timm (``timm.layers.attention.Attention``: ViT, DeiT,
MobileViT, EVA-like blocks) and of many repositories copying it computes::

    qkv = self.qkv(x).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
    x = self.proj(self.norm(x.transpose(1, 2).reshape(B, N, heads * head_dim)))

pnnx 20261020 cannot convert the 5-D reshape feeding ``unbind`` (a 6-D tensor with ncnn's batch
axis; ncnn blobs have at most 4 dims), so the whole model fails at the export. The same values come
out of a form with no tensor above 4-D: ``chunk(3, -1)`` of the qkv output (one ncnn ``Slice``:
the 5-D reshape's axis 2 is exactly the three thirds of the last dim), each third reshaped to
``[B, N, heads, head_dim]`` and transposed to ``[B, heads, N, head_dim]``, then the same SDPA call
(pnnx: one ``SDPA`` layer, which the export writes in int8). Nothing is reordered: the Linear
weights, the SDPA and the projection are the module's own, so QAT's plan (Gemm for the Linears,
the SDPA call as ncnn's int8 SDPA) is the same in either form.

:func:`attention_form` applies it, for the length of ``qat.export_form.export_form``'s ``with``
block, to every module that has the attributes of that form (duck typing: the package never
imports timm) AND whose output the form reproduces on a random probe (checked numerically, as
BatchNorm-like modules are, so a module of a different computation that happens to share the
attribute names is left alone). Modules that compute attention by hand (timm's
``fused_attn=False``: ``softmax(q @ k^T) @ v``) are left alone too: pnnx writes those as MatMul /
Softmax float layers, which is what QAT trains for them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ncnnqat.qat.checked_forms import checked_form, probe_output, seeded_probe

FORM_ATTR = "_ncnnqat_attention_form"
"""In a module's ``__dict__`` while its forward is the rewritten form (the form's name)."""

# Attributes of timm's Attention that the form reads (``gate``/``norm`` optional).
_REQUIRED = ("qkv", "proj", "num_heads", "q_norm", "k_norm")
# Probe tolerance (with rtol 1e-4): float32 reassociation only (chunk vs 5-D unbind, same ops).
_PROBE_ATOL = 1e-5


def _heads(m: nn.Module) -> tuple[int, int] | None:
    """``(heads, head_dim)`` of a fused-qkv attention module, None when the shapes disagree."""
    qkv = m.qkv
    heads = m.num_heads
    if not isinstance(qkv, nn.Linear) or not isinstance(heads, int) or heads <= 0 or qkv.out_features % 3:
        return None
    attn_dim = qkv.out_features // 3
    head_dim = getattr(m, "head_dim", attn_dim // heads)
    if not isinstance(head_dim, int) or heads * head_dim != attn_dim:
        return None
    return heads, head_dim


def is_fused_qkv_attention(m: nn.Module) -> bool:
    """``m`` has the attributes of timm's fused-qkv ``Attention`` with its SDPA path on (see the
    module doc); whether the form computes its function is checked by :func:`attention_form`."""
    if not all(hasattr(m, a) for a in _REQUIRED) or not bool(getattr(m, "fused_attn", True)):
        return False
    if any(getattr(m, a, None) is not None for a in ("rope", "rotary_emb", "attn_bias", "relative_position_bias")):
        return False  # positional terms the form does not add
    return _heads(m) is not None


def fused_qkv_forward(m: nn.Module, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """timm ``Attention.forward`` without 5-D tensors: ``x [B, N, C]`` -> ``[B, N, C_out]``, or
    ``x [B, P, N, C]`` (P independent token groups, e.g. MobileViT's patch pixels) -> ``[B, P, N, C_out]``.

    The qkv output's last dim holds q, k, v thirds (the original 5-D reshape's axis 2), each
    ``[heads, head_dim]`` row-major (its axes 3, 4): ``chunk(3, -1)`` and a 4-D reshape pick the
    same elements. P groups become P * heads independent attention matrices
    ``[B, heads * P, N, head_dim]`` (head-major), the same values: ncnn's int8 SDPA quantizes per
    row and per matrix. Dropout is not applied (the form runs in eval, for the export)."""
    heads, head_dim = _heads(m)  # type: ignore[misc]  # checked by is_fused_qkv_attention
    b, n = x.shape[0], x.shape[-2]
    p = x.shape[1] if x.dim() == 4 else 1
    gate = m.gate(x).sigmoid() if getattr(m, "gate", None) is not None else None

    def split(t: Tensor) -> Tensor:  # [B, (P,) N, H*D] -> [B, H*P, N, D]
        return t.reshape(b, p * n, heads, head_dim).transpose(1, 2).reshape(b, heads * p, n, head_dim)

    q, k, v = (split(t) for t in m.qkv(x).chunk(3, -1))
    q, k = m.q_norm(q), m.k_norm(k)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    y = y.reshape(b, heads, p * n, head_dim).transpose(1, 2).reshape(*x.shape[:-1], heads * head_dim)
    norm = getattr(m, "norm", None)
    if norm is not None:
        y = norm(y)
    if gate is not None:
        y = y * gate
    return m.proj(y)


def _probe(m: nn.Module) -> Tensor | None:
    """``m(x)`` on a fixed random ``[2, 5, C]`` probe (through ``__call__``, so the module's hooks,
    e.g. QAT's int8 SDPA, run as in the export); None on any error."""
    return probe_output(m, seeded_probe(2, 5, m.qkv.in_features))


@contextlib.contextmanager
def attention_form(m: nn.Module) -> Iterator[bool]:
    """``m``'s forward as :func:`fused_qkv_forward` for the block when ``m`` is a fused-qkv
    attention module whose output the form reproduces on a probe (``qat/checked_forms.py``);
    yields whether it was rewritten; the class's forward is back on exit (also on error)."""
    if not is_fused_qkv_attention(m):
        yield False
        return
    with checked_form(m, fused_qkv_forward, FORM_ATTR, "fused qkv -> chunk -> SDPA", _probe, atol=_PROBE_ATOL) as same:
        yield same


def enter_attention_form(m: nn.Module, stack: contextlib.ExitStack) -> bool:
    """Enter :func:`attention_form` of ``m`` on ``stack``; whether ``m`` was rewritten."""
    if not is_fused_qkv_attention(m):
        return False
    return stack.enter_context(attention_form(m))
