"""The fused BN-fold + fake-quant weight op (``ncnnqat::fold_fake_quantize_weight``).

Forward: the compiled CPU and CUDA kernels are bit-exact with the reference, on weights with
planted ties and edge cases, folded with power-of-two BN scales (which keep the ties) and with
random ones. Backward: weight gradients bit-exact, BN/bias gradients equal up to summation
order, and both equal to autograd through the unfused composition (fold with torch ops, then the
per-channel op). The C++ autograd and the Python fallback (LIGHTNING_NCNNQAT_FORCE_REFERENCE=1,
in a subprocess) give the same gradients. CUDA cases skip with the reason without a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_ops import DTYPES, REQUIRE_KERNELS, ROOT, SEED, assert_bitexact, has_kernel, make_gen, make_weight
from torch import Tensor

import lightning_ncnnqat.ops as ops
from lightning_ncnnqat.ops import reference as R

HAS_CUDA = torch.cuda.is_available()


DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not has_kernel("CPU") and not REQUIRE_KERNELS, reason=f"CPU kernels not loaded: {ops.STATUS.reasons.get('cpu')}"
        ),
    ),
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (torch.cuda.is_available() is False)"),
            pytest.mark.skipif(
                HAS_CUDA and not has_kernel("CUDA") and not REQUIRE_KERNELS,
                reason=f"CUDA kernels not loaded: {ops.STATUS.reasons.get('cuda')}",
            ),
        ],
    ),
]

# (weight shape, num_groups): conv per channel, depthwise, grouped (several rows per group),
# Linear, 1x1 conv, rows longer than a CUDA block, an empty row length.
CASES = [
    ((16, 8, 3, 3), 16),
    ((24, 1, 3, 3), 24),
    ((12, 4, 3, 3), 3),
    ((10, 33), 10),
    ((32, 16, 1, 1), 32),
    ((4, 700), 2),
    ((6, 0), 6),
]


def fold_inputs(
    shape: tuple[int, ...], num_groups: int, dtype: torch.dtype, bits: int, salt: object, *, pow2: bool, bias: bool,
    affine: bool,
) -> dict[str, Tensor | None]:
    """Weight with planted ties (make_weight) and BN vectors. With ``pow2`` every fold scale
    gamma * inv_std is a power of two, so folding is exact and the ties survive it."""
    gen = make_gen(("fold", shape, num_groups, dtype, bits, salt, pow2, bias, affine))
    c = shape[0]
    w = make_weight(shape, num_groups, dtype, bits, gen) if shape[1] else torch.empty(shape, dtype=dtype)
    if pow2:
        inv_std = 2.0 ** torch.randint(-2, 3, (c,), generator=gen).float()
        gamma = torch.where(torch.rand(c, generator=gen) < 0.5, 1.0, -0.5) if affine else None
    else:
        inv_std = torch.rand(c, generator=gen) * 3 + 0.05
        gamma = torch.randn(c, generator=gen) if affine else None
    return {
        "weight": w,
        "bias": torch.randn(c, generator=gen) if bias else None,
        "bn_weight": gamma,
        "bn_bias": torch.randn(c, generator=gen) if affine else None,
        "bn_mean": torch.randn(c, generator=gen),
        "bn_inv_std": inv_std,
    }


def _to(d: dict[str, Tensor | None], device: str) -> dict[str, Tensor | None]:
    return {k: None if v is None else v.to(device) for k, v in d.items()}


def _args(d: dict[str, Tensor | None]) -> tuple:
    return d["weight"], d["bias"], d["bn_weight"], d["bn_bias"], d["bn_mean"], d["bn_inv_std"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [8, 6])
@pytest.mark.parametrize("shape,num_groups", CASES, ids=str)
@pytest.mark.parametrize("variant", ["pow2+bias", "random", "no-affine"])
def test_fold_forward_bitexact(
    device: str, dtype: torch.dtype, bits: int, shape: tuple[int, ...], num_groups: int, variant: str
) -> None:
    d = fold_inputs(
        shape, num_groups, dtype, bits, "fwd", pow2=variant == "pow2+bias", bias=variant == "pow2+bias",
        affine=variant != "no-affine",
    )
    want = R.fold_fake_quantize_weight(*_args(d), num_groups, bits)
    got = torch.ops.ncnnqat.fold_fake_quantize_weight(*_args(_to(d, device)), num_groups, bits)
    for name, g, w in zip(("weight_fq", "bias", "scales"), got, want):
        assert g.device.type == device
        assert_bitexact(g, w, f"{name} {shape}/{num_groups} {dtype} {bits}b {variant} on {device}")
    if variant == "pow2+bias" and shape[1]:
        # The fold is exact here, so this equals quantizing the folded weight with the plain op.
        wf, _ = R.fold_weight_bias(*_args(d))
        plain = R.fake_quantize_per_channel(wf, num_groups, bits)
        assert_bitexact(got[0].cpu(), plain[0].to(dtype), "vs fold then per-channel")
        assert_bitexact(got[2].cpu(), plain[1], "scales vs fold then per-channel")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,num_groups", CASES, ids=str)
@pytest.mark.parametrize("bias,affine", [(True, True), (False, True), (True, False)], ids=["bias", "nobias", "noaffine"])
def test_fold_backward_matches_reference(
    device: str, dtype: torch.dtype, shape: tuple[int, ...], num_groups: int, bias: bool, affine: bool
) -> None:
    d = fold_inputs(shape, num_groups, dtype, 8, "bwd", pow2=False, bias=bias, affine=affine)
    d["weight"] = torch.nan_to_num(d["weight"].float(), nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1e3, 1e3).to(dtype)
    gen = make_gen(("bwd-grad", shape, dtype))
    gw = torch.randn(shape, generator=gen).to(dtype)
    gb = torch.randn(shape[0], generator=gen)
    w, b, gamma, _, mean, inv_std = _args(d)
    want = R.fold_fake_quantize_weight_backward(gw, gb, w, b, gamma, mean, inv_std)
    dd = _to(d, device)
    got = torch.ops.ncnnqat.fold_fake_quantize_weight_backward(
        gw.to(device), gb.to(device), dd["weight"], dd["bias"], dd["bn_weight"], dd["bn_mean"], dd["bn_inv_std"]
    )
    assert_bitexact(got[0], want[0], f"grad_weight {shape} {dtype} on {device}")
    # rows 0 (bias) and 2 (beta) are elementwise: exact; row 1 (gamma) holds a sum: order may differ
    assert_bitexact(got[1][0], want[1][0], "grad_bias")
    assert_bitexact(got[1][2], want[1][2], "grad_bn_bias")
    scale = (gw.float().abs().reshape(shape[0], -1) * w.float().abs().reshape(shape[0], -1)).sum(1) + gb.abs() * 10
    tol = scale * inv_std * 1e-4 + 1e-6  # float32 sums of up to 700 terms, in another order
    assert ((got[1][1].cpu() - want[1][1]).abs() <= tol).all(), f"grad_bn_weight (seed {SEED})"


def _composed(d: dict[str, Tensor | None], num_groups: int, bits: int) -> tuple[Tensor, Tensor]:
    """The unfused composition: fold with differentiable torch ops, then the per-channel op."""
    w, b = R.fold_weight_bias(*_args(d))
    wq, _ = ops.fake_quantize_per_channel(w.to(d["weight"].dtype), num_groups, bits)
    return wq, b.to(d["weight"].dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias,affine", [(True, True), (False, True), (False, False)], ids=["bias", "nobias", "noaffine"])
def test_fold_autograd_equals_unfused_composition(device: str, bias: bool, affine: bool) -> None:
    base = fold_inputs((12, 4, 3, 3), 3, torch.float32, 6, "ag", pow2=False, bias=bias, affine=affine)
    base["weight"] = torch.randn(12, 4, 3, 3, generator=make_gen("ag-w"))
    gen = make_gen("ag-g")
    gw, gb = torch.randn(12, 4, 3, 3, generator=gen), torch.randn(12, generator=gen)
    grads = []
    for fused in (True, False):
        d = _to(base, device)
        params = [k for k in ("weight", "bias", "bn_weight", "bn_bias") if d[k] is not None]
        for k in params:
            d[k] = d[k].clone().requires_grad_()
        if fused:
            wq, b, scales = torch.ops.ncnnqat.fold_fake_quantize_weight(*_args(d), 3, 6)
            assert not scales.requires_grad
        else:
            wq, b = _composed(d, 3, 6)
        ((wq * gw.to(device)).sum() + (b * gb.to(device)).sum()).backward()
        grads.append({k: d[k].grad.cpu() for k in params})
    fused, unfused = grads
    assert fused.keys() == unfused.keys()
    for k in fused:
        torch.testing.assert_close(fused[k], unfused[k], rtol=1e-5, atol=1e-5, msg=f"grad of {k}")
    assert not torch.equal(fused["weight"], gw)  # the fold's scale reached the weight gradient


def test_fold_autograd_cpp_and_python_fallback_agree() -> None:
    """The C++ autograd (compiled library) and the Python one (reference fallback) agree."""
    code = r"""
import json, torch
import lightning_ncnnqat.ops as ops
from lightning_ncnnqat.ops import _registry
torch.manual_seed(5)
w = torch.randn(6, 3, 3, 3, requires_grad=True); b = torch.randn(6, requires_grad=True)
g = torch.randn(6, requires_grad=True); be = torch.randn(6, requires_grad=True)
mean, inv = torch.randn(6), torch.rand(6) + 0.5
x = torch.randn(2, 6, 4, 4, requires_grad=True); r = torch.tensor([1.5])
wq, bq, _ = torch.ops.ncnnqat.fold_fake_quantize_weight(w, b, g, be, mean, inv, 6, 8)
wq2, _ = torch.ops.ncnnqat.fake_quantize_per_channel(w * 2, 6, 6)
xq = torch.ops.ncnnqat.fake_quantize_per_tensor(x, r, 8)
((wq * torch.arange(wq.numel()).reshape(wq.shape).sin()).sum() + (bq * bq).sum() + (wq2 ** 2).sum()
 + (xq * x.detach()).sum()).backward()
print(json.dumps({"cpp": _registry.AUTOGRAD_IN_CPP,
                  "grads": {k: t.grad.flatten().tolist() for k, t in dict(w=w, b=b, g=g, be=be, x=x).items()}}))
"""
    out = {}
    for force in ("0", "1"):
        env = dict(os.environ, LIGHTNING_NCNNQAT_FORCE_REFERENCE=force, PYTHONWARNINGS="ignore")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
        assert res.returncode == 0, res.stderr[-3000:]
        out[force] = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["1"]["cpp"] is False
    if not out["0"]["cpp"] and not REQUIRE_KERNELS:
        pytest.skip("the compiled CPU library (and its C++ autograd) is not loaded")
    assert out["0"]["cpp"] is True
    for k, v in out["0"]["grads"].items():
        torch.testing.assert_close(torch.tensor(v), torch.tensor(out["1"]["grads"][k]), rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("device", DEVICES)
def test_fold_opcheck(device: str) -> None:
    d = fold_inputs((8, 3, 3, 3), 8, torch.float32, 8, "opcheck", pow2=False, bias=True, affine=True)
    d["weight"] = torch.randn(8, 3, 3, 3, generator=make_gen("opcheck-w"))  # finite: gradients are compared
    d = _to(d, device)
    for k in ("weight", "bias", "bn_weight", "bn_bias"):
        d[k] = d[k].requires_grad_()
    torch.library.opcheck(torch.ops.ncnnqat.fold_fake_quantize_weight.default, (*_args(d), 8, 8))
    torch.library.opcheck(
        torch.ops.ncnnqat.fold_fake_quantize_weight.default,
        (d["weight"].detach().half(), None, None, None, d["bn_mean"], d["bn_inv_std"], 4, 6),
    )
    gw = torch.randn_like(d["weight"]).detach()
    gb = torch.randn_like(d["bn_mean"])
    torch.library.opcheck(
        torch.ops.ncnnqat.fold_fake_quantize_weight_backward.default,
        (gw, gb, d["weight"].detach(), d["bias"].detach(), d["bn_weight"].detach(), d["bn_mean"], d["bn_inv_std"]),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_fold_kernel_errors(device: str) -> None:
    w = torch.randn(8, 3, device=device)
    v = torch.rand(8, device=device) + 0.5
    fold = torch.ops.ncnnqat.fold_fake_quantize_weight
    with pytest.raises(RuntimeError, match=r"fold_fake_quantize_weight: `num_groups`=3 must divide weight.shape\[0\]=8"):
        fold(w, None, v, v, v, v, 3, 8)
    with pytest.raises(RuntimeError, match=r"`bn_mean` must have shape \[8\].*got 1 dims of 7 elements"):
        fold(w, None, v, v, v[:7], v, 8, 8)
    with pytest.raises(RuntimeError, match=r"`bias` must be float32, float16 or bfloat16, got Long"):
        fold(w, torch.ones(8, dtype=torch.long, device=device), v, v, v, v, 8, 8)
    with pytest.raises(RuntimeError, match=r"fold_fake_quantize_weight: `bits` must be in \[2, 8\], got 9"):
        fold(w, None, v, v, v, v, 8, 9)
    bwd = torch.ops.ncnnqat.fold_fake_quantize_weight_backward
    with pytest.raises(RuntimeError, match=r"`grad_weight_fq` has shape \[8, 2\] but `weight` has shape \[8, 3\]"):
        bwd(w[:, :2], v, w, None, v, v, v)
