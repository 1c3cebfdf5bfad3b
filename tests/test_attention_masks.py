"""Constant attention masks through the converter (issue 18): every MemoryData form is read as
ncnn's runtime reads it (``ncnn/bin_layout.py``, param 21 = load type), and a constant bool SDPA
mask converts as the additive float mask it means (pnnx alone writes it as 1/0 bytes ncnn ADDS)."""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat import export, prepare_qat
from lightning_ncnnqat.conversion.pnnx import convert_with_pnnx
from lightning_ncnnqat.ncnn.bin_layout import TAG_FP16, TAG_FP32, NcnnFormatError, locate
from lightning_ncnnqat.ncnn.param import NcnnParam
from test_attention_plan import PaddedMha, SdpaNet

ncnn = pytest.importorskip("ncnn")


def _run_ncnn(param_text: str, data: bytes, feeds: dict[str, np.ndarray], blob: str) -> np.ndarray:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "m.param").write_text(param_text)
        (Path(d) / "m.bin").write_bytes(data)
        net = ncnn.Net()
        assert net.load_param(str(Path(d) / "m.param")) == 0
        assert net.load_model(str(Path(d) / "m.bin")) == 0
        ex = net.create_extractor()
        for k, v in feeds.items():
            ex.input(k, ncnn.Mat(np.ascontiguousarray(v)))
        ret, out = ex.extract(blob)
        assert ret == 0
        got = np.array(out).copy()
        del ex, net
    return got


def _pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


# (param suffix, payload) of a 7-element MemoryData, and the values ncnn's runtime reads from it
_VALS = np.array([1.5, -2.0, 3.0, 0.25, 7.0, -0.5, 0.0], np.float32)
_FORMS = {
    "raw_f32_default": ("", _VALS.tobytes()),
    "raw_f32": (" 21=1", _VALS.tobytes()),
    "tagged_f32": (" 21=0", struct.pack("<I", TAG_FP32) + _VALS.tobytes()),
    "tagged_f16": (" 21=0", struct.pack("<I", TAG_FP16) + _pad4(_VALS.astype(np.float16).tobytes())),
    "raw_int8": (" 21=3", _pad4(bytes([255, 128, 1, 2, 3, 0, 127]))),  # pnnx's bool / int8 constant
}


@pytest.mark.parametrize("form", sorted(_FORMS))
def test_bin_layout_reads_memorydata_as_ncnn_does(form: str) -> None:
    """Two MemoryData layers back to back: the first in ``form``, the second raw float32 after it;
    both decode to what ncnn's runtime loads (so the first one's size is right too)."""
    suffix, payload = _FORMS[form]
    tail = np.array([9.0, -9.0, 4.5], np.float32)
    text = f"7767517\n2 2\nMemoryData a 0 1 a 0=7{suffix}\nMemoryData b 0 1 b 0=3\n"
    data = payload + tail.tobytes()
    (first,), (second,) = locate(NcnnParam.parse(text).layers, data)
    np.testing.assert_array_equal(first.values(data), _run_ncnn(text, data, {}, "a"))
    np.testing.assert_array_equal(second.values(data), tail)
    np.testing.assert_array_equal(second.values(data), _run_ncnn(text, data, {}, "b"))


def test_unknown_memorydata_load_type_is_refused_by_name() -> None:
    text = "7767517\n1 1\nMemoryData odd_const 0 1 a 0=4 21=2\n"
    with pytest.raises(NcnnFormatError, match=r"odd_const.*21=2"):
        locate(NcnnParam.parse(text).layers, bytes(16))


class _Masked(nn.Module):
    """SDPA with a constant bool mask (a buffer): ``causal`` or a banded pattern."""

    def __init__(self, n: int, causal: bool) -> None:
        super().__init__()
        i = torch.arange(n)
        band = (i[:, None] - i[None, :]).abs() <= 1
        self.register_buffer("mask", torch.ones(n, n, dtype=torch.bool).tril() if causal else band)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x.reshape(1, x.shape[1], 2, -1).transpose(1, 2)  # [1, heads 2, n, 4]
        o = F.scaled_dot_product_attention(q, q * 0.5, q, attn_mask=self.mask)
        return o.transpose(1, 2).reshape(x.shape)


@pytest.mark.parametrize("n, causal", [(5, True), (6, False), (7, True)])
def test_bool_sdpa_mask_converts_as_its_float_mask(n: int, causal: bool) -> None:
    torch.manual_seed(n)
    m, x = _Masked(n, causal).eval(), torch.randn(1, n, 8)
    pn = convert_with_pnnx(m, [x])
    param = NcnnParam.parse(pn.param_text)
    consts = [lay for lay in param.layers if lay.type == "MemoryData"]
    assert consts and all(lay.get_int(21, 1) == 1 for lay in consts)  # float32, not 1/0 bytes
    locate(param.layers, pn.bin_bytes)
    got = _run_ncnn(pn.param_text, pn.bin_bytes, {"in0": x[0].numpy()}, "out0")
    with torch.no_grad():
        want = m(x)[0].numpy()
    np.testing.assert_allclose(got.reshape(want.shape), want, atol=1e-5)


def test_bool_mask_sdpa_exports_int8_at_parity(tmp_path: Path) -> None:
    torch.manual_seed(31)
    net, x = SdpaNet("bool"), torch.randn(6, 3, 8, 8)
    plan = prepare_qat(net, x[:1])
    assert plan.sdpa_calls == {"block": 1}
    report = export(net, tmp_path, x[:1], x, targets=["x86"], verbose=False, timing_runs=0, check_onnx=False,
                    layer_check_samples=1)
    assert report.flagged_layers == [] and report.runtime["x86"]["int8_vs_qat"]["cosine"] > 0.9999


class _PaddedConst(nn.Module):
    """nn.MultiheadAttention with a constant key_padding_mask (bool or float)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        pad = torch.tensor([[False] * 5 + [True] * 3])
        self.register_buffer("pad", pad if dtype == torch.bool else torch.zeros(1, 8).masked_fill(pad, float("-inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, key_padding_mask=self.pad, need_weights=False)[0]


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_key_padding_mask_converts_to_the_mha_mask_input(dtype: torch.dtype) -> None:
    """A constant bool key_padding_mask: pnnx alone feeds it to MultiHeadAttention as the FIRST
    input (output off by 9e21); traced as its float mask it is the mask input, at float parity."""
    torch.manual_seed(41)
    m, x = _PaddedConst(dtype).eval(), torch.randn(1, 8, 16)
    pn = convert_with_pnnx(m, [x])
    (mha,) = [lay for lay in NcnnParam.parse(pn.param_text).layers if lay.type == "MultiHeadAttention"]
    assert mha.get_int(5, 0) == 1, mha
    got = _run_ncnn(pn.param_text, pn.bin_bytes, {"in0": x[0].numpy()}, "out0")
    with torch.no_grad():
        want = m(x)[0].numpy()
    np.testing.assert_allclose(got.reshape(want.shape), want, atol=1e-5)


def test_key_padding_mask_mha_exports_int8_at_parity(tmp_path: Path) -> None:
    torch.manual_seed(42)
    net, x = PaddedMha(2), torch.randn(6, 3, 8, 8)
    assert prepare_qat(net, x[:1]).attention_layers == {"attn": "MultiHeadAttention"}
    report = export(net, tmp_path, x[:1], x, targets=["x86"], verbose=False, timing_runs=0, check_onnx=False,
                    layer_check_samples=1)
    int8 = NcnnParam.parse((tmp_path / "model.int8.param").read_text())
    assert [lay.get_int(18, 0) for lay in int8.layers if lay.type == "MultiHeadAttention"] == [2]
    assert report.flagged_layers == [] and report.runtime["x86"]["int8_vs_qat"]["cosine"] > 0.9999
