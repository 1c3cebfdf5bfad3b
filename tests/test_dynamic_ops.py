"""``ncnnqat::dynamic_quantize`` / ``dynamic_fake_quantize``: ncnn's run-time int8 quantization of
Gemm / MultiHeadAttention / SDPA activations, and the Gemm op built on them.

The compiled CPU kernel (``csrc/fake_quant_cpu_dynamic.cpp``) must give the same bits as
``ops.reference`` on random inputs with planted ties, zero / inf / NaN groups, subnormal and huge
magnitudes, every float dtype and group size (also the parallel paths); the CUDA kernel the same
on a GPU (skipped without one). The Gemm op must equal ``reference.fake_quantize_gemm`` (itself
pinned to ncnn's output by ``test_gemm_ops.py``) forward and backward.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_ops import (
    NVCC,
    REQUIRE_KERNELS,
    SEED,
    _magnitudes,
    _tie_values,
    assert_bitexact,
    has_kernel,
    make_gen,
)

import lightning_ncnnqat.ops as ops
from lightning_ncnnqat.ops import _cpp_lib, dynamic_int8
from lightning_ncnnqat.ops import reference as R
from lightning_ncnnqat.ops.attention_reference import mha_int8, sdpa_int8

ROOT = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DYN_OPS = ("dynamic_quantize", "dynamic_fake_quantize")
HAS_DYN_CPU = all(torch._C._dispatch_has_kernel_for_dispatch_key(f"ncnnqat::{op}", "CPU") for op in DYN_OPS)
needs_cpu_kernel = pytest.mark.skipif(
    not HAS_DYN_CPU and not REQUIRE_KERNELS, reason=f"compiled CPU kernels not loaded: {ops.STATUS.reasons.get('cpu')}"
)
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (torch.cuda.is_available() is False)")

# (shape, dims): rows, matrices, whole tensors; groups of 1, of a few, and of more than 4 * 32768
# elements (the kernel's parallel-inside-a-group path).
CASES = [((7, 13), 1), ((3, 5, 33), 1), ((2, 3, 8, 16), 2), ((4, 9, 10), 3), ((1, 1), 1), ((5, 1), 1),
         ((3, 140_000), 1), ((2, 300, 500), 2), ((6, 0), 1), ((0, 4), 1)]


def make_input(shape: tuple[int, ...], dims: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random groups of very different ranges, with planted exact ties, a zero group, +-inf, a
    NaN group, and tiny / subnormal / huge values (when the tensor is big enough)."""
    lead = shape[: len(shape) - dims]
    x = torch.randn(shape, generator=gen) * torch.rand(*lead, *([1] * dims), generator=gen).mul(8).exp2()
    x = x.to(dtype)
    groups = x.reshape(-1, x[(0,) * len(lead)].numel()) if x.numel() else x.reshape(0, 1)
    g, n = groups.shape
    if g >= 4 and n >= 8:
        tiny, sub, huge = _magnitudes(dtype)
        groups[0] = 0.0  # absmax 0: scale 1, levels 0
        groups[1, :3] = torch.tensor([tiny, -sub, huge], dtype=dtype)
        groups[2, 1], groups[2, 4] = float("inf"), float("-inf")  # saturate at +-127
        groups[3, n // 2] = float("nan")  # the whole group NaN
    if g >= 5 and n >= 16:  # a group whose scale is 64: every planted value is a tie k + 0.5
        ties = _tie_values(64.0, n - 1, 127.0, gen, dtype)
        groups[4, : len(ties)] = ties
        groups[4, len(ties):] = 0.0
        groups[4, -1] = 127.0 / 64.0
    return groups.reshape(shape)


def assert_same(got: tuple, want: tuple, what: str) -> None:
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if b.dtype == torch.int8:
            assert a.dtype == torch.int8 and a.shape == b.shape and a.is_contiguous(), (what, i)
            assert torch.equal(a.cpu(), b), f"{what} output {i}: levels differ (seed {SEED})"
        else:
            assert_bitexact(a, b, f"{what} output {i}")


@needs_cpu_kernel
def test_dynamic_kernels_registered_and_reported() -> None:
    """The built library serves both ops on CPU and the loader knows them (STATUS)."""
    assert ops.STATUS.cpu and "cpu" not in ops.STATUS.reasons, ops.STATUS
    assert set(DYN_OPS) <= set(_cpp_lib.OPS) and has_kernel("CPU")


@needs_cpu_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dims", CASES, ids=str)
def test_dynamic_bitexact_cpu(shape: tuple[int, ...], dims: int, dtype: torch.dtype, threads: int) -> None:
    x = make_input(shape, dims, dtype, make_gen((shape, dims, str(dtype))))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for view in (x, x.transpose(0, 1).contiguous().transpose(0, 1)):  # contiguous and strided
            assert_same(torch.ops.ncnnqat.dynamic_quantize(view, dims), R.dynamic_quantize(x, dims), f"q {shape}")
            assert_same(torch.ops.ncnnqat.dynamic_fake_quantize(view, dims), R.dynamic_fake_quantize(x, dims), "fq")
    finally:
        torch.set_num_threads(before)


def test_dynamic_rules_as_ncnn() -> None:
    """ncnn's rule on hand-made rows: 127 / absmax as one float32 division, 1 for a zero row,
    half away from zero, +-inf saturated, a NaN row NaN (others untouched)."""
    x = torch.tensor([[0.5, -1.0, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, float("inf"), -1.5, 1.0],
                      [1.0, float("nan"), 2.0, 3.0], [127 / 64, 0.5 / 64, -1.5 / 64, 2.5 / 64]])
    for quantize in (ops.dynamic_quantize, lambda t, d: R.dynamic_quantize(t, d)):
        q, absmax, scale = quantize(x, 1)
        assert q.dtype == torch.int8 and absmax.shape == scale.shape == (5,)
        assert torch.equal(q[0], torch.tensor([64, -127, 32, 0], dtype=torch.int8))  # 63.5 -> 64
        assert torch.equal(q[1], torch.zeros(4, dtype=torch.int8)) and scale[1] == 1.0 and absmax[1] == 0.0
        assert torch.equal(q[2], torch.tensor([127, 127, -64, 42], dtype=torch.int8))  # absmax 3 (inf ignored); -1.5 * fl(127/3) rounds to -63.5 in float32
        assert torch.isnan(absmax[3]) and torch.isnan(scale[3]) and torch.equal(q[3], torch.zeros(4, dtype=torch.int8))
        assert torch.equal(q[4], torch.tensor([127, 1, -2, 3], dtype=torch.int8))  # ties 0.5, -1.5, 2.5 away from 0
        assert scale[0] == torch.tensor(127.0) / torch.tensor(1.0) and scale[2] == torch.tensor(127.0) / torch.tensor(3.0)
    fq, s = ops.dynamic_fake_quantize(x, 2)  # one scale for the whole tensor: every value NaN (a NaN inside)
    assert s.shape == () and torch.isnan(s) and torch.isnan(fq).all()
    fq, s = ops.dynamic_fake_quantize(x[:3], 2)
    assert torch.equal(fq, torch.ops.ncnnqat.dynamic_quantize(x[:3], 2)[0].float() / s)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dynamic_fake_quantize_straight_through(dtype: torch.dtype) -> None:
    """d out / d x is the identity (an absmax scale never clips); the levels carry no gradient."""
    gen = make_gen(("ste", str(dtype)))
    x = (torch.randn(4, 6, 10, generator=gen) * 3).to(dtype).requires_grad_()
    out, scale = ops.dynamic_fake_quantize(x, 1)
    assert out.dtype == torch.float32 and not scale.requires_grad
    g = torch.randn(out.shape, generator=gen)
    out.backward(g)
    assert x.grad.dtype == dtype and torch.equal(x.grad, g.to(dtype))
    q, absmax, s = ops.dynamic_quantize(x, 2)
    assert not (q.requires_grad or absmax.requires_grad or s.requires_grad)


def test_dynamic_opcheck() -> None:
    gen = make_gen("opcheck")
    x = torch.randn(3, 4, 5, generator=gen).requires_grad_()
    for op in (torch.ops.ncnnqat.dynamic_quantize.default, torch.ops.ncnnqat.dynamic_fake_quantize.default):
        torch.library.opcheck(op, (x, 1))
        torch.library.opcheck(op, (x.detach().bfloat16(), 3))
        torch.library.opcheck(op, (x.detach().half(), 2))


def test_dynamic_errors_name_the_argument() -> None:
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"`dims` must be an int in \[1, x.dim\(\)=2\], got 3"):
        ops.dynamic_quantize(x, 3)
    with pytest.raises(ValueError, match="`dims`"):
        ops.dynamic_fake_quantize(x, 0)
    with pytest.raises(TypeError, match="`x` must be float32"):
        ops.dynamic_quantize(x.double(), 1)
    with pytest.raises(RuntimeError, match="`dims` must be in"):  # the op itself checks too
        torch.ops.ncnnqat.dynamic_quantize(x, 5)


@pytest.mark.parametrize("k", [1, 15, 16, 17, 40, 1040, 1041, 2500])
def test_int8_matmul_exact(k: int) -> None:
    """Exact int32 sums whatever path runs (``_int_mm`` where exact, blocks of float32 products
    beyond 1040): worst-case +-127 operands and random levels against an int64 product."""
    gen = make_gen(("mm", k))
    qa = torch.randint(-127, 128, (37, k), generator=gen, dtype=torch.int8)
    qb = torch.randint(-127, 128, (19, k), generator=gen, dtype=torch.int8)
    qa[0], qb[0], qb[1] = 127, 127, -127
    want = (qa.long() @ qb.long().T).double().float()
    assert torch.equal(dynamic_int8.int8_matmul(qa, qb), want)
    assert torch.equal(R.exact_level_matmul(qa.float(), qb.float().T), want)


@pytest.mark.parametrize("x_shape,n,bias,dtype", [((4, 9, 24), 16, True, torch.float32), ((2, 3, 5, 1300), 7, False,
                         torch.float32), ((6, 40), 33, True, torch.bfloat16), ((3, 8, 64), 12, True, torch.float16)])
def test_gemm_op_equals_reference(x_shape: tuple[int, ...], n: int, bias: bool, dtype: torch.dtype) -> None:
    """The op (dynamic kernels + exact int8 matmul) gives the reference's bits, forward and backward."""
    gen = make_gen(("gemm", x_shape, n))
    k = x_shape[-1]
    x = (torch.randn(x_shape, generator=gen) * torch.rand(*x_shape[:-1], 1, generator=gen) * 4).to(dtype)
    x.reshape(-1, k)[1] = 0.0
    w = torch.randn(n, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    bg = b.clone().requires_grad_() if bias else None
    y = ops.fake_quantize_gemm(xg, wg, bg)
    assert_bitexact(y, R.fake_quantize_gemm(x, w, b), "gemm forward")
    g = torch.randn(y.shape, generator=gen).to(dtype)
    y.backward(g)
    gx, gw, gb = R.fake_quantize_gemm_backward(g, x, w, bias)
    assert_bitexact(xg.grad, gx, "grad x")
    assert_bitexact(wg.grad, gw, "grad weight")
    if bias:
        assert_bitexact(bg.grad, gb, "grad bias")


def test_gemm_nan_policy() -> None:
    """A NaN in a row of x makes that output row NaN and leaves the others exact; a NaN in the
    weight (one scale for all of it) makes every output NaN: never a silently wrong number."""
    gen = make_gen("gemm-nan")
    x, w, b = torch.randn(5, 8, generator=gen), torch.randn(4, 8, generator=gen), torch.randn(4, generator=gen)
    clean = ops.fake_quantize_gemm(x, w, b)
    x[2, 3] = float("nan")
    y = ops.fake_quantize_gemm(x, w, b)
    assert torch.isnan(y[2]).all() and torch.equal(y[[0, 1, 3, 4]], clean[[0, 1, 3, 4]])
    assert_bitexact(y, R.fake_quantize_gemm(x, w, b), "gemm with a NaN row")
    w[1, 1] = float("nan")
    assert torch.isnan(ops.fake_quantize_gemm(x[[0]], w, b)).all()


_SUBPROCESS = """
import json, sys, torch
import lightning_ncnnqat.ops as ops
from lightning_ncnnqat.ops.attention_reference import mha_int8, sdpa_int8
assert not torch._C._dispatch_has_kernel_for_dispatch_key("ncnnqat::dynamic_quantize", "CPU")
g = torch.Generator().manual_seed(5)
x = torch.randn(2, 6, 16, generator=g); w = torch.randn(16 * 3 + 16, 16, generator=g)
ws = {"q_weight": w[:16], "k_weight": w[16:32], "v_weight": w[32:48], "out_weight": w[48:]}
q, k, v = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
outs = [ops.fake_quantize_gemm(x, w[:24]), mha_int8(x, x, x, ws, 4), sdpa_int8(q, k, v)]
json.dump({"reason": ops.STATUS.reasons.get("cpu"), "bits": [o.view(torch.int32).flatten().tolist() for o in outs]},
          sys.stdout)
"""


@needs_cpu_kernel
def test_reference_fallback_gives_the_kernels_bits() -> None:
    """Without the compiled library (LIGHTNING_NCNNQAT_FORCE_REFERENCE=1) the same Gemm, MHA and
    SDPA forms run on the reference and give the same bits as here, on the kernels."""
    env = {**os.environ, "LIGHTNING_NCNNQAT_FORCE_REFERENCE": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", _SUBPROCESS], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout)
    assert got["reason"] == "LIGHTNING_NCNNQAT_FORCE_REFERENCE=1"
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 16, generator=g)
    w = torch.randn(16 * 3 + 16, 16, generator=g)
    ws = {"q_weight": w[:16], "k_weight": w[16:32], "v_weight": w[32:48], "out_weight": w[48:]}
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
    outs = [ops.fake_quantize_gemm(x, w[:24]), mha_int8(x, x, x, ws, 4), sdpa_int8(q, k, v)]
    for name, out, bits in zip(("gemm", "mha", "sdpa"), outs, got["bits"], strict=True):
        assert out.view(torch.int32).flatten().tolist() == bits, name


class _DynamicUser(torch.nn.Module):
    """Both dynamic ops in a forward, as the int8 attention forms call them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, absmax, scale = torch.ops.ncnnqat.dynamic_quantize(x, 1)
        fq, s2 = torch.ops.ncnnqat.dynamic_fake_quantize(x, 2)
        return q.float() * absmax[..., None] / scale[..., None] + fq * s2[..., None, None]


@pytest.mark.parametrize("dynamo", [False, True])
def test_torch_onnx_export_computes_the_ops(dynamo: bool, tmp_path: Path) -> None:
    """torch.onnx (TorchScript symbolics, or the dynamo exporter's decompositions) exports the ops
    as plain ONNX that ONNX Runtime runs to the op's bits, NaN rows included."""
    ort = pytest.importorskip("onnxruntime")
    x = make_input((3, 6, 20), 1, torch.float32, make_gen(("onnx", dynamo)))
    x[1, 2, 3] = float("nan")
    path = str(tmp_path / "dyn.onnx")
    torch.onnx.export(_DynamicUser().eval(), (x,), path, dynamo=dynamo, input_names=["x"])
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert_bitexact(torch.from_numpy(got), _DynamicUser()(x), f"onnx dynamo={dynamo}")


def test_loader_names_ops_an_older_library_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A built library older than the package's ops loads but is reported with the ops it lacks
    (the reference serves them), instead of failing at import."""
    monkeypatch.setattr(_cpp_lib, "OPS", (*_cpp_lib.OPS, "dynamic_quantize_v2"))
    reason = _cpp_lib._load_one("lightning_ncnnqat._C", "CPU")
    if not HAS_DYN_CPU:
        assert reason is not None
        return
    assert "registered no CPU kernel for ncnnqat::dynamic_quantize_v2" in reason and "older" in reason


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, /usr/local/cuda, PATH)")
def test_dynamic_cuda_kernel_compiles_without_fma(tmp_path: Path) -> None:
    """dynamic_quant_kernels.cu builds with plain nvcc, and its PTX has no float FMA (exactness)."""
    src = ROOT / "csrc" / "cuda" / "dynamic_quant_kernels.cu"
    ptx = tmp_path / "dynamic.ptx"
    res = subprocess.run([NVCC, "-ptx", "-std=c++17", "-arch=sm_90", str(src), "-o", str(ptx)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    text = ptx.read_text()
    assert "dynamic_group_kernel" in text and "fma.rn.f32" not in text


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dims", CASES, ids=str)
def test_dynamic_bitexact_cuda(shape: tuple[int, ...], dims: int, dtype: torch.dtype) -> None:
    if not has_kernel("CUDA") and not REQUIRE_KERNELS:
        pytest.skip(f"compiled CUDA kernels not loaded: {ops.STATUS.reasons.get('cuda')}")
    x = make_input(shape, dims, dtype, make_gen((shape, dims, str(dtype), "cuda")))
    xc = x.cuda()
    assert_same(torch.ops.ncnnqat.dynamic_quantize(xc, dims), R.dynamic_quantize(x, dims), f"cuda q {shape}")
    assert_same(torch.ops.ncnnqat.dynamic_fake_quantize(xc, dims), R.dynamic_fake_quantize(x, dims), "cuda fq")
    if len(shape) == 2 and x.numel() and dtype == torch.float32:
        w = torch.randn(5, shape[1])
        assert_bitexact(ops.fake_quantize_gemm(xc, w.cuda()), R.fake_quantize_gemm(x, w, None), "cuda gemm")
        torch.library.opcheck(torch.ops.ncnnqat.dynamic_fake_quantize.default, (xc.requires_grad_(), 1))
