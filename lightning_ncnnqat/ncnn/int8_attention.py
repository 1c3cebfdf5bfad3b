"""MultiHeadAttention and SDPA in int8 as ncnn reads them (torch-free).

pnnx writes ``nn.MultiheadAttention`` as one ``MultiHeadAttention`` layer (0=embed_dim 1=num_heads
2=weight_data_size 3=kdim 4=vdim 5=attn_mask 6=scale) and ``F.scaled_dot_product_attention`` as
one ``SDPA`` layer (5=attn_mask 6=scale, 0 meaning ``1/sqrt(head_dim)``). ncnn runs both in int8
when param 18 (``int8_scale_term`` / ``quantize_term``) is 2 (``src/layer/multiheadattention.cpp``,
``src/layer/sdpa.cpp`` ``forward_int8``; the x86 and arm layers build the same math from int8
``Gemm`` layers):

* MultiHeadAttention reads its four weights as int8 (tag 0x000D4B38) and, after the four biases,
  raw float32 scales: ``embed_dim`` for q, for k, for v (one per weight ROW, ``127/absmax(row)``)
  and ONE for the output weight (``127/absmax(all of it)``). Every activation is quantized at run
  time from its absmax (see ``ops/attention_reference.py``): the calibration table is not used.
* SDPA has no weights: 18=2 alone turns on its dynamic int8 path.

What ncnn2int8 does (``tools/quantize/ncnn2int8.cpp``): ``quantize_multiheadattention`` needs the
table rows ``<name>_param_0..3`` (q, k, v per row; out one value, all from ncnn2table's absmax
rule, the same scales as here) and stops the tool's MHA pass with "no scale param" when one is
missing; ``quantize_sdpa`` sets 18=2 on EVERY SDPA without any row. This module writes the same
bytes for MHA (weights rounded half away from zero, clamped to +-127, as ``quantize_to_int8``).
"""

from __future__ import annotations

import numpy as np

from lightning_ncnnqat.errors import LayerError
from lightning_ncnnqat.ncnn.bin_layout import TAG_FP32, TAG_INT8, BinEntry, raw_f32, tagged
from lightning_ncnnqat.ncnn.param import NcnnLayer

#: param 18 value ncnn2int8 writes for an int8 MultiHeadAttention / SDPA.
INT8_TERM = 2
#: the MHA .bin roles (bin_layout._mha), in file order.
_MHA_WEIGHTS = ("q_weight", "k_weight", "v_weight", "out_weight")


def absmax_scales(w: np.ndarray) -> np.ndarray:
    """``127 / absmax`` of every row of ``w`` [rows, cols] in float32; 1 for an all-zero row
    (ncnn2table's guard, ``tools/quantize/ncnn2table.cpp``)."""
    m = np.abs(np.asarray(w, dtype=np.float32)).max(axis=1)
    safe = np.where(m == 0, np.float32(1), m).astype(np.float32)
    return np.where(m == 0, np.float32(1), np.float32(127) / safe).astype(np.float32)


def quantize_rows(w: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """int8 levels ``clamp(round_half_away(w * scale_row), -127, 127)``, float32 products: what
    ncnn's ``quantize_to_int8`` writes (C ``round``, ties away from zero)."""
    v = np.asarray(w, dtype=np.float32) * np.asarray(scales, dtype=np.float32).reshape(-1, 1)
    r = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))
    return np.clip(r, -127, 127).astype(np.int8)


def mha_dims(lay: NcnnLayer) -> tuple[int, int, int, int, int]:
    """``(embed_dim, num_heads, qdim, kdim, vdim)`` of a MultiHeadAttention layer; LayerError when
    embed_dim is not a positive multiple of num_heads."""
    e, h = lay.get_int(0, 0), lay.get_int(1, 1)
    if e <= 0 or h <= 0 or e % h:
        raise LayerError(
            None, f"ncnn layer '{lay.name}' (MultiHeadAttention): embed_dim {e} is not a positive multiple of num_heads {h}"
        )
    return e, h, lay.get_int(2, 0) // e, lay.get_int(3, e), lay.get_int(4, e)


def mha_weights(lay: NcnnLayer, entries: list[BinEntry], data: bytes) -> dict[str, np.ndarray]:
    """The float weights and biases of a MultiHeadAttention: ``q_weight`` [embed, qdim],
    ``k_weight`` [embed, kdim], ``v_weight`` [embed, vdim], ``out_weight`` [qdim, embed] (rows =
    outputs, as ``nn.Linear``) and the four biases. LayerError for a layer already in int8."""
    e, _, qdim, kdim, vdim = mha_dims(lay)
    es = {x.role: x for x in entries}
    if lay.get_int(18, 0) or any(es[r].tag == TAG_INT8 for r in _MHA_WEIGHTS):
        raise LayerError(
            None, f"ncnn layer '{lay.name}' (MultiHeadAttention) is already quantized (18={lay.get_int(18, 0)})"
        )
    shapes = {"q_weight": (e, qdim), "k_weight": (e, kdim), "v_weight": (e, vdim), "out_weight": (qdim, e)}
    out = {r: es[r].values(data).reshape(s) for r, s in shapes.items()}
    out.update({r: es[r].values(data) for r in ("q_bias", "k_bias", "v_bias", "out_bias")})
    return out


def mha_scales(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weight scales ncnn2table computes for a MultiHeadAttention: q/k/v per row, out one
    value over the whole output weight (shape [1])."""
    s = {r[0]: absmax_scales(w[r + "_weight"]) for r in ("q", "k", "v")}
    s["out"] = absmax_scales(w["out_weight"].reshape(1, -1))
    return s


def write_mha_int8(lay: NcnnLayer, entries: list[BinEntry], data: bytes) -> tuple[list[bytes], dict[str, np.ndarray]]:
    """The .bin chunks of MultiHeadAttention ``lay`` in int8 (``lay`` gets 18=2 in place) and the
    scales written: int8 weights, float32 biases (tag 0), then q/k/v/out scales raw.

    The chunk order is ``MultiHeadAttention::load_model``'s; the bytes equal ncnn2int8's with a
    table holding :func:`mha_scales` (except the biases, which the tool stores as float16)."""
    w = mha_weights(lay, entries, data)
    s = mha_scales(w)
    chunks: list[bytes] = []
    for p in ("q", "k", "v", "out"):
        chunks.append(tagged(TAG_INT8, quantize_rows(w[p + "_weight"].reshape(len(s[p]), -1), s[p]).tobytes()))
        chunks.append(raw_f32(w[p + "_bias"]))
    chunks += [raw_f32(s["q"]), raw_f32(s["k"]), raw_f32(s["v"]), raw_f32(s["out"])]
    lay.set_int(18, INT8_TERM)
    return chunks, s


def write_sdpa_int8(lay: NcnnLayer) -> None:
    """Turn SDPA ``lay`` to int8 in place (18=2, as ncnn2int8's ``quantize_sdpa``): it has no
    weights, so its .bin chunks stay empty. LayerError for another layer type."""
    if lay.type != "SDPA":
        raise LayerError(None, f"ncnn layer '{lay.name}' is a {lay.type}, not an SDPA")
    lay.set_int(18, INT8_TERM)


def mha_float_chunks(lay: NcnnLayer, entries: list[BinEntry], data: bytes) -> list[bytes]:
    """The float32 .bin chunks of a float MultiHeadAttention (for tests that rebuild a .bin)."""
    w = mha_weights(lay, entries, data)
    out: list[bytes] = []
    for p in ("q", "k", "v", "out"):
        out += [tagged(TAG_FP32, np.ascontiguousarray(w[p + "_weight"], dtype="<f4").tobytes()), raw_f32(w[p + "_bias"])]
    return out
