"""ncnn's int8 MultiHeadAttention and SDPA (x86 wheel) against ops/attention_reference.py, and
the int8 writer (ncnn/int8_attention.py) against ncnn2int8. See docs/export.md, "Attention in int8"."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from attention_int8_cases import (
    MhaCase,
    SdpaCase,
    agreement,
    assert_matches,
    mha_inputs,
    mha_reference,
    sdpa_inputs,
    sdpa_reference,
    write_model,
)
from lightning_ncnnqat.ncnn.int8_attention import mha_scales, mha_weights, quantize_rows, write_mha_int8
from lightning_ncnnqat.ncnn.isolated import run_ncnn
from lightning_ncnnqat.ncnn.param import NcnnParam, bin_layout
from lightning_ncnnqat.ops.attention_reference import mha_int8

TOOLS = Path(__file__).resolve().parents[2] / "shared" / "ncnn-tools"


def _run(param: Path, bin_path: Path, x: dict[str, np.ndarray], out: str, target: str = "x86", options=None) -> np.ndarray:
    return run_ncnn(param, bin_path, x, [out], options or {}, target=target).outputs[out]


@pytest.mark.parametrize(
    "case",
    [
        MhaCase(embed=16, heads=1, seq_q=3, seq_k=3),
        MhaCase(embed=24, heads=4, seq_q=7, seq_k=7, mask=2),
        MhaCase(embed=32, heads=4, seq_q=5, seq_k=9, kdim=8, vdim=12, mask=3),
    ],
    ids=["self-1head", "self-4heads-dim6-mask", "cross-4heads-headmask"],
)
def test_mha_int8_matches_reference_on_x86(case: MhaCase, tmp_path: Path) -> None:
    rng = np.random.default_rng(case.embed)
    fp, fb, ip, ib = write_model(tmp_path, case, None, rng)
    x = mha_inputs(case, rng, 3, "a")
    ref = mha_reference(case, x, "a")
    assert_matches(_run(ip, ib, x, "a"), ref, _run(fp, fb, x, "a"), "mha x86")


@pytest.mark.parametrize(
    "case",
    [
        SdpaCase(heads=2, groups=2, seq_q=5, seq_k=6, dim=8, dim_v=8),
        SdpaCase(heads=4, groups=2, seq_q=3, seq_k=7, dim=16, dim_v=8, mask=2, scale=0.2),
        SdpaCase(heads=3, groups=1, seq_q=1, seq_k=9, dim=8, dim_v=4, mask=3),
    ],
    ids=["plain", "gqa-mask-scale", "decode-headmask"],
)
def test_sdpa_int8_matches_reference_on_x86(case: SdpaCase, tmp_path: Path) -> None:
    rng = np.random.default_rng(case.heads * 7 + case.seq_k)
    fp, fb, ip, ib = write_model(tmp_path, None, case, rng)
    x = sdpa_inputs(case, rng, 3, "s")
    ref = sdpa_reference(case, x, "s")
    assert_matches(_run(ip, ib, x, "s"), ref, _run(fp, fb, x, "s"), "sdpa x86")


def test_pnnx_multiheadattention_int8_matches_torch_weights(tmp_path: Path) -> None:
    """nn.MultiheadAttention through pnnx: the ncnn layer's weights are in_proj split in three,
    and ncnn's int8 output equals the reference computed from the torch module's weights."""
    from lightning_ncnnqat.conversion.pnnx import convert_with_pnnx

    torch.manual_seed(3)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = mha

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x, x, x, need_weights=False)[0]

    x = torch.randn(2, 6, 16)
    res = convert_with_pnnx(Net(), x[:1])
    param = NcnnParam.parse(res.param_text)
    entries = bin_layout(param, res.bin_bytes).by_index
    (i,) = [j for j, lay in enumerate(param.layers) if lay.type == "MultiHeadAttention"]
    chunks, _ = write_mha_int8(param.layers[i], entries[i], res.bin_bytes)
    (tmp_path / "m.param").write_text(param.to_text())
    (tmp_path / "m.bin").write_bytes(b"".join(chunks))
    (tmp_path / "f.param").write_text(res.param_text)
    (tmp_path / "f.bin").write_bytes(res.bin_bytes)
    wq, wk, wv = mha.in_proj_weight.detach().chunk(3)
    bq, bk, bv = mha.in_proj_bias.detach().chunk(3)
    w = {"q_weight": wq, "k_weight": wk, "v_weight": wv, "q_bias": bq, "k_bias": bk, "v_bias": bv,
         "out_weight": mha.out_proj.weight.detach(), "out_bias": mha.out_proj.bias.detach()}
    ref = torch.cat([mha_int8(x[i : i + 1], x[i : i + 1], x[i : i + 1], w, 4) for i in range(2)]).numpy()
    got = _run(tmp_path / "m.param", tmp_path / "m.bin", {"in0": x.numpy()}, "out0")
    flt = _run(tmp_path / "f.param", tmp_path / "f.bin", {"in0": x.numpy()}, "out0")
    assert_matches(got, ref, flt, "pnnx mha x86")
    with torch.no_grad():
        torch_out = mha(x, x, x, need_weights=False)[0].numpy()
    assert np.abs(flt - torch_out).max() < 1e-5  # pnnx's float layer is the torch module


def test_pnnx_sdpa_int8_matches_reference(tmp_path: Path) -> None:
    """F.scaled_dot_product_attention through pnnx is one SDPA (6 absent: 1/sqrt(d)); with 18=2
    ncnn's output equals sdpa_int8 of the same tensors."""
    from lightning_ncnnqat.conversion.pnnx import convert_with_pnnx
    from lightning_ncnnqat.ncnn.int8_attention import write_sdpa_int8
    from lightning_ncnnqat.ops.attention_reference import sdpa_int8

    class Net(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 2, n, 8, generator=g) for n in (4, 6, 6))
    res = convert_with_pnnx(Net(), (q[:1], k[:1], v[:1]))
    param = NcnnParam.parse(res.param_text)
    (lay,) = [lay for lay in param.layers if lay.type == "SDPA"]
    assert lay.get_float(6, 0.0) == 0.0
    write_sdpa_int8(lay)
    (tmp_path / "s.param").write_text(param.to_text())
    (tmp_path / "s.bin").write_bytes(res.bin_bytes)
    (tmp_path / "f.param").write_text(res.param_text)
    x = {"in0": q.numpy(), "in1": k.numpy(), "in2": v.numpy()}
    ref = torch.cat([sdpa_int8(q[i : i + 1], k[i : i + 1], v[i : i + 1]) for i in range(2)]).numpy()
    assert_matches(_run(tmp_path / "s.param", tmp_path / "s.bin", x, "out0"), ref,
                   _run(tmp_path / "f.param", tmp_path / "s.bin", x, "out0"), "pnnx sdpa x86")


def test_quantize_rows_equals_ncnn_quantize_to_int8() -> None:
    """Weights are rounded as ncnn's quantize_to_int8 (ties away from zero, +-127), also on ties."""
    import ncnn

    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 10)).astype(np.float32)
    scales = (127.0 / np.abs(w).max(axis=1)).astype(np.float32)
    w[1, :4] = np.array([0.5, -0.5, 1.5, -2.5], np.float32) / scales[1]  # exact ties (power-of-2 free)
    assert np.count_nonzero(np.abs(w[1] * scales[1]) % 1 == 0.5) >= 2  # real ties reach the rounding
    w[2] = 0.0
    scales[2] = 1.0
    m_w, m_s, out = ncnn.Mat(np.ascontiguousarray(w)), ncnn.Mat(scales), ncnn.Mat()
    opt = ncnn.Option()
    opt.use_packing_layout = False
    ncnn.quantize_to_int8(m_w, out, m_s, opt)
    theirs = np.array(out, copy=True).astype(np.int8).reshape(6, 10)
    assert np.array_equal(quantize_rows(w, scales), theirs)


@pytest.mark.skipif(not (TOOLS / "ncnn2int8").is_file(), reason=f"ncnn's C++ tools are not built at {TOOLS}")
def test_mha_int8_bin_equals_ncnn2int8(tmp_path: Path) -> None:
    """With a table holding our scales, ncnn2int8 writes the same .bin bytes as write_mha_int8."""
    case = MhaCase(embed=24, heads=2, seq_q=4, seq_k=6, kdim=8, vdim=16, mask=2)
    fp, fb, _, ib = write_model(tmp_path, case, None, np.random.default_rng(11))
    data = fb.read_bytes()
    param = NcnnParam.parse(fp.read_text())
    (i,) = [j for j, lay in enumerate(param.layers) if lay.type == "MultiHeadAttention"]
    s = mha_scales(mha_weights(param.layers[i], bin_layout(param, data).by_index[i], data))
    rows = [f"mha_param_{j} " + " ".join(repr(float(v)) for v in s[p]) for j, p in enumerate(("q", "k", "v", "out"))]
    (tmp_path / "t.table").write_text("\n".join(rows) + "\n")
    proc = subprocess.run([str(TOOLS / "ncnn2int8"), str(fp), str(fb), str(tmp_path / "t.param"), str(tmp_path / "t.bin"),
                           str(tmp_path / "t.table")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "t.bin").read_bytes() == ib.read_bytes()
    assert NcnnParam.parse((tmp_path / "t.param").read_text()).layer("mha").get_int(18, 0) == 2


def test_float_reference_is_ncnn_float(tmp_path: Path) -> None:
    """The torch float outputs the ARM tests tell int8 runs from are ncnn's float outputs."""
    from attention_int8_cases import float_reference

    rng = np.random.default_rng(4)
    mha = MhaCase(embed=24, heads=3, seq_q=6, seq_k=5, kdim=8, vdim=16, mask=2)
    sdpa = SdpaCase(heads=4, groups=2, seq_q=5, seq_k=7, dim=8, dim_v=12, mask=3, scale=0.3)
    fp, fb, _, _ = write_model(tmp_path, mha, sdpa, rng)
    x = {**mha_inputs(mha, rng, 2, "a"), **sdpa_inputs(sdpa, rng, 2, "s")}
    got = run_ncnn(fp, fb, x, ["a", "s"], {}, target="x86").outputs
    want = float_reference(mha, sdpa, x)
    for blob in ("a", "s"):
        assert np.abs(got[blob] - want[blob]).max() <= 1e-5 * np.abs(want[blob]).max(), blob


def test_zero_rows_follow_ncnns_guard(tmp_path: Path) -> None:
    """An all-zero row / head / input quantizes with scale 1 (ncnn's guard): finite, as ncnn."""
    rng = np.random.default_rng(6)
    mha = MhaCase(embed=16, heads=2, seq_q=4, seq_k=4)
    sdpa = SdpaCase(heads=2, groups=2, seq_q=4, seq_k=5, dim=8, dim_v=8)
    _, _, ip, ib = write_model(tmp_path, mha, sdpa, rng)
    x = {**mha_inputs(mha, rng, 2, "a"), **sdpa_inputs(sdpa, rng, 2, "s")}
    x["aq"][0, 2] = 0.0  # one token row
    x["aq"][1] = 0.0  # a whole MHA input
    x["sq"][0, 0, 1] = 0.0  # one query row
    x["sv"][1, 1] = 0.0  # one V head
    got = run_ncnn(ip, ib, x, ["a", "s"], {}, target="x86").outputs
    for blob, ref in (("a", mha_reference(mha, x, "a")), ("s", sdpa_reference(sdpa, x, "s"))):
        assert np.isfinite(ref).all() and np.isfinite(got[blob]).all(), blob
        a = agreement(got[blob], ref)
        assert a["cosine"] >= 1 - 1e-8 and a["max_steps"] < 1.0, (blob, a)
