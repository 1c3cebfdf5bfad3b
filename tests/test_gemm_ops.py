"""``ncnnqat::fake_quantize_gemm``: ncnn's int8 Gemm (Linear on 3-D/4-D input) simulated exactly.

The oracle is ncnn itself: float Gemm layers (as pnnx writes them, and one with B stored
untransposed) go through the int8 writer (``gemm_specs``) and run in the ncnn runtime on x86 and
on the emulated Cortex-A53/A76; the op on ncnn's own input blob of each layer must give the same
bits with fp16 storage off (on x86 up to the rare one-step roundings of its AVX-512 kernels, see
``_assert_x86_exact_but_one_steps``), and stay within fp16's rounding under ARM's default options.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lightning_ncnnqat.ops as ops
from lightning_ncnnqat.ncnn.bin_layout import TAG_FP32
from lightning_ncnnqat.ncnn.int8_gemm import GemmSpec, b_scale_of
from lightning_ncnnqat.ncnn.int8_writer import write_int8
from lightning_ncnnqat.ncnn.isolated import run_ncnn
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.ncnn.targets import environment_problem
from lightning_ncnnqat.ops import reference as R
from lightning_ncnnqat.verification.parity import cosine

_ARM = environment_problem()
if _ARM is not None and os.environ.get("LIGHTNING_NCNNQAT_REQUIRE_ARM") == "1":
    raise RuntimeError(f"LIGHTNING_NCNNQAT_REQUIRE_ARM=1 but {_ARM}")
TARGETS = ["x86"] + ([] if _ARM else ["arm64-a53", "arm64-a76"])
STRICT = {"num_threads": 1, "use_packing_layout": False, "use_fp16_storage": False, "use_fp16_packed": False,
          "use_fp16_arithmetic": False, "use_bf16_storage": False}


def _gemm_chain(tmp: Path, gen: torch.Generator) -> tuple[Path, Path, list[tuple[str, torch.Tensor, torch.Tensor | None]]]:
    """in0 [M=6, K=16] -> Gemm(16->24, bias, 3=1) -> Gemm(24->1100, no bias, B stored 3=0) ->
    Gemm(1100->7, bias: K past float32's exact range) as float32 ncnn files, written in int8 by
    the writer; returns the int8 files and (top blob, weight [N, K], bias) per layer."""
    dims = [(16, 24, True, 1), (24, 1100, False, 0), (1100, 7, True, 1)]
    lines, data, layers = ["Input in0 0 1 in0"], b"", []
    for i, (k, n, has_bias, trans_b) in enumerate(dims):
        w = torch.randn(n, k, generator=gen) * (torch.rand(n, 1, generator=gen) * 3 + 0.05)  # rows of different range
        b = torch.randn(n, generator=gen) if has_bias else None
        bottom, top = ("in0" if i == 0 else f"g{i - 1}"), f"g{i}"
        c = "6=1 10=4" if has_bias else "6=1 10=-1"
        lines.append(f"Gemm gemm_{i} 1 1 {bottom} {top} 2=0 3={trans_b} 4=0 5=1 {c} 7=0 8={n} 9={k}")
        stored = w if trans_b else w.T.contiguous()
        data += struct.pack("<I", TAG_FP32) + stored.numpy().astype("<f4").tobytes()
        if b is not None:
            data += struct.pack("<I", TAG_FP32) + b.numpy().astype("<f4").tobytes()
        layers.append((top, w, b))
    text = "7767517\n%d %d\n%s\n" % (len(lines), len(lines), "\n".join(lines))
    specs = {f"gemm_{i}": GemmSpec(f"gemm_{i}", f"l{i}", float(b_scale_of(w.numpy()))) for i, (_, w, _) in enumerate(layers)}
    res = write_int8(NcnnParam.parse(text), data, {}, quantize_gemm=False, gemm_specs=specs)
    assert set(res.gemm_int8) == set(specs) and "18=2" in res.param_text
    param, binp = tmp / "g.param", tmp / "g.bin"
    param.write_text(res.param_text)
    binp.write_bytes(res.bin_bytes)
    return param, binp, layers


@pytest.mark.parametrize("target", TARGETS)
def test_op_equals_ncnn_int8_gemm(target: str, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(18)
    param, binp, layers = _gemm_chain(tmp_path, gen)
    x = torch.randn(3, 6, 16, generator=gen) * 4
    x[1, 2] = 0.0  # an all-zero row: scale 1, output = bias
    x[2, 0] = (torch.round(x[2, 0] * 4).clamp(-126, 125) + 0.5) / 64  # (n + 0.5) / 64: with absmax 127 / 64
    x[2, 0, 0] = 127.0 / 64  # the scale is 64, x * scale = n + 0.5 exactly: every value a tie (half away from 0)
    blobs = ["in0"] + [t for t, _, _ in layers]
    for opts, exact in ((STRICT, True), ({"num_threads": 1}, target == "x86")):
        got = run_ncnn(param, binp, {"in0": x.numpy()}, blobs, opts, target=target).outputs
        for (top, w, b), bottom in zip(layers, blobs):
            a = torch.from_numpy(np.asarray(got[bottom], dtype=np.float32))
            want = ops.fake_quantize_gemm(a, w, b).numpy()
            y = np.asarray(got[top], dtype=np.float32).reshape(want.shape)
            if not exact:  # ARM default options: the blobs in fp16 storage
                assert cosine(want, y) > 0.99999, (target, top, cosine(want, y))
            elif target == "x86":
                _assert_x86_exact_but_one_steps(a.reshape(-1, w.shape[1]), w, y.reshape(-1, w.shape[0]),
                                                want.reshape(-1, w.shape[0]), (top, opts))
            else:
                assert np.array_equal(y, want), (target, top, opts, float(np.abs(y - want).max()))


def _assert_x86_exact_but_one_steps(a: torch.Tensor, w: torch.Tensor, y: np.ndarray, want: np.ndarray, what) -> None:
    """x86: equal bits, except where the wheel's AVX-512 kernels (``x * scale`` and the +-0.5 of
    their rounding contracted into one FMA) round one A value one step the other way, which is
    rare (a product within an ulp of k + 0.5): at most one A step in a row's output, in < 0.1 %."""
    bad = y != want
    assert bad.mean() < 1e-3, (what, int(bad.sum()))
    qa, a_abs, qb, b_scale = R.gemm_int8_levels(a, w)
    step = (a_abs / 127.0 / b_scale * 127.0).numpy()[:, None] * 1.0001  # one A level times max |qb|
    assert (np.abs(y - want) <= np.where(bad, step, 0.0)).all(), (what, float(np.abs(y - want).max()))


def test_op_levels_scales_and_rows() -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(5, 8, generator=gen)
    b = torch.randn(5, generator=gen)
    x = torch.randn(2, 3, 8, generator=gen)
    qa, a_abs, qb, b_scale = R.gemm_int8_levels(x, w)
    assert b_scale == torch.tensor(127.0) / w.abs().max() and qb.abs().max() == 127  # one scale for all of B
    assert torch.equal(qa.abs().amax(1), torch.full((6,), 127.0))  # every row reaches +-127: its own scale
    y = ops.fake_quantize_gemm(x, w, b)
    # a row scaled by a power of two gets the same levels: its output (minus bias) scales exactly
    x2 = x.clone()
    x2[0, 1] *= 8
    y0, y2 = ops.fake_quantize_gemm(x, w), ops.fake_quantize_gemm(x2, w)
    assert torch.equal(y2[0, 1], y0[0, 1] * 8) and torch.equal(y2[1], y0[1]) and torch.equal(y0 + b, y)
    # close to float, within the quantization error
    ref = F.linear(x, w, b)
    assert (y - ref).abs().max() < 0.05 * ref.abs().max()
    z = torch.zeros(1, 8)
    assert torch.equal(ops.fake_quantize_gemm(z, w, b), b[None])


@pytest.mark.parametrize("shape, bias, dtype", [((2, 5, 8), True, torch.float32), ((2, 3, 4, 8), False, torch.float32),
                                                ((4, 8), True, torch.bfloat16)])
def test_op_gradients_are_straight_through(shape: tuple[int, ...], bias: bool, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(6, 8, generator=gen).requires_grad_()
    b = torch.randn(6, generator=gen).requires_grad_() if bias else None
    y = ops.fake_quantize_gemm(x, w, b)
    assert y.shape == (*shape[:-1], 6) and y.dtype == dtype
    g = torch.randn(y.shape, generator=gen).to(dtype)
    y.backward(g)
    qa, a_abs, qb, b_scale = R.gemm_int8_levels(x.detach(), w.detach())
    x_fq = qa / R.scale_from_absmax(a_abs, 8)[:, None]
    w_fq = qb / b_scale
    g2 = g.float().reshape(-1, 6)
    assert torch.equal(x.grad, (g2 @ w_fq).reshape(shape).to(dtype))
    assert torch.equal(w.grad, g2.T @ x_fq)
    if bias:
        assert torch.equal(b.grad, g2.sum(0))
    torch.library.opcheck(torch.ops.ncnnqat.fake_quantize_gemm.default, (x.detach().requires_grad_(), w.detach(), b))


def test_op_rejects_bad_arguments() -> None:
    x, w = torch.randn(2, 3, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="`x` must end with K=8"):
        ops.fake_quantize_gemm(torch.randn(2, 3, 7), w)
    with pytest.raises(ValueError, match="`weight` must be 2-D"):
        ops.fake_quantize_gemm(x, w[None])
    with pytest.raises(ValueError, match=r"`bias` must have shape \(5,\)"):
        ops.fake_quantize_gemm(x, w, torch.randn(4))
    with pytest.raises(TypeError, match="`x` must be float32"):
        ops.fake_quantize_gemm(x.double(), w)
