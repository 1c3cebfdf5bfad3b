"""The learned per-tensor threshold (TQT / LSQ): ``ncnnqat::fake_quantize_per_tensor_threshold_backward``.

Oracles: the pure-PyTorch reference (``reference.fake_quantize_per_tensor_threshold_backward``),
an independent float64 autograd of the straight-through surrogate, and a finite difference of
the real forward where the derivative is exact (every element clipped). The compiled CPU kernel
must give ``grad_x`` bit for bit and ``grad_threshold`` to float32 summation-order accuracy;
the CUDA tests skip with the reason without a GPU.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from test_ops import (
    DTYPES,
    PER_TENSOR_SHAPES,
    REQUIRE_KERNELS,
    RUNNING_VALUES,
    ROOT,
    assert_bitexact,
    extreme_case,
    layouts,
    make_activation,
    make_gen,
)
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_ncnnqat.ops as ops
from lightning_ncnnqat.ops import reference as R

OP = "fake_quantize_per_tensor_threshold_backward"
HAS_CPU = torch._C._dispatch_has_kernel_for_dispatch_key(f"ncnnqat::{OP}", "CPU")
needs_cpu_kernel = pytest.mark.skipif(
    not HAS_CPU and not REQUIRE_KERNELS, reason=f"no compiled CPU kernel for ncnnqat::{OP}: {ops.STATUS.reasons}"
)
HAS_CUDA = torch.cuda.is_available()
HAS_CUDA_KERNEL = HAS_CUDA and torch._C._dispatch_has_kernel_for_dispatch_key(f"ncnnqat::{OP}", "CUDA")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (torch.cuda.is_available() is False)")
needs_cuda_kernel = pytest.mark.skipif(
    HAS_CUDA and not HAS_CUDA_KERNEL and not REQUIRE_KERNELS,
    reason=f"compiled CUDA kernels not loaded: {ops.STATUS.reasons.get('cuda', '?')}",
)


def new_op(grad: Tensor, x: Tensor, r: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    return torch.ops.ncnnqat.fake_quantize_per_tensor_threshold_backward(grad, x, r, bits)


def assert_sum_close(got: Tensor, want: Tensor, g: Tensor, x: Tensor, r: Tensor, bits: int, what: str) -> None:
    """grad_threshold within float32 summation-order error: |d| <= n * eps * sum|terms| / qmax."""
    assert got.dtype == torch.float32 and got.shape == r.shape, f"{what}: {got.dtype} {tuple(got.shape)}"
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    if torch.isnan(want).any():
        assert torch.isnan(got).all(), f"{what}: got {got.item()} want NaN"
        return
    terms = g.detach().cpu().double().reshape(-1) * R.threshold_grad_terms(x.cpu(), r.cpu(), bits).double().reshape(-1)
    mag = float(terms.abs().sum()) / R.qmax_of(bits)
    tol = 2 * (math.log2(max(terms.numel(), 2)) + 16) * 2.0**-24 * mag + 1e-30
    assert abs(float(got) - float(want)) <= tol, f"{what}: got {got.item()} want {want.item()} (tol {tol})"


def finite_activation(shape: tuple[int, ...], dtype: torch.dtype, bits: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """make_activation's x (in and beyond the range, exact ties, +-inf) without NaN, so the sum is finite."""
    x, r = make_activation(shape, dtype, bits, gen)
    return torch.where(torch.isnan(x), torch.zeros_like(x), x), r


# ---------------------------------------------------------------------------------------------
# Reference: the formula, and independent checks of it


def test_reference_terms_formula() -> None:
    """qmax * d out/d t is (q - x*s) where kept and q (= +-qmax) where clipped; r < 0 gives 0."""
    r = torch.tensor([127.0])  # scale exactly 1
    x = torch.tensor([0.3, -0.3, 2.5, -2.5, 126.6, 127.4, 127.6, -300.0, 0.0])
    terms = R.threshold_grad_terms(x, r, 8)
    want = torch.tensor([-0.3, 0.3, 0.5, -0.5, 0.4, -0.4, 127.0, -127.0, 0.0])
    assert torch.allclose(terms, want, atol=1e-6), terms
    g = torch.linspace(-1.0, 2.0, x.numel())
    gx, gt = R.fake_quantize_per_tensor_threshold_backward(g, x, r, 8)
    assert torch.equal(gx, R.fake_quantize_per_tensor_backward(g, x, r, 8))
    assert math.isclose(gt.item(), float((g.double() * want.double()).sum() / 127), rel_tol=1e-6)
    gx, gt = R.fake_quantize_per_tensor_threshold_backward(g, x, torch.tensor([-1.0]), 8)
    assert torch.equal(gx, g) and gt.item() == 0.0


def ste_surrogate_grad(x: Tensor, g: Tensor, t: float, bits: int) -> float:
    """d/dt sum(g * out) by float64 autograd of out = round_ste(clamp(x*qmax/t)) * t / qmax (LSQ/TQT)."""
    qmax = R.qmax_of(bits)
    td = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    v = torch.clamp(x.double() * qmax / td, -qmax, qmax)
    q = v + (R.round_half_away(v) - v).detach()
    (g.double() * q * td / qmax).sum().backward()
    return float(td.grad)


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_threshold_grad_matches_float64_ste_autograd(bits: int) -> None:
    """Away from rounding ties and the clip boundary, the op's gradient equals autograd's of the STE surrogate."""
    gen = make_gen(("ste-autograd", bits))
    qmax = R.qmax_of(bits)
    t = 2.3
    x = torch.randn(5000, generator=gen) * t * 0.7
    v = (x.double() * qmax / t).abs()
    frac = v - v.floor()
    safe = ((frac - 0.5).abs() > 1e-3) & ((v - qmax).abs() > 0.6)  # no ties; not in [qmax-0.6, qmax+0.6]
    x = x[safe]
    assert (v[safe] > qmax).any() and (v[safe] < qmax).any()  # both clipped and kept elements
    g = torch.randn(x.shape, generator=gen)
    r = torch.tensor([t])
    want = ste_surrogate_grad(x, g, float(r.item()), bits)
    for fn in (R.fake_quantize_per_tensor_threshold_backward, new_op):
        _, gt = fn(g, x, r, bits)
        assert math.isclose(gt.item(), want, rel_tol=1e-4, abs_tol=1e-4), (fn, gt.item(), want)


def test_threshold_grad_matches_finite_difference_when_clipped() -> None:
    """All elements clipped: out = sign(x) * t exactly, so a finite difference of the real forward is exact."""
    gen = make_gen("fd-clipped")
    t = 1.5
    x = torch.randn(3000, generator=gen).sign() * (3.0 + torch.rand(3000, generator=gen) * 10)
    g = torch.randn(3000, generator=gen)

    def loss(tt: float) -> float:
        out = torch.ops.ncnnqat.fake_quantize_per_tensor(x, torch.tensor([tt]), 8)
        return float((g.double() * out.double()).sum())

    h = 1e-3
    fd = (loss(t + h) - loss(t - h)) / (2 * h)
    _, gt = new_op(g, x, torch.tensor([t]), 8)
    assert math.isclose(gt.item(), fd, rel_tol=1e-4), (gt.item(), fd)
    assert math.isclose(fd, float((g.double() * x.sign().double()).sum()), rel_tol=1e-4)


def test_threshold_grad_matches_finite_difference_of_frozen_residual() -> None:
    """Where kept, the STE gradient is the derivative with the rounding residual q - x*s held fixed:
    a float64 finite difference of sum(g * (x*s(t) + residual) / s(t)) (ties and clip boundary avoided)."""
    gen = make_gen("fd-residual")
    qmax, t = 127.0, 0.8
    x = torch.randn(4000, generator=gen) * 0.3
    v = x.double() * qmax / t
    keep = ((v - v.round()).abs() < 0.45) & (v.abs() < qmax - 1)
    x = x[keep]
    g = torch.randn(x.shape, generator=gen)
    s0 = qmax / t
    residual = R.round_half_away(x.double() * s0) - x.double() * s0

    def f(tt: float) -> float:
        s = qmax / tt
        return float((g.double() * (x.double() * s + residual) / s).sum())

    h = 1e-4
    fd = (f(t + h) - f(t - h)) / (2 * h)
    _, gt = new_op(g, x, torch.tensor([t]), 8)
    assert math.isclose(gt.item(), fd, rel_tol=1e-3, abs_tol=1e-3), (gt.item(), fd)


# ---------------------------------------------------------------------------------------------
# Compiled CPU kernel vs the reference


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize("shape", PER_TENSOR_SHAPES + [(3, 100_003)], ids=str)
def test_cpu_kernel_matches_reference(shape: tuple[int, ...], bits: int, dtype: torch.dtype) -> None:
    gen = make_gen(("learned", shape, bits, str(dtype)))
    x, r = finite_activation(shape, dtype, bits, gen)
    g = torch.randn(shape, generator=gen).to(dtype)
    want_x, want_t = R.fake_quantize_per_tensor_threshold_backward(g, x, r, bits)
    for name, view in layouts(x):
        got_x, got_t = new_op(g, view, r, bits)
        assert_bitexact(got_x, want_x, f"grad_x {shape} {bits}b {dtype} {name}")
        assert_bitexact(got_x, R.fake_quantize_per_tensor_backward(g, x, r, bits), f"grad_x == STE {name}")
        assert_sum_close(got_t, want_t, g, x, r, bits, f"grad_t {shape} {bits}b {dtype} {name}")


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("running", RUNNING_VALUES)
def test_cpu_kernel_extreme_ranges(running: float, dtype: torch.dtype) -> None:
    """NaN/inf in x and grad, tiny/huge ranges: grad_x bit-exact, grad_threshold NaN exactly when the
    reference's is, 0 when uninitialised."""
    x, g = extreme_case(make_gen(("learned", running, str(dtype))), dtype, 100)
    r = torch.tensor([running])
    for bits in (8, 6):
        want_x, want_t = R.fake_quantize_per_tensor_threshold_backward(g, x, r, bits)
        got_x, got_t = new_op(g, x, r, bits)
        assert_bitexact(got_x, want_x, f"grad_x range {running} {bits}b {dtype}")
        assert torch.isnan(got_t).equal(torch.isnan(want_t)), (got_t, want_t)
        if running < 0:
            assert got_t.item() == 0.0 and want_t.item() == 0.0
        # Without the NaN/inf gradients and NaN inputs, the sums agree.
        gf = torch.where(torch.isfinite(g), g, torch.ones_like(g))
        xf = torch.where(torch.isnan(x), torch.zeros_like(x), x)
        want_x, want_t = R.fake_quantize_per_tensor_threshold_backward(gf, xf, r, bits)
        got_x, got_t = new_op(gf, xf, r, bits)
        assert_bitexact(got_x, want_x, f"finite grad_x range {running} {bits}b {dtype}")
        assert_sum_close(got_t, want_t, gf, xf, r, bits, f"finite grad_t range {running} {bits}b {dtype}")


@needs_cpu_kernel
def test_cpu_kernel_mixed_dtypes_empty_and_shapes() -> None:
    gen = make_gen("learned-mixed")
    x, r = finite_activation((3000,), torch.float32, 8, gen)
    g = torch.randn(3000, generator=gen).half()
    want_x, want_t = R.fake_quantize_per_tensor_threshold_backward(g, x, r, 8)
    got_x, got_t = new_op(g, x, r, 8)
    assert_bitexact(got_x, want_x, "mixed grad_x")
    assert_sum_close(got_t, want_t, g, x, r, 8, "mixed grad_t")
    e = torch.empty(3, 0)
    got_x, got_t = new_op(e, e, r, 8)
    assert got_x.shape == (3, 0) and got_t.item() == 0.0
    r0 = torch.tensor(2.0)  # a 0-dim threshold: the gradient has its shape
    _, got_t = new_op(g, x, r0, 8)
    assert got_t.shape == () and got_t.dtype == torch.float32


@needs_cpu_kernel
def test_cpu_sum_independent_of_thread_count() -> None:
    """Fixed blocks and lanes: the same bits with 1 and 2 threads (and on repeated calls)."""
    gen = make_gen("learned-threads")
    x, r = finite_activation((1_000_003,), torch.float32, 8, gen)
    g = torch.randn(x.shape, generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, one = new_op(g, x, r, 8)
        torch.set_num_threads(2)
        _, two = new_op(g, x, r, 8)
        _, again = new_op(g, x, r, 8)
    finally:
        torch.set_num_threads(before)
    assert_bitexact(one, two, "1 vs 2 threads")
    assert_bitexact(two, again, "repeat")


@needs_cpu_kernel
def test_cpu_kernel_errors() -> None:
    x = torch.randn(8, 3)
    r = torch.tensor([1.0])
    with pytest.raises(RuntimeError, match=rf"ncnnqat::{OP}: `bits` must be in \[2, 8\], got 9"):
        new_op(x, x, r, 9)
    with pytest.raises(RuntimeError, match=rf"ncnnqat::{OP}: `grad` has shape \[8, 2\] but `x` has shape \[8, 3\]"):
        new_op(x[:, :2], x, r, 8)
    with pytest.raises(RuntimeError, match=rf"ncnnqat::{OP}: `running_absmax` must be a 1-element float32"):
        new_op(x, x, r.double(), 8)
    with pytest.raises(RuntimeError, match=rf"ncnnqat::{OP}: `x` must be float32.*Double"):
        new_op(x, x.double(), r, 8)


# ---------------------------------------------------------------------------------------------
# Autograd of fake_quantize_per_tensor with a threshold that requires grad


class OpLog(TorchDispatchMode):
    """Records the ncnnqat ops that run below autograd."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func.namespace == "ncnnqat":
            self.names.append(func._opname)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autograd_threshold_gradient(dtype: torch.dtype) -> None:
    gen = make_gen(("autograd", str(dtype)))
    x0, _ = finite_activation((4, 50), dtype, 8, gen)
    g = torch.randn(x0.shape, generator=gen).to(dtype)
    log_t = torch.tensor([math.log(2.0)], requires_grad=True)
    x = x0.clone().requires_grad_()
    t = log_t.exp()
    y = torch.ops.ncnnqat.fake_quantize_per_tensor(x, t, 8)
    with OpLog() as log:
        y.backward(g)
    assert log.names == [OP], log.names  # both gradients in one op
    want_x, want_t = R.fake_quantize_per_tensor_threshold_backward(g, x0, t.detach(), 8)
    assert_bitexact(x.grad, want_x, "x.grad")
    assert math.isclose(log_t.grad.item(), want_t.item() * t.item(), rel_tol=1e-5, abs_tol=1e-7)
    # Only the threshold requires grad.
    t2 = torch.tensor([2.0], requires_grad=True)
    torch.ops.ncnnqat.fake_quantize_per_tensor(x0, t2, 8).backward(g)
    assert_sum_close(t2.grad, want_t, g, x0, t2.detach(), 8, "t.grad only")


def test_autograd_moving_average_path_unchanged() -> None:
    """A buffer threshold (no grad) takes the plain STE backward: no threshold op, no threshold grad."""
    gen = make_gen("autograd-buffer")
    x = (torch.randn(300, generator=gen) * 3).requires_grad_()
    r = torch.tensor([2.0])
    g = torch.randn(300, generator=gen)
    y = torch.ops.ncnnqat.fake_quantize_per_tensor(x, r, 8)
    with OpLog() as log:
        y.backward(g)
    assert log.names == ["fake_quantize_per_tensor_backward"], log.names
    assert r.grad is None
    assert_bitexact(x.grad, R.fake_quantize_per_tensor_backward(g, x.detach(), r, 8), "x.grad")


def test_autograd_uninitialised_threshold_gets_zero() -> None:
    x = torch.randn(100, generator=make_gen("uninit")).requires_grad_()
    t = torch.tensor([-1.0], requires_grad=True)
    g = torch.randn(100, generator=make_gen("uninit-g"))
    torch.ops.ncnnqat.fake_quantize_per_tensor(x, t, 8).backward(g)
    assert t.grad.item() == 0.0 and torch.equal(x.grad, g)


def test_python_fallback_autograd_gives_threshold_gradient() -> None:
    """With LIGHTNING_NCNNQAT_FORCE_REFERENCE=1 (Python autograd, reference kernels) the same gradients."""
    code = (
        "import torch, math\n"
        "import lightning_ncnnqat.ops as o\n"
        "from lightning_ncnnqat.ops import _registry, reference as R\n"
        "assert not _registry.AUTOGRAD_IN_CPP and not o.STATUS.cpu\n"
        "g = torch.Generator().manual_seed(5)\n"
        "x0 = torch.randn(2000, generator=g) * 3; gy = torch.randn(2000, generator=g)\n"
        "x = x0.clone().requires_grad_(); t = torch.tensor([2.5], requires_grad=True)\n"
        "torch.ops.ncnnqat.fake_quantize_per_tensor(x, t, 8).backward(gy)\n"
        "wx, wt = R.fake_quantize_per_tensor_threshold_backward(gy, x0, t.detach(), 8)\n"
        "assert torch.equal(x.grad, wx) and torch.equal(t.grad, wt), (t.grad, wt)\n"
        "assert wt.abs().item() > 0\n"
        "r = torch.tensor([2.5]); x.grad = None\n"
        "torch.ops.ncnnqat.fake_quantize_per_tensor(x, r, 8).backward(gy)\n"
        "assert r.grad is None and torch.equal(x.grad, R.fake_quantize_per_tensor_backward(gy, x0, r, 8))\n"
        "x1 = x0.clone(); t1 = torch.tensor([2.5], requires_grad=True)\n"
        "torch.ops.ncnnqat.fake_quantize_per_tensor(x1, t1, 8).backward(gy)\n"
        "assert torch.equal(t1.grad, wt)\n"
        "lt = torch.tensor([0.9162], requires_grad=True); e = torch.ops.ncnnqat.threshold_from_log(lt)\n"
        "e.backward(torch.tensor([2.0])); assert torch.equal(e.detach(), lt.detach().exp())\n"
        "assert torch.equal(lt.grad, 2.0 * e.detach())\n"
        "print('ok')\n"
    )
    env = dict(os.environ, LIGHTNING_NCNNQAT_FORCE_REFERENCE="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# torch.library checks


def opcheck_learned(device: str) -> None:
    gen = make_gen(("opcheck-learned", device))
    x = (torch.randn(4, 5, 6, generator=gen) * 3).to(device)
    r = torch.tensor([2.5], device=device)
    g = torch.randn(x.shape, generator=gen).to(device)
    torch.library.opcheck(torch.ops.ncnnqat.fake_quantize_per_tensor_threshold_backward.default, (g, x, r, 8))
    torch.library.opcheck(
        torch.ops.ncnnqat.fake_quantize_per_tensor_threshold_backward.default, (g.half(), x.bfloat16(), r, 6)
    )
    torch.library.opcheck(
        torch.ops.ncnnqat.fake_quantize_per_tensor.default, (x, r.clone().requires_grad_(), 8)
    )
    torch.library.opcheck(
        torch.ops.ncnnqat.fake_quantize_per_tensor.default, (x.clone().requires_grad_(), r.clone().requires_grad_(), 8)
    )


def test_opcheck_cpu() -> None:
    opcheck_learned("cpu")


def test_threshold_from_log_is_atens_exp() -> None:
    """ncnnqat::threshold_from_log: exactly torch.exp (forward), grad * exp (backward); in C++ when built."""
    lt = torch.log(torch.rand(1000, generator=make_gen("exp")) * 100 + 1e-3).requires_grad_()
    out = torch.ops.ncnnqat.threshold_from_log(lt)
    assert torch.equal(out.detach(), lt.detach().exp())
    g = torch.randn(1000, generator=make_gen("exp-g"))
    out.backward(g)
    assert torch.equal(lt.grad, g * out.detach())
    if HAS_CPU:
        assert torch._C._dispatch_has_kernel_for_dispatch_key("ncnnqat::threshold_from_log", "Autograd")
    torch.library.opcheck(torch.ops.ncnnqat.threshold_from_log.default, (lt.detach()[:1].clone().requires_grad_(),))


def test_fake_kernel_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 4, dtype=torch.bfloat16)
        gx, gt = new_op(torch.empty(2, 3, 4, dtype=torch.bfloat16), x, torch.empty(1), 8)
        assert gx.shape == (2, 3, 4) and gx.dtype == torch.bfloat16
        assert gt.shape == (1,) and gt.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# CUDA (skips with the reason without a GPU)


@needs_cuda
@needs_cuda_kernel
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", PER_TENSOR_SHAPES + [(1_000_003,), (64, 3, 128, 129)], ids=str)
def test_cuda_kernel_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    gen = make_gen(("learned-cuda", shape, str(dtype)))
    x, r = finite_activation(shape, dtype, 8, gen)
    g = torch.randn(shape, generator=gen).to(dtype)
    want_x, want_t = R.fake_quantize_per_tensor_threshold_backward(g, x, r, 8)
    xd, gd, rd = x.to("cuda"), g.to("cuda"), r.to("cuda")
    got_x, got_t = new_op(gd, xd, rd, 8)
    assert_bitexact(got_x, want_x, f"cuda grad_x {shape} {dtype}")
    assert_sum_close(got_t, want_t, g, x, r, 8, f"cuda grad_t {shape} {dtype}")
    _, again = new_op(gd, xd, rd, 8)
    assert_bitexact(again, got_t, "cuda grad_t deterministic")
    flat = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")
    mis = flat[1:].view(x.shape)
    mis.copy_(xd)
    got_x2, got_t2 = new_op(gd, mis, rd, 8)
    assert_bitexact(got_x2, want_x, "cuda misaligned grad_x")
    assert_sum_close(got_t2, want_t, g, x, r, 8, "cuda misaligned grad_t")
    _, zero = new_op(gd, xd, torch.tensor([-1.0], device="cuda"), 8)
    assert zero.item() == 0.0
    torch.cuda.synchronize()


@needs_cuda
@needs_cuda_kernel
@pytest.mark.cuda
def test_cuda_empty_and_opcheck() -> None:
    e = torch.empty(3, 0, device="cuda")
    _, gt = new_op(e, e, torch.tensor([2.0], device="cuda"), 8)
    assert gt.item() == 0.0
    opcheck_learned("cuda")
