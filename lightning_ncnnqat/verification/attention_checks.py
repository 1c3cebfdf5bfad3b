"""The isolated per-layer reference of an int8 ``MultiHeadAttention`` / ``SDPA``.

Both quantize every activation at run time (no input scale), so the reference of one layer is
``ops.attention_reference.mha_int8`` / ``sdpa_int8`` on ncnn's own input blobs (one sample, as
ncnn runs it): MultiHeadAttention reads q[, k[, v]][, mask] (``5=1``: the last blob is the
additive mask; k defaults to q, v to k, ``src/layer/multiheadattention.cpp``), ``[L, E]`` each,
with the weights QAT trained (:class:`AttentionRef`); SDPA reads q, k, v[, mask] ``[heads, L, d]``
and its ``6=`` scale (0: ``1/sqrt(d)``). Bars: ``policy.attention_layer_ok``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from lightning_ncnnqat.ncnn.param import NcnnLayer
from lightning_ncnnqat.ops.attention_reference import mha_int8, sdpa_int8

ATTENTION_TYPES = ("MultiHeadAttention", "SDPA")


@dataclass
class AttentionRef:
    """A per-layer check entry of an int8 attention layer, read as ``layer_checks.QuantizedRef`` is
    (names, ``input_scale`` 1: none, activations are quantized at run time): ``weights`` as
    ``mha_int8`` takes them (float32 CPU; empty for SDPA) and the MHA's head count."""

    torch_name: str
    ncnn_name: str
    weights: dict[str, Tensor] = field(default_factory=dict)
    num_heads: int = 0
    input_scale: float = 1.0


def _t(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def attention_isolated_reference(lay: NcnnLayer, xs: list[np.ndarray], ref: AttentionRef) -> Tensor:
    """ncnn's int8 ``lay`` on its own input blobs ``xs`` (one sample each, in ``lay.bottoms``
    order), float32 in the shape of its output blob. ValueError for another layer type."""
    blobs = [_t(x) for x in xs]
    mask = blobs.pop() if lay.get_int(5, 0) else None
    if lay.type == "SDPA":
        scale = lay.get_float(6, 0.0) or None
        return sdpa_int8(blobs[0][None], blobs[1][None], blobs[2][None], mask, scale)[0]
    if lay.type != "MultiHeadAttention":
        raise ValueError(f"ncnn layer '{lay.name}' is {lay.type}, not an attention layer")
    q = blobs[0]
    k = blobs[1] if len(blobs) > 1 else q
    v = blobs[2] if len(blobs) > 2 else k
    scale = lay.get_float(6, float("nan"))
    scale = None if np.isnan(scale) else scale  # absent: ncnn's default 1.f / sqrtf(head_dim)
    return mha_int8(q[None], k[None], v[None], ref.weights, ref.num_heads, scale, mask)[0]
