"""ncnn's int8 Gemm built on the ``dynamic_quantize`` ops: what ``ncnnqat::fake_quantize_gemm`` runs.

The quantization is ``torch.ops.ncnnqat.dynamic_quantize`` / ``dynamic_fake_quantize`` (one fused
pass each: the compiled CPU / CUDA kernel where built, :mod:`reference` elsewhere); the int8
products are summed exactly (:func:`int8_matmul`). The result is bit-identical to
:func:`reference.fake_quantize_gemm` and :func:`reference.fake_quantize_gemm_backward`, the oracle
(same levels, same exact integer sums, the same float32 steps after them).

Where the time went before (``benchmarks/ops.py --gemm``): the reference's quantization is
about fifteen elementwise passes over ``x`` (abs, isfinite, where, clamp, trunc, sign...), forward
and again in the backward, several times the matmul itself.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lightning_ncnnqat.ops.reference import GEMM_QMAX, exact_level_matmul

#: Largest K whose int8 dot products cannot overflow an int32 accumulator (K * 127**2 < 2**31).
INT32_EXACT_K = (2**31 - 1) // int(GEMM_QMAX * GEMM_QMAX)
#: Smallest K given to ``torch._int_mm``: torch 2.13's CPU ``_int_mm`` returns garbage for K = 1
#: (measured; K = 2 to 1041 were exact here), and a tiny K gains nothing from it anyway.
INT_MM_MIN_K = 16


@functools.cache
def int_mm_is_exact() -> bool:
    """Whether ``torch._int_mm`` on CPU sums int8 products exactly in int32 on this machine.

    oneDNN computes it with VNNI / AMX instructions (exact) where the CPU has them; without
    them (AVX2, AVX-512 before VNNI) its s8s8 kernels add pairs of products in saturating int16
    (``vpmaddubsw``), and +-127 operands come out wrong: measured here with
    ``ONEDNN_MAX_CPU_ISA=AVX2`` (15 of 25 probes wrong). So the worst cases are probed once, at
    several shapes, against an int32 product; any difference, or an error, means no.
    """
    try:
        gen = torch.Generator().manual_seed(0)
        for m, k, n in ((1, 64, 8), (17, 16, 24), (5, 97, 3), (64, 1040, 33), (160, 130, 48)):
            for av, bv in ((127, 127), (-127, 127), (127, -127)):
                a = torch.full((m, k), av, dtype=torch.int8)
                b = torch.full((n, k), bv, dtype=torch.int8)
                if not torch.equal(torch._int_mm(a, b.T), a.int() @ b.int().T):
                    return False
            a = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
            b = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
            if not torch.equal(torch._int_mm(a, b.T), a.int() @ b.int().T):
                return False
    except (RuntimeError, AttributeError, NotImplementedError):  # no CPU _int_mm in this torch
        return False
    return True


def int8_matmul(qa: Tensor, qb: Tensor) -> Tensor:
    """``qa @ qb.T`` of int8 levels ``qa [M, K]``, ``qb [N, K]`` as float32 ``[M, N]``, exact (ncnn
    sums in int32): ``torch._int_mm`` on a CPU where it is exact (:func:`int_mm_is_exact`; several
    times faster than a float32 matmul), else float32 products (:func:`reference.exact_level_matmul`).
    Either way each output is the exact integer rounded once to float32."""
    k = qa.shape[1]
    if qa.device.type == "cpu" and INT_MM_MIN_K <= k <= INT32_EXACT_K and int_mm_is_exact():
        with torch.autocast("cpu", enabled=False):
            return torch._int_mm(qa, qb.T).float()
    return exact_level_matmul(qa.float(), qb.float().T)


def _rows(x: Tensor, k: int) -> Tensor:
    """``x [..., K]`` as ``[M, K]`` (also for K = 0)."""
    m = 1
    for d in x.shape[:-1]:
        m *= d
    return x.reshape(m, k)


def fake_quantize_gemm(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """ncnn's int8 Gemm of ``x [..., K]`` with constant ``weight [N, K]`` and ``bias [N]``: per-row
    levels of ``x``, per-tensor levels of ``weight``, exact int8 products, then
    ``acc * (absmax_row * ((1 / 127) / b_scale)) + bias`` in float32 (see
    :func:`reference.fake_quantize_gemm`). Returns ``[..., N]`` in ``x``'s dtype."""
    n, k = weight.shape
    qa, a_abs, _ = torch.ops.ncnnqat.dynamic_quantize(_rows(x, k), 1)
    qb, _, b_scale = torch.ops.ncnnqat.dynamic_quantize(weight, 2)
    inv_qmax = torch.ones_like(b_scale) / torch.full_like(b_scale, GEMM_QMAX)  # tensor / tensor: IEEE float32
    y = int8_matmul(qa, qb).mul_((a_abs * (inv_qmax / b_scale))[:, None])
    if bias is not None:
        y = y.add_(bias.float())
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


def fake_quantize_gemm_backward(
    grad: Tensor, x: Tensor, weight: Tensor, has_bias: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Straight-through gradients of :func:`fake_quantize_gemm` (as
    :func:`reference.fake_quantize_gemm_backward`): ``grad_x = grad @ w_fq``, ``grad_w = grad.T @
    x_fq``, ``grad_bias = sum(grad)`` with the fake-quantized operands from one fused pass each."""
    n, k = weight.shape
    x_fq, _ = torch.ops.ncnnqat.dynamic_fake_quantize(_rows(x, k), 1)
    w_fq, _ = torch.ops.ncnnqat.dynamic_fake_quantize(weight, 2)
    g = grad.contiguous().float().reshape(-1, n)
    with torch.autocast(g.device.type, enabled=False):
        grad_x = (g @ w_fq).reshape(x.shape).to(x.dtype).contiguous()
        grad_w = (g.T @ x_fq).to(weight.dtype).contiguous()
    grad_b = g.sum(0).to(weight.dtype).contiguous() if has_bias else None
    return grad_x, grad_w, grad_b
