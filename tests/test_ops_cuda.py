"""The ncnnqat fake-quant ops on CUDA: compiled kernels bit-exact with the reference, and more.

Every test here is marked ``cuda`` and skips (with the reason) without a CUDA device. The
oracle is the pure-PyTorch reference run on CPU copies of the same inputs. Kernel tests skip
when ``lightning_ncnnqat._C_cuda`` is not built, unless ``LIGHTNING_NCNNQAT_REQUIRE_KERNELS=1``.
Case builders are shared with ``test_ops.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_ops import (
    DTYPES,
    PER_CHANNEL_CASES,
    PER_TENSOR_SHAPES,
    REQUIRE_KERNELS,
    RUNNING_VALUES,
    _magnitudes,
    extreme_case,
    assert_bitexact,
    compile_matches_eager,
    has_kernel,
    layouts,
    make_activation,
    make_gen,
    make_weight,
    opcheck_all,
)

import lightning_ncnnqat.ops as ops
from lightning_ncnnqat.ops import reference as R

HAS_CUDA = torch.cuda.is_available()
HAS_CUDA_KERNEL = HAS_CUDA and has_kernel("CUDA")
CUDA_REASON = f"compiled CUDA kernels not loaded: {ops.STATUS.reasons.get('cuda', '?')}"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (torch.cuda.is_available() is False)"),
]
needs_cuda_kernel = pytest.mark.skipif(HAS_CUDA and not HAS_CUDA_KERNEL and not REQUIRE_KERNELS, reason=CUDA_REASON)
DEV = "cuda"


def same_layout_on(view: torch.Tensor, device: str) -> torch.Tensor:
    """A copy of ``view`` on ``device`` with the same sizes, strides and storage offset."""
    base = torch.empty(view.untyped_storage().nbytes() // view.element_size(), dtype=view.dtype, device=device)
    out = base.as_strided(view.shape, view.stride(), view.storage_offset())
    out.copy_(view)
    return out


def cuda_layouts(t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The CPU layouts on the GPU, plus a contiguous tensor whose data is not 16-byte aligned."""
    out = [(name, same_layout_on(view, DEV)) for name, view in layouts(t)]
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=DEV)
    misaligned = flat[1:].view(t.shape)
    misaligned.copy_(t)
    out.append(("contiguous, misaligned by one element", misaligned))
    return out


# GPU-specific paths: one warp per group (<= 512 elements), 64/128/256 threads per group (up to
# 4096), the chunked split path (> 4096), group sizes that are not whole 16-byte vectors.
CUDA_PER_CHANNEL_CASES = PER_CHANNEL_CASES + [
    ((128, 512), 128),
    ((64, 513), 64),
    ((32, 1024), 32),
    ((16, 2047), 16),
    ((8, 4096), 8),
    ((8, 4097), 8),
    ((200, 5000), 200),
    ((3, 1_000_003), 3),
    ((1, 3_000_000), 1),
    ((64, 3, 7, 7), 64),
]


@pytest.fixture(autouse=True)
def _check_cuda_errors():
    yield
    if HAS_CUDA:
        torch.cuda.synchronize()  # surfaces an asynchronous kernel fault in the test that caused it


def test_compiled_cuda_kernels_registered() -> None:
    if not HAS_CUDA_KERNEL:
        if REQUIRE_KERNELS:
            pytest.fail(CUDA_REASON)
        pytest.skip(CUDA_REASON)
    assert ops.STATUS.cuda, ops.STATUS


@needs_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize("shape,num_groups", CUDA_PER_CHANNEL_CASES, ids=str)
def test_per_channel_bitexact_cuda(shape: tuple[int, ...], num_groups: int, bits: int, dtype: torch.dtype) -> None:
    gen = make_gen(("cuda", shape, num_groups, bits, str(dtype)))
    w = make_weight(shape, num_groups, dtype, bits, gen)
    want, want_s = R.fake_quantize_per_channel(w, num_groups, bits)
    views = cuda_layouts(w) if math.prod(shape) < 200_000 else [("contiguous", w.to(DEV))]
    for name, view in views:
        got, got_s = torch.ops.ncnnqat.fake_quantize_per_channel(view, num_groups, bits)
        assert got.device.type == "cuda" and got_s.device.type == "cuda"
        assert_bitexact(got, want, f"cuda per-channel {shape}/{num_groups} {bits}b {dtype} {name}")
        assert_bitexact(got_s, want_s, f"cuda scales {shape}/{num_groups} {bits}b {dtype} {name}")


@needs_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_channel_empty_cuda(dtype: torch.dtype) -> None:
    for shape, groups in (((0, 3, 3, 3), 1), ((4, 0), 2), ((0,), 3)):
        w = torch.empty(shape, dtype=dtype)
        got, got_s = torch.ops.ncnnqat.fake_quantize_per_channel(w.to(DEV), groups, 8)
        want, want_s = R.fake_quantize_per_channel(w, groups, 8)
        assert_bitexact(got, want, f"empty {shape}")
        assert_bitexact(got_s, want_s, f"empty scales {shape}")


@needs_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize("shape", PER_TENSOR_SHAPES + [(1_000_003,), (64, 3, 128, 129)], ids=str)
def test_per_tensor_bitexact_cuda(shape: tuple[int, ...], bits: int, dtype: torch.dtype) -> None:
    gen = make_gen(("cuda", shape, bits, str(dtype)))
    x, r = make_activation(shape, dtype, bits, gen)
    g = torch.randn(shape, generator=gen).to(dtype)
    want = R.fake_quantize_per_tensor(x, r, bits)
    want_g = R.fake_quantize_per_tensor_backward(g, x, r, bits)
    rd, gd = r.to(DEV), g.to(DEV)
    views = cuda_layouts(x) if x.numel() < 200_000 else [("contiguous", x.to(DEV))]
    for name, view in views:
        assert_bitexact(torch.ops.ncnnqat.fake_quantize_per_tensor(view, rd, bits), want,
                        f"cuda per-tensor {shape} {bits}b {dtype} {name}")
        assert_bitexact(torch.ops.ncnnqat.fake_quantize_per_tensor_backward(gd, view, rd, bits), want_g,
                        f"cuda per-tensor backward {shape} {bits}b {dtype} {name}")


@needs_cuda_kernel
def test_per_tensor_backward_mixed_dtypes_cuda() -> None:
    """A gradient whose dtype differs from x's (allowed by the schema) takes the scalar path."""
    gen = make_gen(("cuda", "mixed"))
    x, r = make_activation((3000,), torch.float32, 8, gen)
    g = torch.randn(3000, generator=gen).half()
    want = R.fake_quantize_per_tensor_backward(g, x, r, 8)
    got = torch.ops.ncnnqat.fake_quantize_per_tensor_backward(g.to(DEV), x.to(DEV), r.to(DEV), 8)
    assert_bitexact(got, want, "mixed dtypes")


@needs_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("running", RUNNING_VALUES)
def test_per_tensor_extreme_ranges_cuda(running: float, dtype: torch.dtype) -> None:
    x, g = extreme_case(make_gen(("cuda", running, str(dtype))), dtype, 1000)
    r = torch.tensor([running])
    for bits in (8, 6):
        assert_bitexact(torch.ops.ncnnqat.fake_quantize_per_tensor(x.to(DEV), r.to(DEV), bits),
                        R.fake_quantize_per_tensor(x, r, bits), f"range {running} {bits}b {dtype}")
        assert_bitexact(
            torch.ops.ncnnqat.fake_quantize_per_tensor_backward(g.to(DEV), x.to(DEV), r.to(DEV), bits),
            R.fake_quantize_per_tensor_backward(g, x, r, bits),
            f"backward range {running} {bits}b {dtype}",
        )


@needs_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_tensor_empty_cuda(dtype: torch.dtype) -> None:
    x = torch.empty((3, 0, 2), dtype=dtype)
    r = torch.tensor([2.0])
    assert_bitexact(torch.ops.ncnnqat.fake_quantize_per_tensor(x.to(DEV), r.to(DEV), 8),
                    R.fake_quantize_per_tensor(x, r, 8), "empty")
    rd, rc = r.to(DEV), r.clone()
    torch.ops.ncnnqat.update_absmax_(x.to(DEV), rd, 0.5)
    R.update_absmax_(x, rc, 0.5)
    assert_bitexact(rd, rc, "update on empty")


@needs_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_update_absmax_bitexact_sequence_cuda(dtype: torch.dtype) -> None:
    gen = make_gen(("cuda", "ema", str(dtype)))
    tiny, sub, huge = _magnitudes(dtype)
    r_k, r_r = torch.tensor([-1.0], device=DEV), torch.tensor([-1.0])
    sizes = [3000, 1_000_003, 70001, 5, 4_194_304, 1, 333]
    for step, momentum in enumerate([0.1, 0.01, 0.3333333, 1.0, 0.9, 0.05, 0.1]):
        mag = [1.0, 10.0, tiny, huge, sub, 0.37, 1e3][step]
        x = (torch.randn(sizes[step], generator=gen) * mag).to(dtype)
        x[::97] = math.nan
        x[5::101] = math.inf
        view = x.reshape(-1, 1).t() if step % 3 == 0 else x[::2]
        torch.ops.ncnnqat.update_absmax_(view.to(DEV), r_k, momentum)
        R.update_absmax_(view, r_r, momentum)
        assert_bitexact(r_k, r_r, f"running after step {step}")
        assert torch.isfinite(r_k).all()


@needs_cuda_kernel
def test_no_host_sync_graph_capture() -> None:
    """update + quantize + backward capture into a CUDA graph (impossible with a host sync)."""
    gen = make_gen(("cuda", "graph"))
    x = (torch.randn(1 << 20, generator=gen) * 2).to(DEV)
    g = torch.randn(1 << 20, generator=gen).to(DEV)
    w = torch.randn(64, 576, generator=gen).to(DEV)
    r = torch.tensor([-1.0], device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture requires
        torch.ops.ncnnqat.update_absmax_(x, r.clone(), 0.1)
        torch.ops.ncnnqat.fake_quantize_per_channel(w, 64, 8)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.ncnnqat.update_absmax_(x, r, 0.1)
        y = torch.ops.ncnnqat.fake_quantize_per_tensor(x, r, 8)
        gx = torch.ops.ncnnqat.fake_quantize_per_tensor_backward(g, x, r, 8)
        wq, ws = torch.ops.ncnnqat.fake_quantize_per_channel(w, 64, 8)
    r_ref = torch.tensor([-1.0])
    for _ in range(3):
        graph.replay()
        R.update_absmax_(x.cpu(), r_ref, 0.1)
        assert_bitexact(r, r_ref, "graph replay running")
        assert_bitexact(y, R.fake_quantize_per_tensor(x.cpu(), r_ref, 8), "graph replay output")
        assert_bitexact(gx, R.fake_quantize_per_tensor_backward(g.cpu(), x.cpu(), r_ref, 8), "graph replay grad")
        x.mul_(1.5)  # next replay sees a new batch
    want_w, want_s = R.fake_quantize_per_channel(w.cpu(), 64, 8)
    assert_bitexact(wq, want_w, "graph per-channel")
    assert_bitexact(ws, want_s, "graph per-channel scales")


@needs_cuda_kernel
def test_runs_on_the_current_stream() -> None:
    """Kernels are enqueued on the caller's current stream (ordered with its other work)."""
    stream = torch.cuda.Stream()
    gen = make_gen(("cuda", "stream"))
    x_cpu = torch.randn(1 << 22, generator=gen) * 3
    with torch.cuda.stream(stream):
        x = x_cpu.to(DEV, non_blocking=False)
        torch.cuda._sleep(10_000_000)  # a long kernel first on this stream
        x.mul_(2.0)
        r = torch.tensor([-1.0], device=DEV)
        torch.ops.ncnnqat.update_absmax_(x, r, 0.1)
        y = torch.ops.ncnnqat.fake_quantize_per_tensor(x, r, 8)
    stream.synchronize()
    r_ref = torch.tensor([-1.0])
    R.update_absmax_(x_cpu * 2.0, r_ref, 0.1)
    assert_bitexact(r, r_ref, "stream running")
    assert_bitexact(y, R.fake_quantize_per_tensor(x_cpu * 2.0, r_ref, 8), "stream output")


def test_public_wrapper_ema_and_eval_cuda() -> None:
    buf = torch.tensor([-1.0], device=DEV)
    gen = make_gen(("cuda", "wrapper"))
    x1 = (torch.randn(256, 8, generator=gen) * 4).to(DEV)
    x2 = (torch.randn(256, 8, generator=gen) * 9).to(DEV)
    ops.fake_quantize_per_tensor(x1, buf, 0.1, training=True)
    assert buf.item() == R.finite_absmax(x1.cpu()).item()
    y = ops.fake_quantize_per_tensor(x2, buf, 0.1, training=True)
    expect = torch.tensor([R.finite_absmax(x1.cpu()).item()])
    R.update_absmax_(x2.cpu(), expect, 0.1)
    assert_bitexact(buf, expect, "wrapper running")
    assert_bitexact(y, R.fake_quantize_per_tensor(x2.cpu(), expect, 8), "wrapper output")
    before = buf.clone()
    ops.fake_quantize_per_tensor(x2 * 100, buf, 0.1, training=False)
    assert torch.equal(buf, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_cuda(dtype: torch.dtype) -> None:
    gen = make_gen(("cuda", "grad", str(dtype)))
    w = (torch.randn(8, 4, 3, 3, generator=gen) * 2).to(dtype).to(DEV).requires_grad_()
    out, _ = ops.fake_quantize_per_channel(w, 8, bits=6)
    gw = torch.randn(out.shape, generator=gen).to(dtype).to(DEV)
    out.backward(gw)
    assert torch.equal(w.grad, gw)
    buf = torch.tensor([127.0], device=DEV)
    x = (torch.randn(5000, generator=gen) * 127).to(dtype).to(DEV).requires_grad_()
    y = ops.fake_quantize_per_tensor(x, buf, 0.1, training=False)
    g = torch.randn(5000, generator=gen).to(dtype).to(DEV)
    y.backward(g)
    clipped = x.detach().float().abs() >= 127.5  # scale is exactly 1 for a range of 127
    assert clipped.any() and (~clipped).any()
    assert torch.equal(x.grad[clipped], torch.zeros_like(g[clipped]))
    assert torch.equal(x.grad[~clipped], g[~clipped])


@needs_cuda_kernel
def test_opcheck_cuda() -> None:
    opcheck_all(DEV)


def test_torch_compile_fullgraph_cuda() -> None:
    compile_matches_eager(DEV)


@needs_cuda_kernel
def test_kernel_errors_cuda() -> None:
    w = torch.randn(8, 3, device=DEV)
    r = torch.tensor([1.0], device=DEV)
    with pytest.raises(RuntimeError, match=r"ncnnqat::fake_quantize_per_channel: `bits` must be in \[2, 8\], got 0"):
        torch.ops.ncnnqat.fake_quantize_per_channel(w, 8, 0)
    with pytest.raises(RuntimeError, match=r"`num_groups`=5 must divide weight.numel\(\)=24"):
        torch.ops.ncnnqat.fake_quantize_per_channel(w, 5, 8)
    with pytest.raises(RuntimeError, match=r"update_absmax_: `running_absmax` is on cpu but `x` is on cuda"):
        torch.ops.ncnnqat.update_absmax_(w, r.cpu(), 0.1)
    with pytest.raises(RuntimeError, match=r"fake_quantize_per_tensor: `x` must be float32.*Double"):
        torch.ops.ncnnqat.fake_quantize_per_tensor(w.double(), r, 8)
    with pytest.raises(RuntimeError, match=r"fake_quantize_per_tensor_backward: `grad` has shape"):
        torch.ops.ncnnqat.fake_quantize_per_tensor_backward(w[:, :2], w, r, 8)
