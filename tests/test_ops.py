"""The ncnnqat fake-quant ops on CPU: compiled kernels bit-exact with the reference, and more.

``torch.ops.ncnnqat.<op>`` on CPU tensors runs the compiled CPU kernel when
``lightning_ncnnqat._C`` is built; ``lightning_ncnnqat.ops.reference`` is the oracle. Kernel
tests skip (with the reason) when the library is not built, unless
``LIGHTNING_NCNNQAT_REQUIRE_KERNELS=1``, which turns that into a failure (for CI).
The case builders here are shared with ``test_ops_cuda.py``.

Inputs are fresh random tensors each run (seed printed on failure; set ``NCNNQAT_TEST_SEED``
to replay), with planted exact ties, all-zero groups, tiny/subnormal/huge magnitudes, NaN/inf.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from torch import Tensor

import lightning_ncnnqat.ops as ops
from lightning_ncnnqat.ops import reference as R
from lightning_ncnnqat.ops._cpp_lib import OPS

ROOT = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REQUIRE_KERNELS = os.environ.get("LIGHTNING_NCNNQAT_REQUIRE_KERNELS", "") == "1"
SEED = int(os.environ.get("NCNNQAT_TEST_SEED", random.randrange(2**31)))


def has_kernel(dispatch_key: str) -> bool:
    """Whether every ncnnqat op has a compiled kernel for ``dispatch_key`` ("CPU" / "CUDA")."""
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"ncnnqat::{op}", dispatch_key) for op in OPS)


HAS_CPU_KERNEL = has_kernel("CPU")
CPU_REASON = f"compiled CPU kernels not loaded: {ops.STATUS.reasons.get('cpu', '?')}"
needs_cpu_kernel = pytest.mark.skipif(not HAS_CPU_KERNEL and not REQUIRE_KERNELS, reason=CPU_REASON)


# ---------------------------------------------------------------------------------------------
# Comparison


_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_bitexact(got: Tensor, want: Tensor, what: str) -> None:
    """Same dtype, shape, NaN positions, and identical bits everywhere else (so -0 != +0)."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype} (seed {SEED})"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)} (seed {SEED})"
    assert got.is_contiguous(), f"{what}: output is not contiguous"
    g, w = got.detach().cpu().contiguous(), want.detach().cpu().contiguous()
    gn, wn = torch.isnan(g), torch.isnan(w)
    assert torch.equal(gn, wn), f"{what}: NaN positions differ at {torch.nonzero(gn != wn)[:5].tolist()} (seed {SEED})"
    assert torch.equal(g, w) or bool(gn.any()), f"{what}: values differ (seed {SEED})"
    gb, wb = g.view(_INT_VIEW[g.dtype])[~gn], w.view(_INT_VIEW[w.dtype])[~wn]
    if not torch.equal(gb, wb):
        bad = torch.nonzero(gb != wb)[:5].flatten()
        pairs = [(g[~gn][i].item(), w[~wn][i].item()) for i in bad.tolist()]
        raise AssertionError(f"{what}: {int((gb != wb).sum())} elements differ, e.g. (got, want) {pairs} (seed {SEED})")


# ---------------------------------------------------------------------------------------------
# Case builders (CPU tensors; the CUDA tests move them)


def make_gen(salt: object = 0) -> torch.Generator:
    """A CPU generator from the run's seed and a per-case salt (stable across processes)."""
    return torch.Generator().manual_seed((SEED + zlib.crc32(repr(salt).encode())) % 2**63)


def _magnitudes(dtype: torch.dtype) -> tuple[float, float, float]:
    """(tiny, subnormal, huge) magnitudes that mean something in ``dtype``."""
    if dtype == torch.float16:
        return 1e-5, 3e-7, 6e4  # 3e-7 is a float16 subnormal
    return 1e-30, 1e-40, 1e30  # 1e-40 is a float32 (and bfloat16) subnormal


def _tie_values(scale: float, count: int, qmax: float, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    """Values w (exact in ``dtype``) with float32(w * scale) = k + 0.5 exactly, both signs."""
    s = torch.tensor(scale, dtype=torch.float32)
    k = torch.randint(0, int(qmax), (4 * count,), generator=gen).double()
    sign = torch.where(torch.rand(4 * count, generator=gen) < 0.5, -1.0, 1.0).double()
    target = (sign * (k + 0.5)).float()
    w = (target.double() / scale).to(dtype)
    exact = (w.float() * s) == target
    return w[exact][:count]


def _near_tie_values(scale: float, qmax: float, dtype: torch.dtype) -> Tensor:
    """Values with float32(w * scale) just below k + 0.5 (e.g. 0.49999997: rounds toward 0)."""
    s = torch.tensor(scale, dtype=torch.float32)
    targets = torch.tensor([0.5, 1.5, qmax - 0.5], dtype=torch.float32)
    below = torch.nextafter(targets, torch.zeros_like(targets))
    above = torch.nextafter(targets, torch.full_like(targets, 1e9))
    t = torch.cat([below, above, -below, -above])
    w = (t.double() / scale).to(dtype)
    keep = (w.float() * s) == t
    return w[keep]


def pow2_absmax(qmax: float, gen: torch.Generator) -> float:
    """An absmax whose scale qmax/absmax is (close to) a power of two: makes exact ties plentiful."""
    m = int(torch.randint(-3, 7, (1,), generator=gen))
    return qmax * 2.0**-m


def make_weight(
    shape: tuple[int, ...], num_groups: int, dtype: torch.dtype, bits: int, gen: torch.Generator, special: bool = True
) -> Tensor:
    """A weight whose groups (dim 0 split in ``num_groups``) mix magnitudes and edge cases.

    Per group: random normal at a random magnitude; with ``special``, some groups are all zero,
    tiny, subnormal or huge, some carry NaN/inf, some get a power-of-two scale, and the others
    (about half) get planted exact ties (and near-ties) at w * scale = k + 0.5.
    """
    qmax = R.qmax_of(bits)
    n = math.prod(shape)
    gs = n // num_groups
    tiny, sub, huge = _magnitudes(dtype)
    lo, hi = (-2.0, 3.0) if dtype == torch.float16 else (-4.0, 4.0)
    w = torch.randn(num_groups, gs, generator=gen, dtype=torch.float64)
    mag = 10.0 ** (lo + (hi - lo) * torch.rand(num_groups, 1, generator=gen, dtype=torch.float64))
    w = (w * mag).to(dtype)
    if not special or gs == 0:
        return w.reshape(shape)
    # Kinds of group (up to 256 groups get one): 0 zero, 1 tiny, 2 subnormal, 3 huge, 4 NaN/inf,
    # 5-6 power-of-two scale, 5-9 planted ties.
    kinds = torch.randint(0, 10, (num_groups,), generator=gen)
    if num_groups == 1:
        kinds[0] = 5  # the only group: keep it non-zero, give it ties
    specials = torch.tensor([math.nan, math.inf, -math.inf], dtype=dtype)
    chosen = torch.randperm(num_groups, generator=gen)[:256].tolist()  # bounded set-up time
    for g in chosen:
        kind = int(kinds[g])
        if kind == 0:
            w[g] = 0.0
        elif kind in (1, 2, 3):
            w[g] = (torch.randn(gs, generator=gen, dtype=torch.float64) * (tiny, sub, huge)[kind - 1]).to(dtype)
        elif kind == 4:
            idx = torch.randint(0, gs, (max(1, gs // 8),), generator=gen)
            w[g, idx] = specials[torch.randint(0, 3, idx.shape, generator=gen)]
        elif gs >= 2:
            row = w[g].clone()
            if kind in (5, 6):
                a = pow2_absmax(qmax, gen)
                row = (torch.randn(gs, generator=gen).clamp(-3, 3) * (a / 4)).to(dtype)
                row[0] = a if bool(torch.rand(1, generator=gen) < 0.5) else -a
            # Plant ties away from the group's absmax element, so the scale stays the same.
            amax_at = int(row.float().abs().argmax())
            scale = float(R.scale_from_absmax(R.finite_absmax(row.float()), bits))
            ties = torch.cat([_tie_values(scale, gs, qmax, gen, dtype), _near_tie_values(scale, qmax, dtype)])
            others = torch.tensor([i for i in range(gs) if i != amax_at]) if gs < 64 else None
            if others is None:
                perm = torch.randperm(gs, generator=gen)
                others = perm[perm != amax_at]
            ties = ties[: others.numel() // 2 + 1]
            row[others[: ties.numel()]] = ties
            w[g] = row
    if num_groups > 1 and bool((w == 0).all()):
        w[-1, 0] = 1.0  # never an all-zero tensor
    return w.reshape(shape)


def make_activation(shape: tuple[int, ...], dtype: torch.dtype, bits: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(x, running_absmax): x has values inside and beyond the range, exact ties, NaN/inf."""
    qmax = R.qmax_of(bits)
    n = math.prod(shape)
    a = pow2_absmax(qmax, gen)
    x = (torch.randn(n, generator=gen) * a * 0.6).to(dtype)
    if n >= 8:
        scale = float(R.scale_from_absmax(torch.tensor(a), bits))
        ties = torch.cat([_tie_values(scale, n // 3, qmax, gen, dtype), _near_tie_values(scale, qmax, dtype)])
        ties = ties[: n // 2]
        x[torch.randperm(n, generator=gen)[: ties.numel()]] = ties
        specials = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0], dtype=dtype)
        x[torch.randperm(n, generator=gen)[:5]] = specials
    return x.reshape(shape), torch.tensor([a], dtype=torch.float32)


def layouts(t: Tensor) -> list[tuple[str, Tensor]]:
    """The same values in different memory layouts (contiguous, transposed, strided, expanded)."""
    out = [("contiguous", t)]
    if t.dim() >= 2:
        out.append(("transposed", t.transpose(0, t.dim() - 1).contiguous().transpose(0, t.dim() - 1)))
    big = torch.empty((t.shape[0] * 2,) + tuple(t.shape[1:]), dtype=t.dtype)
    big[::2] = t
    out.append(("strided dim0", big[::2]))
    if t.dim() >= 1 and t.shape[-1] > 1:
        wide = torch.empty(tuple(t.shape[:-1]) + (t.shape[-1] * 3,), dtype=t.dtype)
        wide[..., 1::3] = t
        out.append(("strided last dim, offset storage", wide[..., 1::3]))
    return out


# (shape, num_groups): ranks 1..5, many small groups, few large ones, depthwise-like groups,
# sizes past the parallel grain, and two groups large enough for the within-group parallel path.
PER_CHANNEL_CASES = [
    ((37,), 1),
    ((12,), 12),
    ((16, 9), 16),
    ((8, 3, 5), 4),
    ((32, 16, 3, 3), 32),
    ((64, 1, 3, 3), 64),
    ((6, 4, 3, 3), 2),
    ((4, 2, 3, 2, 5), 4),
    ((4096, 9), 4096),
    ((300, 577), 300),
    ((3, 70001), 3),
    ((2, 140000), 2),
    ((1, 9000), 1),
]

PER_TENSOR_SHAPES = [(1,), (7,), (33, 5), (3, 4, 5), (2, 3, 4, 5), (2, 2, 3, 4, 5), (400, 300), (70001,)]


# ---------------------------------------------------------------------------------------------
# Build and load


def test_compiled_cpu_kernels_registered() -> None:
    """The CPU library was built and registered a kernel for every op (the fallback is silent otherwise)."""
    if not HAS_CPU_KERNEL:
        if REQUIRE_KERNELS:
            pytest.fail(CPU_REASON)
        pytest.skip(CPU_REASON)
    assert ops.STATUS.cpu, ops.STATUS
    assert "cpu" not in ops.STATUS.reasons


@needs_cpu_kernel
def test_import_uses_compiled_kernels_without_warning() -> None:
    """A fresh interpreter imports the ops with warnings as errors: no fallback warning."""
    code = (
        "import torch, lightning_ncnnqat.ops as o; "
        "assert o.STATUS.cpu, o.STATUS; "
        "assert torch._C._dispatch_has_kernel_for_dispatch_key('ncnnqat::fake_quantize_per_tensor', 'CPU')"
    )
    env = {k: v for k, v in os.environ.items() if k != "LIGHTNING_NCNNQAT_FORCE_REFERENCE"}
    res = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr


def _find_nvcc() -> str | None:
    for cand in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return os.path.join(cand, "bin", "nvcc")
    return shutil.which("nvcc")


NVCC = _find_nvcc()


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, /usr/local/cuda, PATH)")
def test_cuda_kernels_compile_with_plain_nvcc(tmp_path: Path) -> None:
    """fake_quant_kernels.cu builds without torch headers, and emits no float FMA (exactness)."""
    src = ROOT / "csrc" / "cuda" / "fake_quant_kernels.cu"
    obj = tmp_path / "fake_quant_kernels.o"
    res = subprocess.run([NVCC, "-c", "-std=c++17", "-arch=sm_90", str(src), "-o", str(obj)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert obj.stat().st_size > 0
    ptx = tmp_path / "fake_quant_kernels.ptx"
    res = subprocess.run([NVCC, "-ptx", "-std=c++17", "-arch=sm_90", str(src), "-o", str(ptx)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = ptx.read_text()
    assert "ld.global.nc.v4" in text, "no 16-byte vector loads in the PTX"
    assert "fma.rn.f32" not in text, "float FMA in the PTX: results would differ from the reference"


# ---------------------------------------------------------------------------------------------
# Bit-exactness of the compiled CPU kernels


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize("shape,num_groups", PER_CHANNEL_CASES, ids=str)
def test_per_channel_bitexact(shape: tuple[int, ...], num_groups: int, bits: int, dtype: torch.dtype) -> None:
    gen = make_gen((shape, num_groups, bits, str(dtype)))
    w = make_weight(shape, num_groups, dtype, bits, gen)
    want, want_s = R.fake_quantize_per_channel(w, num_groups, bits)
    for name, view in layouts(w) if math.prod(shape) < 200_000 else [("contiguous", w)]:
        got, got_s = torch.ops.ncnnqat.fake_quantize_per_channel(view, num_groups, bits)
        assert_bitexact(got, want, f"per-channel {shape}/{num_groups} {bits}b {dtype} {name}")
        assert_bitexact(got_s, want_s, f"scales {shape}/{num_groups} {bits}b {dtype} {name}")
    assert torch.isfinite(got_s).all() and (got_s > 0).all()


@needs_cpu_kernel
def test_per_channel_planted_ties_round_away_from_zero() -> None:
    """A direct check of the tie rule, independent of the reference: k + 0.5 -> k + 1 (away)."""
    w = torch.tensor([[127.0, 0.5, -0.5, 1.5, -1.5, 126.5, -126.5, 0.49999997, -0.49999997]])
    out, s = torch.ops.ncnnqat.fake_quantize_per_channel(w, 1, 8)
    assert s.item() == 1.0
    assert out.tolist() == [[127.0, 1.0, -1.0, 2.0, -2.0, 127.0, -127.0, 0.0, -0.0]]


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_channel_integer_inputs(dtype: torch.dtype) -> None:
    """Raw-pixel-like integer weights: ties are frequent; must match C round()."""
    gen = make_gen(11)
    w = torch.randint(-255, 256, (16, 3, 8, 8), generator=gen).to(dtype)
    w[:, 0, 0, 0] = 255
    for bits in (8, 6):
        got, got_s = torch.ops.ncnnqat.fake_quantize_per_channel(w, 16, bits)
        want, want_s = R.fake_quantize_per_channel(w, 16, bits)
        assert_bitexact(got, want, f"integer weights {bits}b {dtype}")
        assert_bitexact(got_s, want_s, f"integer weights scales {bits}b {dtype}")


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_channel_empty(dtype: torch.dtype) -> None:
    for shape, groups in (((0, 3, 3, 3), 1), ((4, 0), 2), ((0,), 3)):
        w = torch.empty(shape, dtype=dtype)
        got, got_s = torch.ops.ncnnqat.fake_quantize_per_channel(w, groups, 8)
        want, want_s = R.fake_quantize_per_channel(w, groups, 8)
        assert_bitexact(got, want, f"empty {shape}")
        assert_bitexact(got_s, want_s, f"empty scales {shape}")


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize("shape", PER_TENSOR_SHAPES, ids=str)
def test_per_tensor_bitexact(shape: tuple[int, ...], bits: int, dtype: torch.dtype) -> None:
    gen = make_gen((shape, bits, str(dtype)))
    x, r = make_activation(shape, dtype, bits, gen)
    g = torch.randn(shape, generator=gen).to(dtype)
    want = R.fake_quantize_per_tensor(x, r, bits)
    want_g = R.fake_quantize_per_tensor_backward(g, x, r, bits)
    for name, view in layouts(x):
        got = torch.ops.ncnnqat.fake_quantize_per_tensor(view, r, bits)
        assert_bitexact(got, want, f"per-tensor {shape} {bits}b {dtype} {name}")
        got_g = torch.ops.ncnnqat.fake_quantize_per_tensor_backward(g, view, r, bits)
        assert_bitexact(got_g, want_g, f"per-tensor backward {shape} {bits}b {dtype} {name}")


# Running ranges: ordinary, zero (scale 1), tiny, subnormal (scale clamps to FLT_MAX), huge,
# uninitialised (-1: identity) and a non-power-of-two value.
RUNNING_VALUES = [3.0, 0.0, 1e-30, 1e-42, 1e30, -1.0, 0.7371]


def extreme_case(gen: torch.Generator, dtype: torch.dtype, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations mixing ordinary, tiny, subnormal and huge values with NaN/+-inf/+-0, and a
    gradient holding NaN and inf (where the STE mask is 0 they must become 0, not NaN)."""
    tiny, sub, huge = _magnitudes(dtype)
    x = torch.cat(
        [
            torch.randn(3 * n, generator=gen) * 3,
            torch.randn(n, generator=gen) * tiny,
            torch.randn(n, generator=gen) * sub,
            torch.randn(n, generator=gen) * huge,
            torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0]),
        ]
    ).to(dtype)
    g = torch.randn(x.shape, generator=gen).to(dtype)
    g[::7] = math.nan
    g[1::7] = math.inf
    return x, g


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("running", RUNNING_VALUES)
def test_per_tensor_extreme_ranges(running: float, dtype: torch.dtype) -> None:
    x, g = extreme_case(make_gen((running, str(dtype))), dtype, 100)
    r = torch.tensor([running])
    for bits in (8, 6):
        assert_bitexact(torch.ops.ncnnqat.fake_quantize_per_tensor(x, r, bits), R.fake_quantize_per_tensor(x, r, bits),
                        f"range {running} {bits}b {dtype}")
        assert_bitexact(
            torch.ops.ncnnqat.fake_quantize_per_tensor_backward(g, x, r, bits),
            R.fake_quantize_per_tensor_backward(g, x, r, bits),
            f"backward range {running} {bits}b {dtype}",
        )


@needs_cpu_kernel
def test_per_tensor_uninitialised_is_identity() -> None:
    x = torch.randn(5, 7, generator=make_gen(3)).t()
    r = torch.tensor([-1.0])
    out = torch.ops.ncnnqat.fake_quantize_per_tensor(x, r, 8)
    assert out.is_contiguous() and torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    g = torch.randn(7, 5, generator=make_gen(4))
    assert torch.equal(torch.ops.ncnnqat.fake_quantize_per_tensor_backward(g, x * 1e6, r, 8), g)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_tensor_empty(dtype: torch.dtype) -> None:
    for shape in ((0,), (3, 0, 2)):
        x = torch.empty(shape, dtype=dtype)
        r = torch.tensor([2.0])
        assert_bitexact(torch.ops.ncnnqat.fake_quantize_per_tensor(x, r, 8), R.fake_quantize_per_tensor(x, r, 8), "empty")
        assert_bitexact(
            torch.ops.ncnnqat.fake_quantize_per_tensor_backward(x, x, r, 8),
            R.fake_quantize_per_tensor_backward(x, x, r, 8),
            "empty backward",
        )
        r1, r2 = torch.tensor([2.0]), torch.tensor([2.0])
        torch.ops.ncnnqat.update_absmax_(x, r1, 0.5)
        R.update_absmax_(x, r2, 0.5)
        assert_bitexact(r1, r2, "update on empty")


# ---------------------------------------------------------------------------------------------
# Running range (EMA)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_update_absmax_bitexact_sequence(dtype: torch.dtype) -> None:
    """A sequence of batches (with NaN/inf, huge and tiny ones) gives the reference's bits."""
    gen = make_gen(21)
    tiny, sub, huge = _magnitudes(dtype)
    r_k, r_r = torch.tensor([-1.0]), torch.tensor([-1.0])
    for step, momentum in enumerate([0.1, 0.01, 0.3333333, 1.0, 0.9, 0.05, 0.1]):
        mag = [1.0, 10.0, tiny, huge, sub, 0.37, 1e3][step]
        x = (torch.randn(3000 if step % 2 else 70001, generator=gen) * mag).to(dtype)
        x[::97] = math.nan
        x[5::101] = math.inf
        x[7::103] = -math.inf
        view = x.reshape(-1, 1).t() if step % 3 == 0 else x[::2]
        torch.ops.ncnnqat.update_absmax_(view, r_k, momentum)
        R.update_absmax_(view, r_r, momentum)
        assert_bitexact(r_k, r_r, f"running after step {step}")
        assert torch.isfinite(r_k).all() and r_k.item() >= 0, f"running range became {r_k.item()}"


@needs_cpu_kernel
def test_update_absmax_semantics() -> None:
    """First batch initialises; later ones move by momentum * (batch - running) in float32."""
    r = torch.tensor([-1.0])
    x1 = torch.tensor([0.5, -3.0, 2.0, math.nan, math.inf])
    torch.ops.ncnnqat.update_absmax_(x1, r, 0.1)
    assert r.item() == 3.0  # non-finite values ignored; momentum irrelevant on the first batch
    x2 = torch.tensor([1.0, -5.0])
    torch.ops.ncnnqat.update_absmax_(x2, r, 0.1)
    m = torch.tensor(0.1, dtype=torch.float32)
    expect = torch.tensor(3.0) + m * (torch.tensor(5.0) - torch.tensor(3.0))
    assert r.item() == expect.item()
    torch.ops.ncnnqat.update_absmax_(torch.full((4,), math.nan), r, 0.5)  # all non-finite: batch absmax 0
    assert r.item() == (expect + torch.tensor(0.5) * (0 - expect)).item()


@pytest.mark.parametrize("momentum", [0.1, 1.0])
def test_public_wrapper_ema_and_eval(momentum: float) -> None:
    """Training updates the buffer then quantizes with it; eval leaves it untouched."""
    gen = make_gen(31)
    buf = torch.tensor([-1.0])
    x = torch.randn(64, 8, generator=gen) * 4
    y = ops.fake_quantize_per_tensor(x, buf, momentum, training=True)
    first = R.finite_absmax(x)
    assert buf.item() == first.item()
    assert torch.equal(y, R.fake_quantize_per_tensor(x, buf, 8))
    x2 = torch.randn(64, 8, generator=gen) * 9
    ops.fake_quantize_per_tensor(x2, buf, momentum, training=True)
    expect = torch.tensor([first.item()])
    R.update_absmax_(x2, expect, momentum)
    assert torch.equal(buf, expect)
    before = buf.clone()
    y_eval = ops.fake_quantize_per_tensor(x2 * 100, buf, momentum, training=False)
    assert torch.equal(buf, before), "eval must not touch the running range"
    assert torch.equal(y_eval, R.fake_quantize_per_tensor(x2 * 100, buf, 8))
    assert y_eval.abs().max() <= buf.item() * (1 + 1e-6)  # clipped to the range


def test_uninitialised_eval_passes_through() -> None:
    x = torch.randn(10, generator=make_gen(41))
    buf = torch.tensor([-1.0])
    assert torch.equal(ops.fake_quantize_per_tensor(x, buf, 0.1, training=False), x)
    assert buf.item() == -1.0


# ---------------------------------------------------------------------------------------------
# Gradients (straight-through estimators), through the public wrappers


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_channel_gradient_passes_everything(dtype: torch.dtype) -> None:
    gen = make_gen(51)
    w = (torch.randn(8, 4, 3, 3, generator=gen) * 2).to(dtype).requires_grad_()
    out, _ = ops.fake_quantize_per_channel(w, 8, bits=6)
    g = torch.randn(out.shape, generator=gen).to(dtype)
    out.backward(g)
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_tensor_gradient_zero_exactly_where_clipped(dtype: torch.dtype) -> None:
    gen = make_gen(61)
    buf = torch.tensor([127.0])
    x = (torch.randn(2000, generator=gen) * 127).to(dtype)
    s = R.scale_from_absmax(buf, 8)
    assert s.item() == 1.0
    # Values straddling the clip edge |x * s| = qmax + 0.5 = 127.5.
    below = torch.nextafter(torch.tensor(127.5), torch.tensor(0.0)).item()  # float32's
    x[:6] = torch.tensor([127.5, -127.5, below, -below, 500.0, -500.0]).to(dtype)
    x.requires_grad_()
    y = ops.fake_quantize_per_tensor(x, buf, 0.1, training=False)
    g = torch.randn(x.shape, generator=gen).to(dtype)
    y.backward(g)
    clipped = (x.detach().float() * s).abs() >= 127.5
    assert clipped.any() and (~clipped).any()
    assert torch.equal(x.grad[clipped], torch.zeros_like(g[clipped]))
    assert torch.equal(x.grad[~clipped], g[~clipped])
    assert (x.grad[:2] == 0).all() and (x.grad[4:6] == 0).all()  # exactly 127.5 is clipped (round -> 128)
    if dtype == torch.float32:
        assert torch.equal(x.grad[2:4], g[2:4])  # a hair under 127.5 rounds to 127: kept


def test_per_tensor_gradient_uninitialised_passes_all() -> None:
    x = (torch.randn(50, generator=make_gen(71)) * 100).requires_grad_()
    y = ops.fake_quantize_per_tensor(x, torch.tensor([-1.0]), 0.1, training=False)
    g = torch.randn(50, generator=make_gen(72))
    y.backward(g)
    assert torch.equal(x.grad, g)


# ---------------------------------------------------------------------------------------------
# torch.library checks and torch.compile


def opcheck_all(device: str) -> None:
    """torch.library.opcheck on every op with inputs on ``device`` (schema, fake, autograd, AOT)."""
    gen = make_gen(81)
    w = torch.randn(8, 3, 3, 3, generator=gen).to(device).requires_grad_()
    torch.library.opcheck(torch.ops.ncnnqat.fake_quantize_per_channel.default, (w, 8, 8))
    torch.library.opcheck(torch.ops.ncnnqat.fake_quantize_per_channel.default, (w.detach().half(), 4, 6))
    x = (torch.randn(4, 5, 6, generator=gen) * 3).to(device)
    r = torch.tensor([2.5], device=device)
    torch.library.opcheck(torch.ops.ncnnqat.update_absmax_.default, (x, r.clone(), 0.1))
    torch.library.opcheck(torch.ops.ncnnqat.fake_quantize_per_tensor.default, (x.clone().requires_grad_(), r, 8))
    torch.library.opcheck(torch.ops.ncnnqat.fake_quantize_per_tensor.default, (x.bfloat16(), r, 6))
    torch.library.opcheck(torch.ops.ncnnqat.fake_quantize_per_tensor_backward.default, (torch.randn_like(x), x, r, 8))


@needs_cpu_kernel
def test_opcheck_cpu() -> None:
    opcheck_all("cpu")


class TinyQATNet(torch.nn.Module):
    """Per-tensor fake-quant of the input and per-channel fake-quant of a weight (public ops),
    combined elementwise so that eager and compiled results can be compared bit for bit."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(8, 3, 3, 3))
        self.register_buffer("act_range", torch.tensor([-1.0]))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xq = ops.fake_quantize_per_tensor(x, self.act_range, 0.1, self.training)
        wq, scales = ops.fake_quantize_per_channel(self.weight, 8, bits=6)
        return xq * 2.0, wq * scales[:, None, None, None]


def compile_matches_eager(device: str) -> None:
    """fullgraph torch.compile gives eager's outputs, gradients and buffer, in train and eval."""
    eager = TinyQATNet().to(device)
    compiled_mod = TinyQATNet().to(device)
    compiled_mod.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_mod, fullgraph=True)
    gen = make_gen(91)
    for step in range(3):
        x = (torch.randn(2, 3, 8, 8, generator=gen) * (step + 1)).to(device).requires_grad_()
        xc = x.detach().clone().requires_grad_()
        ye, we = eager(x)
        yc, wc = compiled(xc)
        assert torch.equal(ye, yc) and torch.equal(we, wc), f"train step {step}"
        assert torch.equal(eager.act_range, compiled_mod.act_range), f"buffer after step {step}"
        cy = torch.randn(ye.shape, generator=gen).to(device)
        cw = torch.randn(we.shape, generator=gen).to(device)
        ((ye * cy).sum() + (we * cw).sum()).backward()
        ((yc * cy).sum() + (wc * cw).sum()).backward()
        assert torch.equal(x.grad, xc.grad) and torch.equal(eager.weight.grad, compiled_mod.weight.grad)
    assert eager.act_range.item() > 0
    eager.eval()
    compiled_mod.eval()
    x = torch.randn(2, 3, 8, 8, generator=gen).to(device) * 10
    before = compiled_mod.act_range.clone()
    for a, b in zip(eager(x), compiled(x)):
        assert torch.equal(a, b), "eval"
    assert torch.equal(compiled_mod.act_range, before)


def test_torch_compile_fullgraph_cpu() -> None:
    compile_matches_eager("cpu")


# ---------------------------------------------------------------------------------------------
# Argument errors name the op, the argument and the value


def test_public_wrapper_errors() -> None:
    w = torch.randn(8, 3)
    buf = torch.tensor([-1.0])
    with pytest.raises(ValueError, match=r"fake_quantize_per_channel: `bits`.*9"):
        ops.fake_quantize_per_channel(w, 8, bits=9)
    with pytest.raises(ValueError, match=r"`bits`.*True"):
        ops.fake_quantize_per_channel(w, 8, bits=True)
    with pytest.raises(ValueError, match=r"`num_groups`.*0"):
        ops.fake_quantize_per_channel(w, 0)
    with pytest.raises(ValueError, match=r"`num_groups`=3 must divide weight.shape\[0\]=8"):
        ops.fake_quantize_per_channel(w, 3)
    with pytest.raises(TypeError, match=r"`weight`.*torch.int64"):
        ops.fake_quantize_per_channel(torch.ones(4, dtype=torch.long), 1)
    with pytest.raises(TypeError, match=r"fake_quantize_per_tensor: `running_absmax`.*torch.float64"):
        ops.fake_quantize_per_tensor(w, buf.double(), 0.1, True)
    with pytest.raises(TypeError, match=r"`running_absmax`.*shape \(2,\)"):
        ops.fake_quantize_per_tensor(w, torch.zeros(2), 0.1, True)
    with pytest.raises(ValueError, match=r"`momentum`.*1.5"):
        ops.fake_quantize_per_tensor(w, buf, 1.5, True)
    with pytest.raises(ValueError, match=r"`momentum`.*0.0"):
        ops.fake_quantize_per_tensor(w, buf, 0.0, True)


@needs_cpu_kernel
def test_kernel_errors() -> None:
    """The compiled kernels check their own arguments too (the ops are public via torch.ops)."""
    w = torch.randn(8, 3)
    r = torch.tensor([1.0])
    with pytest.raises(RuntimeError, match=r"ncnnqat::fake_quantize_per_channel: `bits` must be in \[2, 8\], got 9"):
        torch.ops.ncnnqat.fake_quantize_per_channel(w, 8, 9)
    with pytest.raises(RuntimeError, match=r"`num_groups`=5 must divide weight.numel\(\)=24"):
        torch.ops.ncnnqat.fake_quantize_per_channel(w, 5, 8)
    with pytest.raises(RuntimeError, match=r"`num_groups` must be >= 1, got 0"):
        torch.ops.ncnnqat.fake_quantize_per_channel(w, 0, 8)
    with pytest.raises(RuntimeError, match=r"fake_quantize_per_tensor: `x` must be float32.*Double"):
        torch.ops.ncnnqat.fake_quantize_per_tensor(w.double(), r, 8)
    with pytest.raises(RuntimeError, match=r"update_absmax_: `running_absmax` must be a 1-element float32 tensor, got Double"):
        torch.ops.ncnnqat.update_absmax_(w, r.double(), 0.1)
    with pytest.raises(RuntimeError, match=r"fake_quantize_per_tensor_backward: `grad` has shape \[8, 2\] but `x` has shape \[8, 3\]"):
        torch.ops.ncnnqat.fake_quantize_per_tensor_backward(w[:, :2], w, r, 8)
    with pytest.raises(RuntimeError, match=r"fake_quantize_per_tensor: `bits` must be in \[2, 8\], got 1"):
        torch.ops.ncnnqat.fake_quantize_per_tensor(w, r, 1)


def test_scale_is_one_ieee_float32_division_like_ncnn2table() -> None:
    """scale = 127 / absmax in one correctly rounded float32 division (ncnn2table), in the
    reference and in the compiled kernel (via the per-channel op's scales)."""
    import numpy as np

    a = np.random.default_rng(0).uniform(1e-3, 10.0, 4096).astype(np.float32)
    expected = np.float32(127.0) / a  # numpy float32 division is IEEE, one rounding
    got = R.scale_from_absmax(torch.from_numpy(a), 8).numpy()
    assert np.array_equal(got, expected)
    w = torch.from_numpy(a)[:, None] * torch.tensor([1.0, -0.5, 0.25])  # absmax of row g is a[g]
    _, scales = torch.ops.ncnnqat.fake_quantize_per_channel(w, len(a), 8)
    assert np.array_equal(scales.numpy(), expected)
