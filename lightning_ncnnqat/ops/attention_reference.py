"""What ncnn's int8 MultiHeadAttention and SDPA compute, in PyTorch (the test oracle).

ncnn 1.0.20261020 runs both layers, on x86 and aarch64, as a chain of int8 ``Gemm`` layers
(``src/layer/{x86,arm}/multiheadattention_*.cpp``, ``sdpa_*.cpp``; the reference layers
``multiheadattention.cpp`` / ``sdpa.cpp`` ``forward_int8`` do the same math). Every activation
is quantized at run time, symmetric, ``q = clamp(round_half_away(x * s), -127, 127)`` with
``s = 127 / absmax`` (1 when absmax is 0), over:

* MHA input projections: the input tensor (one scale per sample: ncnn has no batch) against
  the weight quantized per output row (scales from the .bin, ``ncnn/int8_attention.py``);
  ``q = (acc / (w_s[j] * x_s) + b[j]) * scale``, k and v the same without ``scale``;
* Q K^T, per head: each query row (over the head dim) against the head's whole K;
  ``+ attn_mask``, softmax in float32;
* P V, per head: each row of P against the head's whole V;
* MHA output projection: each token row of the concatenated heads (over embed_dim) against the
  output weight with ONE scale; ``+ out_bias``.

SDPA is the middle two steps on ``[heads, L, d]`` blobs (K, V may have fewer heads: groups),
``qk = acc * descale * scale`` (``scale`` 0 meaning ``1/sqrt(d)``).

The descale of a row-quantized operand is ``absmax * ((1 / 127) / b_scale)``, the form of
ncnn's x86/arm Gemm kernels (``compute_A_tile_fp32_int8_scales``, the same as
``reference.fake_quantize_gemm``); with a constant A (MHA's q/k/v weights) it is
``1 / (a_scale * b_scale)`` (``gemm_AT_*_int8``). Softmax uses ncnn's vectorised ``exp``
approximation there, so the reference matches ncnn to float32 rounding, not bit for bit: a
row's int8 level may move by one step (see docs/export.md, "Attention in int8").

Each quantization is ``torch.ops.ncnnqat.dynamic_quantize`` (the compiled CPU / CUDA kernel where
built, bit-exact with ``reference.dynamic_quantize``); a group holding a NaN (a row, a matrix)
dequantizes to NaN as a whole. The integer products are exact (``reference.exact_level_matmul``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_ncnnqat.ops import _registry  # noqa: F401  (defines torch.ops.ncnnqat.dynamic_quantize)
from lightning_ncnnqat.ops.reference import exact_level_matmul

QMAX = 127.0


def _quantized(x: Tensor, dims: int) -> tuple[Tensor, Tensor, Tensor]:
    """ncnn's run-time quantization of ``x`` per group of its last ``dims`` dims: ``(levels`` as
    float32, ``absmax, scale)`` (``ops.dynamic_quantize``: the compiled kernel where built)."""
    q, absmax, scale = torch.ops.ncnnqat.dynamic_quantize(x, dims)
    return q.float(), absmax, scale


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` of integer-valued float32 tensors, exact (ncnn accumulates in int32)."""
    return exact_level_matmul(a, b)


def _row_dequant(acc: Tensor, row_absmax: Tensor, b_scale: Tensor) -> Tensor:
    """``acc * (absmax_row * ((1/127) / b_scale))`` in float32 (ncnn's dynamic-A descale)."""
    inv = torch.ones_like(b_scale) / torch.full_like(b_scale, QMAX)
    return acc * (row_absmax * (inv / b_scale)).unsqueeze(-1)


def _projection(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """A constant-weight int8 projection (ncnn Gemm with constant A = ``w``, one scale per row
    ``w_s``; B = ``x [..., L, K]`` one scale per sample): ``acc / (w_s[j] * x_s) + b[j]``."""
    qx, _, x_scale = _quantized(x, 2)
    wq, _, w_scale = _quantized(w.float(), 1)
    acc = _matmul(qx, wq.T)
    descale = torch.ones_like(acc) / (w_scale * x_scale.reshape(*x_scale.shape, 1, 1))
    y = acc * descale
    return y if bias is None else y + bias.float()


def _row_by_tensor(a: Tensor, b: Tensor, b_transposed: bool) -> Tensor:
    """Dynamic int8 ``a @ b.T`` (or ``a @ b`` when not ``b_transposed``) of ``[..., M, K]`` and a
    per-matrix-quantized ``b``: rows of ``a`` with their own scales, ``b`` with one per matrix."""
    qa, a_abs, _ = _quantized(a, 1)
    qb, _, b_scale = _quantized(b, 2)
    acc = _matmul(qa, qb.transpose(-1, -2) if b_transposed else qb)
    return _row_dequant(acc, a_abs, b_scale.unsqueeze(-1))


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float | None, mask: Tensor | None) -> Tensor:
    """int8 attention core on ``q [..., H, L, d]``, ``k/v [..., H, S, d]`` (heads aligned).
    ``scale`` None: it was already applied to q (MHA); else ``qk * scale`` (SDPA)."""
    qk = _row_by_tensor(q, k, True)
    if scale is not None:
        qk = qk * torch.tensor(scale, dtype=torch.float32, device=qk.device)
    if mask is not None:
        qk = qk + mask.float()
    p = torch.softmax(qk, dim=-1)
    return _row_by_tensor(p, v, False)


def mha_int8(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    weights: dict[str, Tensor],
    num_heads: int,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """ncnn's int8 MultiHeadAttention on ``query [B, L, qdim]``, ``key [B, S, kdim]``,
    ``value [B, S, vdim]`` (batch-first; each sample quantized alone, as ncnn runs it).

    ``weights``: ``q_weight [E, qdim]``, ``k_weight``, ``v_weight``, ``out_weight [qdim, E]`` and
    the four ``*_bias`` (``nn.MultiheadAttention``'s ``in_proj_weight`` split in three).
    ``scale`` defaults to ncnn's ``1.f / sqrtf(E / num_heads)`` (float32 throughout: 1 ulp off
    the double-rounded value for head dims such as 6, 7, 24); ``attn_mask`` is additive float
    ``[L, S]`` or ``[num_heads, L, S]``. Returns ``[B, L, qdim]`` float32.
    ValueError when E is not a multiple of ``num_heads``.
    """
    w = {k: t.float() for k, t in weights.items()}
    e = w["q_weight"].shape[0]
    if num_heads <= 0 or e % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide embed_dim={e}")
    d = e // num_heads
    if scale is None:  # ncnn's default: 1.f / sqrtf(embed_dim / num_heads), all float32
        alpha = torch.ones((), dtype=torch.float32) / torch.sqrt(torch.tensor(float(d), dtype=torch.float32))
    else:
        alpha = torch.tensor(scale, dtype=torch.float32)
    q = _projection(query.float(), w["q_weight"], w.get("q_bias")) * alpha
    k = _projection(key.float(), w["k_weight"], w.get("k_bias"))
    v = _projection(value.float(), w["v_weight"], w.get("v_bias"))

    def heads(t: Tensor) -> Tensor:
        return t.reshape(*t.shape[:-1], num_heads, d).transpose(-2, -3)  # [B, H, L, d]

    o = _attend(heads(q), heads(k), heads(v), None, attn_mask)
    o = o.transpose(-2, -3).reshape(*query.shape[:-1], e)  # [B, L, E]
    qo, o_abs, _ = _quantized(o, 1)
    qw, _, out_scale = _quantized(w["out_weight"], 2)
    y = _row_dequant(_matmul(qo, qw.T), o_abs, out_scale)
    return y + w["out_bias"] if "out_bias" in w else y


def sdpa_int8(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """ncnn's int8 SDPA on ``query [B, H, L, d]``, ``key [B, G, S, d]``, ``value [B, G, S, dv]``
    (G divides H: grouped heads share K/V, head h reads group ``h // (H // G)``), as
    ``F.scaled_dot_product_attention`` takes them. ``attn_mask`` additive float ``[L, S]`` or
    ``[H, L, S]``; ``scale`` None or 0 means ``1/sqrt(d)`` rounded once to float32 (ncnn's
    ``1.f / sqrt(embed_dim)``: a double square root). Returns ``[B, H, L, dv]`` float32.
    ValueError when G does not divide H."""
    h, g = query.shape[-3], key.shape[-3]
    if g <= 0 or h % g:
        raise ValueError(f"key/value heads ({g}) do not divide query heads ({h})")
    if g != h:
        key = key.repeat_interleave(h // g, dim=-3)
        value = value.repeat_interleave(h // g, dim=-3)
    s = 1.0 / math.sqrt(query.shape[-1]) if not scale else float(scale)
    return _attend(query.float(), key.float(), value.float(), s, attn_mask)


def mha_float(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    weights: dict[str, Tensor],
    num_heads: int,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """The float32 computation :func:`mha_int8` quantizes (same arguments, same order of steps:
    ``nn.MultiheadAttention``'s forward with its weights split as in ``weights``)."""
    w = {k: t.float() for k, t in weights.items()}
    e = w["q_weight"].shape[0]
    if num_heads <= 0 or e % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide embed_dim={e}")
    d = e // num_heads
    alpha = 1.0 / math.sqrt(d) if scale is None else scale

    def proj(x: Tensor, p: str) -> Tensor:
        y = x.float() @ w[p + "_weight"].T
        return y + w[p + "_bias"] if p + "_bias" in w else y

    def heads(t: Tensor) -> Tensor:
        return t.reshape(*t.shape[:-1], num_heads, d).transpose(-2, -3)

    q, k, v = heads(proj(query, "q") * alpha), heads(proj(key, "k")), heads(proj(value, "v"))
    qk = q @ k.transpose(-1, -2)
    if attn_mask is not None:
        qk = qk + attn_mask.float()
    o = (torch.softmax(qk, dim=-1) @ v).transpose(-2, -3).reshape(*query.shape[:-1], e)
    return proj(o, "out")


def mha_int8_ste(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    weights: dict[str, Tensor],
    num_heads: int,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """:func:`mha_int8`'s values with :func:`mha_float`'s gradients (straight-through around the
    whole layer: every rounding is dynamic absmax, which never clips, so no gradient is masked).
    A QAT forward for ``nn.MultiheadAttention``; costs one int8 and one float forward."""
    f = mha_float(query, key, value, weights, num_heads, scale, attn_mask)
    with torch.no_grad():
        y = mha_int8(query, key, value, weights, num_heads, scale, attn_mask)
    return y + (f - f.detach())  # exactly y (f - f is 0), the gradient of f


def sdpa_int8_ste(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """:func:`sdpa_int8`'s values with ``F.scaled_dot_product_attention``'s gradients (K/V heads
    repeated for groups), straight-through as :func:`mha_int8_ste`."""
    with torch.no_grad():
        y = sdpa_int8(query, key, value, attn_mask, scale)  # checks the head counts first
    h, g = query.shape[-3], key.shape[-3]
    k, v = (key, value) if g == h else (key.repeat_interleave(h // g, dim=-3), value.repeat_interleave(h // g, dim=-3))
    mask = None if attn_mask is None else attn_mask.float()
    f = torch.nn.functional.scaled_dot_product_attention(
        query.float(), k.float(), v.float(), attn_mask=mask, scale=scale or None
    )
    return y + (f - f.detach())  # exactly y (f - f is 0), the gradient of f
