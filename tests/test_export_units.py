"""Unit tests of the export machinery: .param/.bin, tables, int8 weights, requantize fusion,
atomic writes. Real pnnx and ncnn, small float models, no training (fast)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import ncnn
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat import ops
from lightning_ncnnqat.errors import LayerError
from lightning_ncnnqat.files import write_files_atomically
from lightning_ncnnqat.ncnn.int8_writer import Int8Spec, fuse_requantize, quantize_weights, write_int8
from lightning_ncnnqat.ncnn.param import (
    TAG_FP16,
    TAG_INT8,
    NcnnFormatError,
    NcnnLayer,
    NcnnParam,
    bin_layout,
)
from lightning_ncnnqat.ncnn.runtime import NcnnNet
from lightning_ncnnqat.verification.parity import agreement
from lightning_ncnnqat.conversion.pnnx import convert_with_pnnx
from lightning_ncnnqat.ncnn.table import TableRow, check_scales, format_table, parse_table


class Small(nn.Module):
    """conv(+relu) -> depthwise -> split into two convs -> add -> pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.a = nn.Conv2d(8, 8, 1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c1(x))
        x = F.relu(self.dw(x))
        x = self.a(x) + self.b(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.fixture(scope="module")
def small_ncnn():
    m = Small().eval()
    res = convert_with_pnnx(m, torch.randn(1, 3, 8, 8))
    return m, NcnnParam.parse(res.param_text), res.bin_bytes


def _owners(param: NcnnParam, data: bytes) -> dict[str, np.ndarray]:
    lay = bin_layout(param, data)
    return {n: e[0].values(data) for n, e in lay.items() if e and e[0].role == "weight"}


def test_param_roundtrip_and_bin_layout(small_ncnn) -> None:
    m, param, data = small_ncnn
    again = NcnnParam.parse(param.to_text())
    assert [(l.type, l.name, l.bottoms, l.tops, l.params) for l in again.layers] == [
        (l.type, l.name, l.bottoms, l.tops, l.params) for l in param.layers
    ]
    layout = bin_layout(param, data)  # raises unless the walk consumes the file exactly
    weights = _owners(param, data)
    # every torch weight is in the .bin exactly once, unchanged (fp16=0)
    for mod in (m.c1, m.dw, m.a, m.b, m.fc):
        w = mod.weight.detach().numpy().ravel()
        assert sum(np.array_equal(v, w) for v in weights.values()) == 1
    assert sum(e.nbytes for es in layout.values() for e in es) == len(data)
    with pytest.raises(NcnnFormatError, match="bytes after the last layer"):
        bin_layout(param, data + b"\0\0\0\0")


def test_bin_layout_refuses_unknown_types() -> None:
    p = NcnnParam.parse("7767517\n2 2\nInput in0 0 1 in0\nMysteryOp my_0 1 1 in0 out0 0=3\n")
    with pytest.raises(NcnnFormatError, match="my_0.*MysteryOp"):
        bin_layout(p, b"")


def test_param_parse_errors_name_the_problem() -> None:
    with pytest.raises(NcnnFormatError, match="7767517"):
        NcnnParam.parse("123\n1 1\nInput in0 0 1 in0\n")
    with pytest.raises(NcnnFormatError, match="declares 3 layers"):
        NcnnParam.parse("7767517\n3 1\nInput in0 0 1 in0\n")
    # repeated names are legal (ncnn loads them: pnnx repeats splitncnn_N); looking one up raises
    dup = NcnnParam.parse("7767517\n2 2\nInput a 0 1 in0\nReLU a 1 1 in0 out0\n")
    assert dup.duplicate_names() == ["a"] and dup.indices("a") == [0, 1]
    with pytest.raises(KeyError, match="2 layers"):
        dup.layer("a")


def test_array_params() -> None:
    lay = NcnnLayer("Clip", "c", ["x"], ["y"], [("-23310", "2,0.0,6.0"), ("0", "3")])
    assert lay.get_array(10) == [0.0, 6.0]
    assert lay.get_int(0, 0) == 3 and lay.get_int(5, 7) == 7
    lay.set_int(8, 2)
    assert lay.line().endswith("-23310=2,0.0,6.0 0=3 8=2")


# --------------------------------------------------------------------------------------- tables


def _rows() -> list[TableRow]:
    return [
        TableRow("conv_0", "c1", (12.5, 3.0e-7, 1234567.875), 0.1234567891),
        TableRow("123", "fc", (40.0,), 1e-9),  # purely numeric names are plain keys
    ]


def test_table_text_is_what_ncnn2int8_reads() -> None:
    text = format_table(_rows(), "ncnn layer")
    assert "\n\n" not in text and text.endswith("\n") and not text.startswith("\n")
    assert "nan" not in text.lower() and "inf" not in text.lower()
    weights, inputs = parse_table(text)
    assert set(weights) == {"conv_0", "123"} and set(inputs) == {"conv_0", "123"}
    # %.9g round-trips float32 exactly, including tiny scales %f would print as 0.000000
    for r in _rows():
        assert np.float32(inputs[r.layer]) == np.float32(r.input_scale)
        assert np.array_equal(np.float32(weights[r.layer]), np.float32(r.weight_scales))


@pytest.mark.parametrize(
    "name, match",
    [
        ("has space", "whitespace"),
        ("tab\tname", "whitespace"),
        ("", "empty"),
        ("x" * 256, "256 characters"),
        ("conv_param_1", "_param_"),
    ],
)
def test_unrepresentable_names_raise_naming_the_layer(name: str, match: str) -> None:
    with pytest.raises(LayerError, match=match) as info:
        format_table([TableRow(name, "block.conv", (1.0,), 1.0)], "ONNX node")
    assert info.value.layer == "block.conv" and "block.conv" in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -2.0, 1e39])
def test_bad_scales_raise_naming_layer_and_value(bad: float) -> None:
    with pytest.raises(LayerError, match=r"layer 'net.conv'.*input scale") as info:
        check_scales("net.conv", bad, [1.0], 1)
    assert info.value.layer == "net.conv"
    with pytest.raises(LayerError, match=r"weight scale \[1\]"):
        check_scales("net.conv", 1.0, [1.0, bad], 2)


def test_duplicate_table_names_raise() -> None:
    with pytest.raises(LayerError, match="used by two layers"):
        format_table([TableRow("x", "a", (1.0,), 1.0), TableRow("x", "b", (1.0,), 1.0)], "ncnn layer")


# ---------------------------------------------------------------------------------- int8 weights


@pytest.mark.parametrize("bits", [8, 6])
def test_int8_weights_equal_qat_and_ncnn_quantize(bits: int) -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 8, 3, 3, generator=g) * torch.logspace(-3, 1, 16)[:, None, None, None]
    w[3] = 0.0  # zero channel: guarded scale 1
    wfq, scales = ops.fake_quantize_per_channel(w, 16, bits)
    q = quantize_weights(w.numpy(), scales.numpy())
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == np.int8 and np.abs(q).max() <= qmax
    # the same integers the QAT forward used
    deq = torch.from_numpy(q.astype(np.float32).reshape(16, -1)) / scales[:, None]
    assert torch.equal(deq, wfq.reshape(16, -1))
    # and what ncnn's own quantize_to_int8 (used by ncnn2int8) computes
    src = np.ascontiguousarray(w.numpy().reshape(16, -1))
    sc = np.ascontiguousarray(scales.numpy())
    m_src, m_sc, out = ncnn.Mat(src), ncnn.Mat(sc), ncnn.Mat()  # Mats borrow: keep the arrays alive
    opt = ncnn.Option()
    opt.use_packing_layout = False  # as ncnn2int8 calls it
    opt.num_threads = 1
    ncnn.quantize_to_int8(m_src, out, m_sc, opt)
    assert out.elemsize == 1
    assert np.array_equal(np.array(out).ravel(), q)


def test_ties_round_half_away_from_zero() -> None:
    w = np.array([[0.5, -0.5, 1.5, -2.5, 127.4, 200.0]], dtype=np.float32)
    q = quantize_weights(w, np.array([1.0], dtype=np.float32))
    assert q.tolist() == [1, -1, 2, -3, 127, 127]


# ------------------------------------------------------------------------------ requantize fusion


def _graph(lines: list[str]) -> NcnnParam:
    blobs = {b for ln in lines for b in ln.split()[4:] if "=" not in b}
    return NcnnParam.parse("7767517\n%d %d\n" % (len(lines), len(blobs)) + "\n".join(lines) + "\n")


def _spec(name: str, s_in: float) -> Int8Spec:
    return Int8Spec(name, "t_" + name, np.ones(1, np.float32), s_in)


def test_fusion_conv_to_conv_and_through_split() -> None:
    p = _graph(
        [
            "Input in 0 1 x",
            "Convolution c1 1 1 x a 0=1 1=1 6=1",
            "ConvolutionDepthWise d1 1 1 a b 0=1 1=1 6=1 7=1",
            "Split s 1 2 b b1 b2",
            "Convolution c2 1 1 b1 e 0=1 1=1 6=1",
            "Convolution c3 1 1 b2 f 0=1 1=1 6=1",
            "BinaryOp add 2 1 e f g",
            "Convolution c4 1 1 g h 0=1 1=1 6=1",
            "Pooling pool 1 1 h out",
        ]
    )
    specs = {n: _spec(n, s) for n, s in [("c1", 2.0), ("d1", 3.0), ("c2", 5.0), ("c3", 5.0), ("c4", 7.0)]}
    fused = fuse_requantize(p, specs)
    assert fused["c1"][:2] == ("d1", 3.0)  # conv -> depthwise
    assert fused["d1"][:2] == ("c2", 5.0) and sorted(fused["d1"][2]) == ["c2", "c3"]  # through the split
    assert "c2" not in fused and "c3" not in fused and "c4" not in fused  # BinaryOp / Pooling consumers
    # a float consumer (no table row) blocks the fusion, as ncnn2int8's elemsize check does
    del specs["c3"]
    assert "d1" not in fuse_requantize(p, specs)
    del specs["d1"]
    assert "c1" not in fuse_requantize(p, specs)


def test_fusion_refuses_consumers_with_different_scales() -> None:
    """ncnn requantizes with the first consumer's scale: a second consumer with another scale
    would silently get wrong values, so the writer refuses."""
    p = _graph(
        [
            "Input in 0 1 x",
            "Convolution c1 1 1 x a 0=1 1=1 6=1",
            "Split s 1 2 a a1 a2",
            "Convolution c2 1 1 a1 e 0=1 1=1 6=1",
            "Convolution c3 1 1 a2 out 0=1 1=1 6=1",
        ]
    )
    data = b"".join(struct.pack("<I", 0) + struct.pack("<f", 0.5) for _ in range(3))
    specs = {"c1": _spec("c1", 2.0), "c2": _spec("c2", 5.0), "c3": _spec("c3", 6.0)}
    with pytest.raises(LayerError, match="t_c3.*first consumer") as info:
        write_int8(p, data, specs)
    assert info.value.layer == "t_c3"
    specs["c3"] = _spec("c3", 5.0)
    res = write_int8(p, data, specs)
    assert res.int8_scale_term == {"c1": 102, "c2": 2, "c3": 2} and res.requantize == {"c1": ("c2", 5.0)}


def test_int8_model_layout_and_runtime(small_ncnn, tmp_path: Path) -> None:
    """Written in Python, loaded by ncnn with default options, matching the fake-quant math."""
    m, param, data = small_ncnn
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    weights = _owners(param, data)
    mods = {"c1": m.c1, "dw": m.dw, "a": m.a, "b": m.b, "fc": m.fc}
    names = {t: next(n for n, v in weights.items() if np.array_equal(v, mod.weight.detach().numpy().ravel())) for t, mod in mods.items()}
    # input scales from the float activations; a and b read one tensor: one shared scale
    acts = {}
    hooks = [mod.register_forward_hook(lambda mod, a, o, t=t: acts.__setitem__(t, a[0])) for t, mod in mods.items()]
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    acts["b"] = acts["a"]
    specs = {}
    for t, mod in mods.items():
        groups = 8 if t == "dw" else mod.weight.shape[0]
        wfq, s = ops.fake_quantize_per_channel(mod.weight.detach(), groups, 8)
        specs[names[t]] = Int8Spec(names[t], t, s.numpy(), 127.0 / float(acts[t].abs().max()), wfq.numpy().ravel())
    res = write_int8(param, data, specs)
    p8 = NcnnParam.parse(res.param_text)
    layout = bin_layout(p8, res.bin_bytes)
    for n in specs:
        lay = p8.layer(n)
        assert lay.get_int(8, 0) in ((1, 101) if lay.type == "ConvolutionDepthWise" else (2, 102))
        roles = [e.role for e in layout[n]]
        assert roles[:1] == ["weight"] and layout[n][0].tag == TAG_INT8
        assert roles[-2:] == ["weight_scales", "input_scale"] or roles[-3:] == ["weight_scales", "input_scale", "output_scale"]
    assert res.requantize[names["c1"]][0] == names["dw"]
    assert res.requantize[names["dw"]][0] in (names["a"], names["b"])
    (tmp_path / "m.param").write_text(res.param_text)
    (tmp_path / "m.bin").write_bytes(res.bin_bytes)
    got = NcnnNet(tmp_path / "m.param", tmp_path / "m.bin").run(x[0].numpy())  # DEFAULT options

    def fq(t, name):
        s = specs[names[name]].input_scale
        return ops.fake_quantize_per_tensor(t, torch.tensor([127.0 / s]), 0.1, False, 8)

    def qconv(mod, name, t):
        groups = 8 if name == "dw" else mod.weight.shape[0]
        wq = ops.fake_quantize_per_channel(mod.weight.detach(), groups, 8)[0]
        return F.conv2d(fq(t, name), wq, mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups)

    with torch.no_grad():
        h = F.relu(qconv(m.c1, "c1", x))
        h = F.relu(qconv(m.dw, "dw", h))
        h = qconv(m.a, "a", h) + qconv(m.b, "b", h)
        h = F.adaptive_avg_pool2d(h, 1).flatten(1)
        want = F.linear(fq(h, "fc"), ops.fake_quantize_per_channel(m.fc.weight.detach(), 5, 8)[0], m.fc.bias)
    a = agreement(want.numpy(), got[None])
    assert a.cosine > 0.9999 and a.max_rel_err < 0.02, a
    assert len(res.bin_bytes) * 3 < len(data)


def test_float_layers_get_fp16_weights(small_ncnn) -> None:
    m, param, data = small_ncnn
    res = write_int8(param, data, {})
    layout = bin_layout(NcnnParam.parse(res.param_text), res.bin_bytes)
    for name, entries in layout.items():
        for e in entries:
            if e.tagged:
                assert e.tag == TAG_FP16, name
                assert np.array_equal(e.values(res.bin_bytes), bin_layout(param, data)[name][0].values(data).astype(np.float16).astype(np.float32))


# --------------------------------------------------------------------------------- atomic writes


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    (tmp_path / "model.ncnn.param").write_text("old")
    with pytest.raises(TypeError):
        write_files_atomically(tmp_path, {"model.ncnn.param": "new", "model.ncnn.bin": object()})  # type: ignore[dict-item]
    assert sorted(os.listdir(tmp_path)) == ["model.ncnn.param"]
    assert (tmp_path / "model.ncnn.param").read_text() == "old"  # untouched: the pair lands together or not at all
    write_files_atomically(tmp_path, {"model.ncnn.param": "new", "model.ncnn.bin": b"\1\2"})
    assert sorted(os.listdir(tmp_path)) == ["model.ncnn.bin", "model.ncnn.param"]


# ---------------------------------------------------------------- against the real ncnn2int8 tool


def _ncnn2int8() -> Path | None:
    tools = Path(os.environ.get("NCNN_TOOLS", Path(__file__).resolve().parents[2] / "shared" / "ncnn-tools"))
    exe = Path(os.environ.get("NCNN2INT8", tools / "ncnn2int8"))
    return exe if exe.is_file() else None


@pytest.mark.skipif(_ncnn2int8() is None, reason="ncnn2int8 not found (../shared/ncnn-tools, NCNN_TOOLS or NCNN2INT8)")
def test_int8_bin_is_byte_identical_to_ncnn2int8(small_ncnn, tmp_path: Path) -> None:
    import subprocess

    m, param, data = small_ncnn
    weights = _owners(param, data)
    specs = {}
    for t, mod, groups in [("c1", m.c1, 8), ("dw", m.dw, 8), ("a", m.a, 8), ("b", m.b, 8), ("fc", m.fc, 5)]:
        n = next(k for k, v in weights.items() if np.array_equal(v, mod.weight.detach().numpy().ravel()))
        s = ops.fake_quantize_per_channel(mod.weight.detach(), groups, 8)[1].numpy()
        specs[n] = Int8Spec(n, t, s, 3.0 if t in ("a", "b") else 2.0 + len(specs))
    res = write_int8(param, data, specs)
    rows = [TableRow(n, s.torch_name, tuple(map(float, s.weight_scales)), s.input_scale) for n, s in specs.items()]
    (tmp_path / "f.param").write_text(param.to_text())
    (tmp_path / "f.bin").write_bytes(data)
    (tmp_path / "t.table").write_text(format_table(rows, "ncnn layer"))
    subprocess.run(
        [str(_ncnn2int8()), "f.param", "f.bin", "r.param", "r.bin", "t.table"], cwd=tmp_path, check=True,
        capture_output=True,
    )
    assert (tmp_path / "r.bin").read_bytes() == res.bin_bytes
    assert (tmp_path / "r.param").read_text() == res.param_text_ncnn2int8
