"""The int8 writer on every layer type converters emit: small torch models -> pnnx (fp16=0) ->
our writer, compared byte for byte with the real ncnn2int8 where it is present, and run in the
ncnn runtime. Layers the package does not quantize pass through as ncnn2int8 writes them."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import ncnn
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat.ncnn.int8_writer import Int8Spec, write_int8
from lightning_ncnnqat.ncnn.bin_layout import TAG_FP16, TAG_FP32, TAG_INT8, locate
from lightning_ncnnqat.ncnn.param import INT8_TYPES, NcnnParam
from lightning_ncnnqat.conversion.pnnx import convert_with_pnnx
from lightning_ncnnqat.ncnn.table import TableRow, format_table


def _tool() -> Path | None:
    tools = Path(os.environ.get("NCNN_TOOLS", Path(__file__).resolve().parents[2] / "shared" / "ncnn-tools"))
    exe = tools / "ncnn2int8"
    return exe if exe.is_file() else None


needs_tool = pytest.mark.skipif(_tool() is None, reason="ncnn2int8 not found (../shared/ncnn-tools or NCNN_TOOLS)")


class Norms(nn.Module):
    """GroupNorm, InstanceNorm, PReLU, LayerNorm (channels-last), Deconvolution(DepthWise)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.gn, self.inorm = nn.GroupNorm(2, 8), nn.InstanceNorm2d(8, affine=True)
        self.pr, self.ln = nn.PReLU(8), nn.LayerNorm(8)
        self.dc = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.ddw = nn.ConvTranspose2d(6, 6, 3, padding=1, groups=6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pr(self.inorm(self.gn(self.c(x))))
        x = self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.ddw(self.dc(x))


class Sequence(nn.Module):
    """Convolution1D, GRU, bidirectional LSTM, RNN, MultiHeadAttention, Linear on 3-D (Gemm)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, (16, 3), padding=(0, 1))
        self.c1 = nn.Conv1d(8, 8, 3, padding=1)
        self.gru = nn.GRU(8, 6, batch_first=True)
        self.lstm = nn.LSTM(6, 5, batch_first=True, bidirectional=True)
        self.rnn = nn.RNN(10, 4, batch_first=True)
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.c1(F.relu(self.c(x)).squeeze(2)).transpose(1, 2)
        f = self.rnn(self.lstm(self.gru(f)[0])[0])[0]
        return self.fc(self.mha(f, f, f)[0])


class Constants(nn.Module):
    """MemoryData (a parameter used twice: pnnx's repeated splitncnn names), BatchNorm after a
    non-conv, Convolution3D."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.s = nn.Parameter(torch.randn(8, 1, 1))
        self.bn = nn.BatchNorm2d(8)
        self.c3 = nn.Conv3d(1, 2, 3, padding=1)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c(x)
        y = self.bn(torch.sigmoid(x * self.s + self.s))
        return self.c3(y[:, :1].unsqueeze(1)).flatten(1, 2) + y[:, 1:3]


class OtherDims(nn.Module):
    """ConvolutionDepthWise1D, Deconvolution(DepthWise)1D, LSTM with projection, RMSNorm,
    Normalize, ConvolutionDepthWise3D, Deconvolution3D; two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, (8, 3), padding=(0, 1))
        self.dw1 = nn.Conv1d(8, 8, 3, padding=1, groups=8)
        self.dc1 = nn.ConvTranspose1d(8, 6, 2, stride=2)
        self.ddw1 = nn.ConvTranspose1d(6, 6, 3, padding=1, groups=6)
        self.lstm = nn.LSTM(6, 5, batch_first=True, proj_size=3)
        self.rms = nn.RMSNorm(3)
        self.dw3 = nn.Conv3d(2, 2, 3, padding=1, groups=2)
        self.dc3 = nn.ConvTranspose3d(2, 2, 2, stride=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.ddw1(self.dc1(self.dw1(F.relu(self.c(x)).squeeze(2)))).transpose(1, 2)
        f = F.normalize(self.rms(self.lstm(f)[0]), dim=-1)
        return f, self.dc3(self.dw3(x[:, :2].unsqueeze(2))).flatten(1, 2)


class Attention(nn.Module):
    """Linear on 3-D (Gemm) feeding scaled_dot_product_attention (SDPA: ncnn2int8 sets 18=2)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, (8, 1))
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.c(x).squeeze(2).transpose(1, 2)
        q = self.q(t).view(1, -1, 2, 4).transpose(1, 2)
        k = self.k(t).view(1, -1, 2, 4).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, k).transpose(1, 2).flatten(2)


class DetectHead(nn.Module):
    """A YOLOv8-like head: chunk (Slice), Concat, nearest Interp, HardSwish, Softmax, a fixed DFL
    conv, anchors (MemoryData read twice: repeated splitncnn_0 names)."""

    def __init__(self) -> None:
        super().__init__()
        self.b1, self.b2 = nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 32, 3, 2, 1)
        self.c2f, self.m = nn.Conv2d(32, 32, 1), nn.Conv2d(16, 16, 3, 1, 1)
        self.up_conv, self.box, self.cls = nn.Conv2d(48, 16, 1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 3, 1)
        self.dfl = nn.Conv2d(4, 1, 1, bias=False)
        with torch.no_grad():
            self.dfl.weight.copy_(torch.arange(4.0).view(1, 4, 1, 1))
        self.register_buffer("anchors", torch.rand(2, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.c2f(F.silu(self.b2(F.silu(self.b1(x))))).chunk(2, 1)
        y = F.interpolate(torch.cat([a, b, F.silu(self.m(b))], 1), scale_factor=2.0, mode="nearest")
        h = F.hardswish(self.up_conv(y))
        lt, rb = self.dfl(self.box(h).view(1, 4, 4, -1).transpose(2, 1).softmax(1)).view(1, 4, -1).chunk(2, 1)
        return torch.cat([self.anchors - lt, self.anchors + rb, torch.sigmoid(self.cls(h).view(1, 3, -1))], 1)


MODELS = {
    "attention": (Attention, (1, 3, 8, 6)),
    "detect_head": (DetectHead, (1, 3, 16, 16)),
    "norms": (Norms, (1, 3, 16, 16)),
    "sequence": (Sequence, (1, 3, 16, 12)),
    "constants": (Constants, (1, 3, 8, 8)),
    "other_dims": (OtherDims, (1, 3, 8, 6)),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def converted(request):
    torch.manual_seed(0)
    cls, shape = MODELS[request.param]
    m = cls().eval()
    res = convert_with_pnnx(m, torch.randn(*shape))
    return request.param, shape, NcnnParam.parse(res.param_text), res.bin_bytes


def _specs(param: NcnnParam, data: bytes) -> dict[str, Int8Spec]:
    """Table rows for every Convolution/InnerProduct: per-channel absmax scales, input scale 2."""
    layout = locate(param.layers, data)
    specs = {}
    for lay, entries in zip(param.layers, layout):
        if lay.type in INT8_TYPES and entries:
            n = lay.get_int(7, 1) if lay.type == "ConvolutionDepthWise" else lay.get_int(0, 0)
            w = entries[0].values(data).reshape(n, -1)
            specs[lay.name] = Int8Spec(lay.name, "t." + lay.name, (127 / np.abs(w).max(1)).astype(np.float32), 2.0)
    return specs


def _run(param_text: str, data: bytes, shape, tmp: Path) -> list[np.ndarray]:
    """Every output blob of the model in ncnn (default options) on a fixed input."""
    (tmp / "m.param").write_text(param_text)
    (tmp / "m.bin").write_bytes(data)
    net = ncnn.Net()
    net.opt.num_threads = 1
    assert net.load_param(str(tmp / "m.param")) == 0 and net.load_model(str(tmp / "m.bin")) == 0
    x = np.random.RandomState(0).randn(*shape[1:]).astype(np.float32)
    outs = []
    with net.create_extractor() as ex:
        ex.input("in0", ncnn.Mat(x))
        for name in net.output_names():
            ret, out = ex.extract(name)
            assert ret == 0, name
            outs.append(np.array(out, copy=True))
    return outs


def test_float_layers_pass_through_and_run(converted, tmp_path: Path) -> None:
    """Every data layer we do not quantize keeps its data (float16 for tagged arrays, float32 for
    the rest); the model loads and computes what the float model computes (fp16 weights)."""
    name, shape, param, data = converted
    with_rows = write_int8(param, data, _specs(param, data))
    assert all(np.isfinite(o).all() for o in _run(with_rows.param_text, with_rows.bin_bytes, shape, tmp_path))
    res = write_int8(param, data, {})  # no table rows: float everywhere but Gemm
    out_param = NcnnParam.parse(res.param_text)
    before, after = locate(param.layers, data), locate(out_param.layers, res.bin_bytes)
    float_types = {lay.type for lay, es in zip(param.layers, before) if es and lay.type not in INT8_TYPES}
    assert float_types and set(res.float_types.values()) >= float_types - {"Gemm"}, name
    for lay, b, a in zip(param.layers, before, after):
        if lay.type == "Gemm":
            continue
        assert [e.role for e in a] == [e.role for e in b], lay.name
        for eb, ea in zip(b, a):
            want = eb.values(data)
            if ea.tagged:
                assert ea.tag == TAG_FP16
                assert np.allclose(ea.values(res.bin_bytes), want, rtol=1e-3, atol=1e-4), lay.name
            else:
                assert np.array_equal(ea.values(res.bin_bytes), want), lay.name
    got = _run(res.param_text, res.bin_bytes, shape, tmp_path)
    ref = _run(param.to_text(), data, shape, tmp_path)
    for g, r in zip(got, ref):
        cos = float(np.dot(g.ravel(), r.ravel()) / (np.linalg.norm(g) * np.linalg.norm(r)))
        assert cos > 0.999, (name, cos)


@needs_tool
def test_byte_identical_to_ncnn2int8(converted, tmp_path: Path) -> None:
    """Same .param text and .bin bytes as the real ncnn2int8 from the same model and table."""
    name, _, param, data = converted
    specs = _specs(param, data)
    res = write_int8(param, data, specs)
    rows = [TableRow(n, s.torch_name, tuple(map(float, s.weight_scales)), s.input_scale) for n, s in specs.items()]
    (tmp_path / "f.param").write_text(param.to_text())
    (tmp_path / "f.bin").write_bytes(data)
    (tmp_path / "t.table").write_text(format_table(rows, "ncnn layer"))
    subprocess.run([str(_tool()), "f.param", "f.bin", "r.param", "r.bin", "t.table"], cwd=tmp_path, check=True,
                   capture_output=True)
    assert (tmp_path / "r.param").read_text() == res.param_text_ncnn2int8, name
    assert (tmp_path / "r.bin").read_bytes() == res.bin_bytes, name


def _gemm_model(trans_a: int, trans_b: int) -> tuple[str, bytes, np.ndarray, np.ndarray]:
    """Input [K=4, M=3] -> Gemm with constant A (3x4) or B (5x4, rows 1+ larger than row 0), C per N."""
    rng = np.random.RandomState(2)
    m, n, k = 3, 5, 4
    b_nk = rng.randn(n, k).astype(np.float32) * np.array([[1.0], [3.0], [2.0], [1.5], [0.5]], np.float32)
    a_mk = rng.randn(m, k).astype(np.float32)
    c = rng.randn(n).astype(np.float32)
    const_a = trans_a >= 0
    if const_a:  # A constant, B from the input
        params = f"2={trans_a} 3=0 4=1 5=0 6=0 7={m} 8={k} 9={k}"
        payload = a_mk.T if trans_a else a_mk
        data = struct.pack("<I", TAG_FP32) + np.ascontiguousarray(payload).tobytes()
    else:
        params = f"2=0 3={trans_b} 4=0 5=1 6=1 7={m} 8={n} 9={k} 10=4"
        payload = b_nk if trans_b else b_nk.T
        data = struct.pack("<I", TAG_FP32) + np.ascontiguousarray(payload).tobytes()
        data += struct.pack("<I", TAG_FP32) + c.tobytes()
    text = (
        "7767517\n2 2\n"
        "Input                    in0                      0 1 in0 0=4 1=3\n"
        f"Gemm                     gemm_0                   1 1 in0 out0 {params}\n"
    )
    return text, data, a_mk, b_nk


@pytest.mark.parametrize("trans_a, trans_b", [(-1, 1), (-1, 0), (0, -1), (1, -1)])
def test_gemm_is_quantized_as_ncnn2int8_does(trans_a: int, trans_b: int, tmp_path: Path) -> None:
    """ncnn2int8 quantizes every Gemm without a table row: a constant A per row; a constant B
    with ONE scale, taken from what it reads as B's first row when B is stored transposed
    (pnnx's 3=1: the other rows clip) and from all of B otherwise. Stored row-major."""
    text, data, a_mk, b_nk = _gemm_model(trans_a, trans_b)
    param = NcnnParam.parse(text)
    res = write_int8(param, data, {})
    info = res.gemm_int8["gemm_0"]
    out = NcnnParam.parse(res.param_text)
    lay = out.layers[1]
    entries = {e.role: e for e in locate(out.layers, res.bin_bytes)[1]}
    assert lay.get_int(18, 0) == 2 and lay.get_int(2, 0) == 0
    if trans_a < 0:
        want = 127 / np.abs(b_nk[0] if trans_b else b_nk).max()
        assert info["B_scale"] == pytest.approx(want, rel=1e-6)
        assert (info["B_clipped"] > 0) == bool(trans_b)
        assert lay.get_int(3, 0) == 1 and entries["B"].tag == TAG_INT8 and entries["C"].tag == TAG_FP16
        q = entries["B"].values(res.bin_bytes).reshape(b_nk.shape)
        assert np.array_equal(q, np.clip(np.sign(b_nk) * np.floor(np.abs(b_nk) * want + 0.5), -127, 127))
    else:
        want = 127 / np.abs(a_mk).max(1)
        assert np.allclose(info["A_scales"], want, rtol=1e-6)
        assert np.allclose(entries["A_scales"].values(res.bin_bytes), want, rtol=1e-6)
        q = entries["A"].values(res.bin_bytes).reshape(a_mk.shape)
        assert np.abs(q).max() == 127 and np.array_equal(np.abs(q).max(1), [127, 127, 127])
    if _tool() is not None:
        (tmp_path / "f.param").write_text(text)
        (tmp_path / "f.bin").write_bytes(data)
        (tmp_path / "t.table").write_text("")
        subprocess.run([str(_tool()), "f.param", "f.bin", "r.param", "r.bin", "t.table"], cwd=tmp_path, check=True,
                       capture_output=True)
        assert (tmp_path / "r.param").read_text() == res.param_text_ncnn2int8
        assert (tmp_path / "r.bin").read_bytes() == res.bin_bytes
    # quantize_gemm=False keeps it float (exact, not what ncnn2int8 writes)
    res2 = write_int8(param, data, {}, quantize_gemm=False)
    assert not res2.gemm_int8 and res2.float_types["gemm_0"] == "Gemm"
    assert NcnnParam.parse(res2.param_text).layers[1].get_int(18, 0) == 0


def _embed_model() -> tuple[str, bytes]:
    """Input -> Embed (10 x 4, bias) -> InnerProduct, hand-written (pnnx takes float inputs only)."""
    rng = np.random.RandomState(1)
    text = (
        "7767517\n3 3\n"
        "Input                    in0                      0 1 in0 0=5\n"
        "Embed                    embed_0                  1 1 in0 1 0=4 1=10 2=1 3=40\n"
        "InnerProduct             linear_1                 1 1 1 out0 0=3 1=1 2=12\n"
    )
    w = rng.randn(10, 4).astype(np.float32)
    data = struct.pack("<I", TAG_FP32) + w.tobytes() + rng.randn(4).astype("<f4").tobytes()
    data += struct.pack("<I", TAG_FP32) + rng.randn(3, 4).astype("<f4").tobytes() + rng.randn(3).astype("<f4").tobytes()
    return text, data


def test_embed_stays_float_without_rows(tmp_path: Path) -> None:
    text, data = _embed_model()
    param = NcnnParam.parse(text)
    res = write_int8(param, data, {})
    out = NcnnParam.parse(res.param_text)
    entries = locate(out.layers, res.bin_bytes)[1]
    assert out.layers[1].get_int(18, 0) == 0 and [e.role for e in entries] == ["weight", "bias"]
    assert entries[0].tag == TAG_FP16
    if _tool() is not None:
        (tmp_path / "f.param").write_text(text)
        (tmp_path / "f.bin").write_bytes(data)
        (tmp_path / "t.table").write_text("")
        subprocess.run([str(_tool()), "f.param", "f.bin", "r.param", "r.bin", "t.table"], cwd=tmp_path, check=True,
                       capture_output=True)
        assert (tmp_path / "r.param").read_text() == res.param_text_ncnn2int8
        assert (tmp_path / "r.bin").read_bytes() == res.bin_bytes
