"""``nn.MultiheadAttention`` computed as ncnn's int8 MultiHeadAttention (pnnx writes it so).

No input range and no table row: ncnn quantizes every activation of the layer at run time from
its absmax and its weights with fixed scales (q/k/v per row, out per tensor), see
``ops/attention_reference.py`` and docs/export.md "Attention in int8". The forward is
``ops.attention_reference.mha_int8_ste``: ncnn's int8 values, the float layer's gradients.
Swapped in by class (:func:`to_qat_attention`), so the Parameters stay the same objects.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_ncnnqat.errors import LayerError
from lightning_ncnnqat.ops.attention_reference import mha_int8_ste


def attention_unsupported(m: nn.MultiheadAttention) -> str | None:
    """Why ncnn's MultiHeadAttention cannot compute ``m`` (None when it can): ncnn has no
    ``bias_k``/``bias_v`` and no ``add_zero_attn`` (``src/layer/multiheadattention.cpp``)."""
    if m.bias_k is not None or m.bias_v is not None:
        return "it has bias_k/bias_v (add_bias_kv=True), which ncnn's MultiHeadAttention lacks"
    if m.add_zero_attn:
        return "it has add_zero_attn=True, which ncnn's MultiHeadAttention lacks"
    return None


def mha_module_weights(m: nn.MultiheadAttention) -> dict[str, Tensor]:
    """The q/k/v/out weights and biases of ``m`` as ``ops.attention_reference.mha_int8`` takes them
    (ncnn's layout: ``in_proj_weight`` split in three rows blocks, or the separate q/k/v weights when
    kdim/vdim differ; biases only where ``m`` has them). The module's own tensors (views), so the
    QAT forward trains them and the export reads what was trained."""
    if m._qkv_same_embed_dim:
        wq, wk, wv = m.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    w = {"q_weight": wq, "k_weight": wk, "v_weight": wv, "out_weight": m.out_proj.weight}
    if m.in_proj_bias is not None:
        w.update(zip(("q_bias", "k_bias", "v_bias"), m.in_proj_bias.chunk(3)))
    if m.out_proj.bias is not None:
        w["out_bias"] = m.out_proj.bias
    return w


def _additive_mask(
    mask: Tensor | None, heads: int, q: Tensor, is_causal: bool, lk: int, key_padding_mask: Tensor | None = None
) -> Tensor | None:
    """``attn_mask`` and ``key_padding_mask`` as ONE additive float mask, for batch-first
    ``q [B, L, E]`` (True of a bool mask -> -inf): ``attn_mask`` ``[L, S]``, or ``[B*H, L, S]`` as
    ``[B, H, L, S]``; ``key_padding_mask [B, S]`` added as ``[B, 1, 1, S]`` (what pnnx writes for
    a float one: a ``[1, S]`` mask blob of ncnn's MultiHeadAttention, which it broadcasts over rows
    and heads); a causal mask when ``is_causal`` and no ``attn_mask``."""
    batch, lq = q.shape[0], q.shape[1]
    if mask is None and is_causal:
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1)
    def additive(m: Tensor) -> Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill(m, float("-inf"))
        return m.float()

    if mask is not None:
        mask = additive(mask)
        mask = mask.reshape(batch, heads, lq, lk) if mask.dim() == 3 else mask
    if key_padding_mask is not None:
        kpm = additive(key_padding_mask).reshape(batch, 1, 1, lk)
        mask = kpm if mask is None else mask + kpm
    return mask


class QATMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose forward is ncnn's int8 MultiHeadAttention (see module doc).

    Returns ``(output, None)``: ncnn's layer has no attention-weights output. Dropout is not
    applied (ncnn has none). A ``key_padding_mask`` is added to ``attn_mask`` (see
    :func:`_additive_mask`): pnnx writes a constant one, or a float one given as an input, as
    the mask input of ncnn's MultiHeadAttention (one that the model computes from its inputs
    may not convert: the export names the op)."""

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.reshape(1, -1)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        mask = _additive_mask(attn_mask, self.num_heads, query, is_causal, key.shape[1], key_padding_mask)
        out = mha_int8_ste(query, key, value, mha_module_weights(self), self.num_heads, None, mask).to(query.dtype)
        if unbatched:
            return out.squeeze(0), None
        return (out if self.batch_first else out.transpose(0, 1)), None


def to_qat_attention(module: nn.MultiheadAttention, name: str) -> QATMultiheadAttention:
    """Swap ``module``'s class to :class:`QATMultiheadAttention` in place (parameters untouched)
    and return it; LayerError naming ``name`` when ncnn's layer cannot compute it."""
    why = attention_unsupported(module)
    if why is not None:
        raise LayerError(name, f"layer '{name}' cannot run as ncnn's int8 MultiHeadAttention: {why}")
    module.__class__ = QATMultiheadAttention
    return module  # type: ignore[return-value]


def to_float_attention(module: QATMultiheadAttention) -> nn.MultiheadAttention:
    """Undo :func:`to_qat_attention` (the class back to ``nn.MultiheadAttention``)."""
    module.__class__ = nn.MultiheadAttention
    return module
