"""Pure-PyTorch reference of the ncnn int8 fake-quant math.

This is the test oracle for the compiled kernels and the fallback when they are absent.
Every step is float32 and matches ncnn (see ``NCNN_INT8.md``):

* ``scale = qmax / absmax`` (a multiplier), ``qmax = 2**(bits-1) - 1``; absmax 0 gives 1,
  a scale that would overflow float32 is clamped to FLT_MAX, so it is always finite;
* ``q = clamp(round_half_away_from_zero(x * scale), -qmax, qmax)``, output ``q / scale``;
* absmax ignores non-finite values (NaN and +-inf never poison a range); a NaN input gives
  a NaN output, +-inf saturates to +-qmax / scale;
* the running range is ``-1`` until the first training batch initialises it; a quantizer
  whose range is uninitialised passes its input through unchanged;
* ncnn's dynamic int8 (Gemm, MultiHeadAttention, SDPA activations, :func:`dynamic_quantize`)
  takes its scale from each group's own absmax at run time, 8-bit; a group holding a NaN gets
  a NaN scale, so all of it dequantizes to NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLT_MAX = torch.finfo(torch.float32).max


def qmax_of(bits: int) -> float:
    return float(2 ** (bits - 1) - 1)


def scale_from_absmax(absmax: Tensor, bits: int) -> Tensor:
    """ncnn's scale multiplier for a float32 absmax, guarded against zero and overflow."""
    absmax = absmax.float()
    # tensor / tensor: one correctly rounded float32 division, as ncnn's `127 / absmax`.
    # (`python_number / tensor` would run as reciprocal() * qmax: two roundings, off by 1 ulp.)
    scale = torch.full_like(absmax, qmax_of(bits)) / absmax
    scale = torch.where(absmax > 0, scale, torch.ones_like(scale))
    return torch.clamp(scale, max=FLT_MAX)


def round_half_away(v: Tensor) -> Tensor:
    """C ``round()``: ties go away from zero (``torch.round`` goes to even)."""
    t = torch.trunc(v)
    step = torch.where((v - t).abs() >= 0.5, torch.sign(v), torch.zeros_like(v))
    return t + step


def finite_absmax(x: Tensor, dim: int | None = None) -> Tensor:
    """max |x| over finite values (0 for an empty reduction)."""
    a = x.float().abs()
    a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    if dim is None:
        return a.amax() if a.numel() else a.new_zeros(())
    if a.shape[dim] == 0:
        shape = list(a.shape)
        del shape[dim]
        return a.new_zeros(shape)
    return a.amax(dim=dim)


def _quantize(xf: Tensor, scale: Tensor, bits: int) -> Tensor:
    qmax = qmax_of(bits)
    v = torch.clamp(xf * scale, -qmax, qmax)
    return round_half_away(v) / scale


def fake_quantize_per_channel(weight: Tensor, num_groups: int, bits: int) -> tuple[Tensor, Tensor]:
    """Symmetric per-group fake quantization of ``weight`` along dim 0; returns (weight_fq, scales)."""
    w = weight.contiguous().float().reshape(num_groups, -1)
    scales = scale_from_absmax(finite_absmax(w, dim=1), bits)
    out = _quantize(w, scales[:, None], bits)
    return out.reshape(weight.shape).to(weight.dtype).contiguous(), scales.contiguous()


def update_absmax_(x: Tensor, running_absmax: Tensor, momentum: float) -> None:
    """Moving average of the batch absmax, in place; the first batch (running < 0) initialises it."""
    b = finite_absmax(x).to(running_absmax.device)
    r = running_absmax.float()
    m = torch.tensor(momentum, dtype=torch.float32, device=r.device)
    new = torch.where(r < 0, b, r + m * (b - r))
    running_absmax.copy_(new)


def fake_quantize_per_tensor(x: Tensor, running_absmax: Tensor, bits: int) -> Tensor:
    """Fake-quantize ``x`` with the scale implied by ``running_absmax`` (identity if uninitialised)."""
    r = running_absmax.float().reshape(())
    xf = x.contiguous().float()
    out = _quantize(xf, scale_from_absmax(r, bits), bits)
    out = torch.where(r < 0, xf, out)
    return out.to(x.dtype).contiguous()


def fake_quantize_per_tensor_backward(grad: Tensor, x: Tensor, running_absmax: Tensor, bits: int) -> Tensor:
    """Clipped straight-through estimator: pass the gradient where ``round(x*scale)`` was not clamped."""
    r = running_absmax.float().reshape(())
    v = (x.contiguous().float() * scale_from_absmax(r, bits)).abs()
    keep = (v < qmax_of(bits) + 0.5) | (r < 0)
    g = grad.contiguous()
    return torch.where(keep, g, torch.zeros_like(g)).contiguous()


def threshold_grad_terms(x: Tensor, running_absmax: Tensor, bits: int) -> Tensor:
    """Per element ``qmax * d out / d threshold`` of the per-tensor fake quantizer (float32).

    ``out = q * t / qmax`` with ``s = qmax / t`` and a straight-through round, so
    ``d out / d t = (q - x*s) / qmax`` where the STE keeps ``x`` and ``q / qmax`` (``+-1``) where
    ``x`` was clipped (TQT / LSQ). Multiplied by ``qmax`` here: the sum is divided once.
    """
    r = running_absmax.float().reshape(())
    qmax = qmax_of(bits)
    v = x.contiguous().float() * scale_from_absmax(r, bits)
    q = round_half_away(torch.clamp(v, -qmax, qmax))
    return torch.where(v.abs() < qmax + 0.5, q - v, q)


def fake_quantize_per_tensor_threshold_backward(
    grad: Tensor, x: Tensor, running_absmax: Tensor, bits: int
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`fake_quantize_per_tensor` for ``x`` and for the threshold.

    Returns ``(grad_x, grad_threshold)``: ``grad_x`` is the clipped straight-through estimator
    (:func:`fake_quantize_per_tensor_backward`, ``grad``'s dtype); ``grad_threshold`` (float32,
    ``running_absmax``'s shape) is ``sum(grad * d out / d t)`` accumulated in float32 and divided
    by ``qmax`` once (see :func:`threshold_grad_terms`); 0 when the range is uninitialised (< 0)
    or ``x`` is empty. NaN in ``x`` or non-finite ``grad`` make it NaN/inf (never silently lost).
    """
    grad_x = fake_quantize_per_tensor_backward(grad, x, running_absmax, bits)
    r = running_absmax.float().reshape(())
    terms = grad.contiguous().float() * threshold_grad_terms(x, running_absmax, bits)
    total = terms.sum() / torch.full_like(r, qmax_of(bits))  # one IEEE division (tensor / tensor)
    total = torch.where(r < 0, torch.zeros_like(total), total)
    grad_t = total.reshape(running_absmax.shape).to(device=running_absmax.device).contiguous()
    return grad_x, grad_t


def threshold_from_log(log_threshold: Tensor) -> Tensor:
    """A learned threshold from its natural log: ``exp`` in float32 (ATen's, as eager mode computes it)."""
    return torch.exp(log_threshold.float()).contiguous()


def fold_factors(
    bn_weight: Tensor | None, bn_bias: Tensor | None, bn_mean: Tensor, bn_inv_std: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-channel (s, t) with BN(y) = y * s + t under frozen statistics, in float32.

    ``s = gamma * inv_std`` (``inv_std`` alone without affine), ``t = beta - mean * s``
    (``-(mean * s)`` without affine); each step is one float32 operation, as in the kernels.
    """
    inv_std = bn_inv_std.float()
    s = inv_std if bn_weight is None else bn_weight.float() * inv_std
    ms = bn_mean.float() * s
    t = -ms if bn_bias is None else bn_bias.float() - ms
    return s, t


def fold_weight_bias(
    weight: Tensor,
    bias: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    bn_mean: Tensor,
    bn_inv_std: Tensor,
) -> tuple[Tensor, Tensor]:
    """BN folded into the layer before it: float32 ``(weight * s[row], t + bias * s)``."""
    s, t = fold_factors(bn_weight, bn_bias, bn_mean, bn_inv_std)
    w = weight.contiguous().float() * s.reshape((-1,) + (1,) * (weight.dim() - 1))
    b = t if bias is None else t + bias.float() * s
    return w, b


def fold_fake_quantize_weight(
    weight: Tensor,
    bias: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    bn_mean: Tensor,
    bn_inv_std: Tensor,
    num_groups: int,
    bits: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fold BN into (weight, bias), then fake-quantize the folded weight per group.

    Returns ``(weight_fq, bias_folded, scales)``; both tensors in ``weight``'s dtype. The folded
    weight is quantized in float32 (never rounded to ``weight``'s dtype first).
    """
    w, b = fold_weight_bias(weight, bias, bn_weight, bn_bias, bn_mean, bn_inv_std)
    g = w.reshape(num_groups, -1)
    scales = scale_from_absmax(finite_absmax(g, dim=1), bits)
    out = _quantize(g, scales[:, None], bits)
    return (
        out.reshape(weight.shape).to(weight.dtype).contiguous(),
        b.to(weight.dtype).contiguous(),
        scales.contiguous(),
    )


def fold_fake_quantize_weight_backward(
    grad_weight_fq: Tensor,
    grad_bias: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    bn_weight: Tensor | None,
    bn_mean: Tensor,
    bn_inv_std: Tensor,
) -> tuple[Tensor, Tensor]:
    """Straight-through gradients of :func:`fold_fake_quantize_weight`.

    Returns ``grad_weight`` (``weight``'s dtype) and a float32 ``[3, C]`` tensor whose rows are
    the gradients of ``bias``, ``bn_weight`` and ``bn_bias``:
    ``grad_weight = g * s``, ``grad_s = sum(g * weight) + gb * (bias - mean)``,
    ``grad_bias = gb * s``, ``grad_gamma = grad_s * inv_std``, ``grad_beta = gb``.
    """
    c = weight.shape[0]
    s, _ = fold_factors(bn_weight, None, bn_mean, bn_inv_std)
    g = grad_weight_fq.contiguous().float().reshape(c, -1)
    w = weight.contiguous().float().reshape(c, -1)
    grad_weight = (g * s[:, None]).reshape(weight.shape).to(weight.dtype).contiguous()
    gb = grad_bias.float()
    centred = -bn_mean.float() if bias is None else bias.float() - bn_mean.float()
    grad_s = (g * w).sum(dim=1) + gb * centred
    vecs = torch.stack([gb * s, grad_s * bn_inv_std.float(), gb])
    return grad_weight, vecs.contiguous()


# --- Dynamic int8 (activations of Gemm, MultiHeadAttention, SDPA) ------------------------------
#: ncnn's dynamic int8 is 8-bit only (src/layer/gemm.cpp: ``127 / absmax`` for A rows and for B).
GEMM_QMAX = 127.0
#: Largest K whose int8 dot products stay exact in a float32 accumulator (K * 127 * 127 < 2**24).
_GEMM_F32_EXACT_K = int(2**24 // (GEMM_QMAX * GEMM_QMAX))


def _groups(x: Tensor, dims: int) -> tuple[tuple[int, ...], Tensor]:
    """``x`` as float32 ``[G, n]``: one row per group of its last ``dims`` dims; and the lead shape."""
    lead = tuple(x.shape[: x.dim() - dims])
    g = 1
    for d in lead:
        g *= d
    n = 1
    for d in x.shape[x.dim() - dims:]:
        n *= d
    return lead, x.contiguous().float().reshape(g, n)


def dynamic_quantize(x: Tensor, dims: int) -> tuple[Tensor, Tensor, Tensor]:
    """ncnn's run-time int8 quantization of ``x``, one symmetric scale per group of its last ``dims``
    dims (1: per row; 2: per matrix; ``x.dim()``: per tensor).

    Per group, in float32: ``absmax`` = max |x| over finite values, ``scale = 127 / absmax`` (1 when
    absmax is 0; clamped to FLT_MAX), ``q = clamp(round_half_away(x * scale), -127, 127)``: ncnn's
    ``absmax == 0.f ? 1.f : 127.f / absmax`` and ``float2int8`` (src/layer/gemm.cpp, sdpa.cpp,
    multiheadattention.cpp). A group holding a NaN gets ``absmax = scale = NaN`` and levels 0, so
    whatever is dequantized with it is NaN (ncnn's own result there is undefined); +-inf saturates.
    Returns ``(levels int8 [x.shape], absmax float32 [x.shape[:-dims]], scale float32 [same])``.
    """
    lead, xf = _groups(x, dims)
    absmax = finite_absmax(xf, dim=1)
    nan = torch.isnan(xf).any(dim=1) if xf.shape[1] else torch.zeros_like(absmax, dtype=torch.bool)
    scale = scale_from_absmax(absmax, 8)
    q = round_half_away(torch.clamp(xf * scale[:, None], -GEMM_QMAX, GEMM_QMAX))
    q = torch.where(nan[:, None], torch.zeros_like(q), q).to(torch.int8)
    nan_value = torch.full_like(absmax, float("nan"))
    absmax = torch.where(nan, nan_value, absmax)
    scale = torch.where(nan, nan_value, scale)
    return q.reshape(x.shape).contiguous(), absmax.reshape(lead).contiguous(), scale.reshape(lead).contiguous()


def dynamic_fake_quantize(x: Tensor, dims: int) -> tuple[Tensor, Tensor]:
    """:func:`dynamic_quantize` dequantized: ``(q / scale`` float32 ``[x.shape]``, ``scale)``; NaN for
    a group holding a NaN. Its gradient is straight-through (an absmax scale never clips)."""
    q, _, scale = dynamic_quantize(x, dims)
    lead, qf = _groups(q, dims)
    out = qf / scale.reshape(-1, 1)
    return out.reshape(x.shape).contiguous(), scale


# --- Gemm int8 (Linear on 3-D/4-D input, pnnx's ``Gemm``) ---------------------------------------


def gemm_int8_levels(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The integer levels and scales of ncnn's int8 Gemm with a constant B (float32 tensors).

    ``x`` ``[..., K]`` is A: each row (the last dim) is quantized at run time with its own
    scale ``127 / absmax(row)`` (1 for an all-zero row), as ``Gemm::forward_int8`` does; the
    weight ``[N, K]`` is B, one scale ``127 / absmax(B)`` for the whole tensor (what this
    package writes: ncnn2int8 takes the absmax of B's first row only, see ``ncnn/int8_gemm.py``).
    Returns ``(qa [M, K], a_absmax [M], qb [N, K], b_scale [])`` with ``M = x.numel() // K``.
    Rounding is half away from zero, clamped to +-127 (``float2int8``); absmax ignores +-inf,
    and a row (or B) holding a NaN has absmax and scale NaN: see :func:`dynamic_quantize`.
    """
    k = weight.shape[-1]
    qa, a_abs, _ = dynamic_quantize(x.reshape(-1, k), 1)
    qb, _, b_scale = dynamic_quantize(weight, 2)
    return qa.float(), a_abs, qb.float(), b_scale


def exact_level_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` of integer-valued float32 tensors (int8 levels, ``[..., M, K] @ [..., K, N]``),
    exact as ncnn's int32 accumulation: float32 is exact while ``K * 127**2 < 2**24`` whatever
    the summation order (also TF32 and bf16 inputs: |q| <= 127 is exact there), so K is split
    in such blocks whose exact float32 products are summed in float64 and rounded once to
    float32: the same bits as one float64 product. Autocast is off: it would round the sums to
    16 bits."""
    k = a.shape[-1]
    with torch.autocast(a.device.type, enabled=False):
        if k <= _GEMM_F32_EXACT_K:
            return a @ b
        acc = None
        for start in range(0, k, _GEMM_F32_EXACT_K):
            part = (a[..., start:start + _GEMM_F32_EXACT_K] @ b[..., start:start + _GEMM_F32_EXACT_K, :]).double()
            acc = part if acc is None else acc.add_(part)
        return acc.float()


def _int_matmul(qa: Tensor, qb: Tensor) -> Tensor:
    """``qa @ qb.T`` of integer-valued float32 matrices, exact (ncnn accumulates in int32)."""
    return exact_level_matmul(qa, qb.T)


def fake_quantize_gemm(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """What ncnn's int8 ``Gemm`` (constant B = ``weight``, C = ``bias``, 18=2) computes for ``x``.

    ``x [..., K]`` (float32/16/bf16), ``weight [N, K]``, ``bias [N]`` or None; returns
    ``[..., N]`` in ``x``'s dtype. With the levels of :func:`gemm_int8_levels`:
    ``acc = qa @ qb.T`` exactly (int32 in ncnn), ``y = acc * (absmax_row * ((1 / 127) / b_scale))
    + bias``, each step one float32 rounding. The descale is ncnn's x86 and aarch64 kernels'
    (``compute_A_tile_fp32_int8_scales``: ``absmax / (127 * B_scale)`` in the source, which the
    pip wheels' optimised build evaluates as ``absmax * ((1 / 127) / B_scale)``: the form that
    reproduces ncnn 1.0.20261020 bit for bit on x86 and the emulated Cortex-A53/A76 with fp16
    storage off, where the source's form is 1-2 ulp off; see docs/export.md).
    """
    qa, a_abs, qb, b_scale = gemm_int8_levels(x, weight)
    inv_qmax = torch.ones_like(b_scale) / torch.full_like(b_scale, GEMM_QMAX)  # tensor / tensor: IEEE float32
    descale = a_abs * (inv_qmax / b_scale)
    y = _int_matmul(qa, qb) * descale[:, None]
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype).contiguous()


def fake_quantize_gemm_backward(
    grad: Tensor, x: Tensor, weight: Tensor, has_bias: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Straight-through gradients of :func:`fake_quantize_gemm`: the forward as
    ``x_fq @ w_fq.T + bias`` with the rounding skipped (absmax scales never clip, so there is
    no clipped region): ``grad_x = grad @ w_fq``, ``grad_w = grad.T @ x_fq``, ``grad_bias =
    sum(grad)``; float32 math, each in its input's dtype (``grad_bias`` in ``weight``'s)."""
    x_fq, _ = dynamic_fake_quantize(x.reshape(-1, weight.shape[1]), 1)
    w_fq, _ = dynamic_fake_quantize(weight, 2)
    g = grad.contiguous().float().reshape(-1, weight.shape[0])
    with torch.autocast(g.device.type, enabled=False):
        grad_x = (g @ w_fq).reshape(x.shape).to(x.dtype).contiguous()
        grad_w = (g.T @ x_fq).to(weight.dtype).contiguous()
    grad_b = g.sum(0).to(weight.dtype).contiguous() if has_bias else None
    return grad_x, grad_w, grad_b
