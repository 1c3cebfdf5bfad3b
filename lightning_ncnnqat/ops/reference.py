"""Pure-PyTorch reference of the ncnn int8 fake-quant math.

This is the test oracle for the compiled kernels and the fallback when they are absent.
Every step is float32 and matches ncnn (see ``NCNN_INT8.md``):

* ``scale = qmax / absmax`` (a multiplier), ``qmax = 2**(bits-1) - 1``; absmax 0 gives 1,
  a scale that would overflow float32 is clamped to FLT_MAX, so it is always finite;
* ``q = clamp(round_half_away_from_zero(x * scale), -qmax, qmax)``, output ``q / scale``;
* absmax ignores non-finite values (NaN and +-inf never poison a range); a NaN input gives
  a NaN output, +-inf saturates to +-qmax / scale;
* the running range is ``-1`` until the first training batch initialises it; a quantizer
  whose range is uninitialised passes its input through unchanged.
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
