"""Units of the .param/.bin machinery: ncnn's value parsing and ModelWriter's canonical form,
the .bin layout of every data-bearing layer type, the x86 float16 cast ncnn2int8 uses, and the
layer-type lists (checked against the ncnn runtime)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import ncnn
import numpy as np
import pytest

from lightning_ncnnqat.ncnn.int8_writer import _to_fp16
from lightning_ncnnqat.ncnn.bin_layout import DATA_TYPES, WEIGHTLESS_TYPES, NcnnFormatError, layer_entries
from lightning_ncnnqat.ncnn.model_writer import KNOWN_TYPES, modelwriter_params, vstr_to_float
from lightning_ncnnqat.ncnn.param import NcnnLayer, NcnnParam


def test_type_lists_name_real_ncnn_layers() -> None:
    for t in sorted(WEIGHTLESS_TYPES | DATA_TYPES | KNOWN_TYPES):
        assert ncnn.layer_to_index(t) >= 0, t
    assert not WEIGHTLESS_TYPES & DATA_TYPES


@pytest.mark.parametrize(
    "text, want",
    [("1.000000e-05", np.float32(1e-5)), ("-2.5", np.float32(-2.5)), ("0.0", np.float32(0.0)), ("3e2", np.float32(300)),
     ("1.5E-3", np.float32(1.5e-3)), ("+7.", np.float32(7.0))],
)
def test_vstr_to_float(text: str, want: np.float32) -> None:
    assert np.float32(vstr_to_float(text)) == want


@pytest.mark.parametrize(
    "typ, params, want",
    [
        # defaults dropped, pairs written only when they differ from their partner, %e floats
        ("Convolution", "0=8 1=3 11=3 12=1 13=1 14=1 2=1 3=1 4=1 5=1 6=216 9=1", " 0=8 1=3 4=1 5=1 6=216 9=1"),
        ("Convolution", "0=8 1=3 11=1 4=1 14=0 15=1 16=0 6=72 18=0.5", " 0=8 1=3 11=1 4=1 14=0 18=5.000000e-01 6=72"),
        ("Pooling", "0=0 1=2 11=2 12=2 13=0 2=2 3=0 5=1", " 1=2 2=2 5=1"),
        ("GroupNorm", "0=2 1=8 2=1.000000e-5 3=1", " 0=2 1=8 2=1.000000e-05"),
        ("Clip", "0=0.0 1=6.0", " 0=0.000000e+00 1=6.000000e+00"),
        # Reduction writes 5=1 when it has axes; Softmax 1=1 when axis != 0
        ("Reduction", "0=3 1=0 -23303=2,1,2 4=0 5=1", " 0=3 1=0 -23303=2,1,2 5=1"),
        ("Softmax", "0=1", " 0=1 1=1"),
        ("Softmax", "0=0 1=1", ""),
        # kdim/vdim compared with the default layer (embed_dim 0): always written; scale too
        ("MultiHeadAttention", "0=4 1=2 2=16 3=4 4=4", " 0=4 1=2 2=16 3=4 4=4 6=7.071068e-01"),
        ("LSTM", "0=3 1=120 2=0 3=5", " 0=3 1=120 3=5"),
        ("LSTM", "0=5 1=120", " 0=5 1=120 3=5"),
        # strings, new-style arrays, ids the writer drops
        ("Reshape", '12=0 13=0 6="1,1,//(8,0n),0n"', ' 6="1,1,//(8,0n),0n" 12=0 13=0'),
        ("Squeeze", "3=1,2", " -23303=2,1,2"),
        ("Gemm", "10=4 2=0 3=1 4=0 5=1 6=1 7=16 8=5 9=8", " 3=1 5=1 6=1 7=16 8=5 9=8 10=4"),
        # a type ModelWriter does not know keeps its params verbatim (ncnn2int8 would drop them)
        ("Cast", "0=1 1=2", " 0=1 1=2"),
        ("Split", "", ""),
    ],
)
def test_modelwriter_params(typ: str, params: str, want: str) -> None:
    toks = [tuple(t.split("=", 1)) for t in params.split()]
    assert modelwriter_params(typ, toks) == want


def test_parse_quoted_values_and_round_trip() -> None:
    text = (
        "7767517\n2 2\n"
        "Input                    in0                      0 1 in0\n"
        'Reshape                  r0                       1 1 in0 out0 12=0 6="0w, -1"\n'
    )
    p = NcnnParam.parse(text)
    assert p.layers[1].params == [("12", "0"), ("6", '"0w, -1"')]
    assert p.to_text() == text.replace("Input                    in0", "Input                    in0", 1)
    assert modelwriter_params("Reshape", p.layers[1].params) == ' 6="0w, -1" 12=0'


def test_modelwriter_exact_form_drops_what_ncnn2int8_drops() -> None:
    toks = [("12", "0"), ("13", "0"), ("6", '"0w,-1"')]
    assert modelwriter_params("Reshape", toks, keep_read_params=False) == ' 6="0w,-1"'
    assert modelwriter_params("Cast", [("0", "1")], keep_read_params=False) == ""


def _layer(typ: str, params: str) -> NcnnLayer:
    return NcnnLayer(typ, "x", ["a"], ["b"], [tuple(t.split("=", 1)) for t in params.split()])


@pytest.mark.parametrize(
    "typ, params, want",
    [
        ("Convolution", "0=4 6=36 5=1 8=102", [("weight", 36, True), ("bias", 4, False), ("weight_scales", 4, False),
                                               ("input_scale", 1, False), ("output_scale", 1, False)]),
        ("ConvolutionDepthWise", "0=4 6=36 7=4 8=1", [("weight", 36, True), ("weight_scales", 4, False),
                                                     ("input_scale", 1, False)]),
        ("Convolution", "0=4 6=36 19=1", []),
        ("Deconvolution", "0=4 6=36 5=1 28=1", []),
        ("Deconvolution3D", "0=4 6=36 5=1", [("weight", 36, True), ("bias", 4, False)]),
        ("Gemm", "4=1 5=1 6=1 7=3 8=5 9=4 10=3 18=2", [("A", 12, True), ("B", 20, True), ("C", 15, True),
                                                       ("A_scales", 3, False), ("B_scale", 1, False)]),
        ("Gemm", "5=1 6=1 7=3 8=5 9=4 10=-1", [("B", 20, True)]),
        ("MultiHeadAttention", "0=4 1=2 2=16 3=6 4=2", [("q_weight", 16, True), ("q_bias", 4, False), ("k_weight", 24, True),
                                                        ("k_bias", 4, False), ("v_weight", 8, True), ("v_bias", 4, False),
                                                        ("out_weight", 16, True), ("out_bias", 4, False)]),
        ("LSTM", "0=3 1=240 2=2 3=5", [("weight_xc", 240, True), ("bias_c", 40, True), ("weight_hc", 120, True),
                                       ("weight_hr", 30, True)]),
        ("GRU", "0=6 1=144", [("weight_xc", 144, True), ("bias_c", 24, True), ("weight_hc", 108, True)]),
        ("RNN", "0=4 1=40 8=2", [("weight_xc", 40, True), ("bias_c", 4, True), ("weight_hc", 16, True),
                                 ("weight_xc_scales", 4, False), ("weight_hc_scales", 4, False)]),
        ("Embed", "0=4 1=10 2=1 3=40", [("weight", 40, True), ("bias", 4, False)]),
        ("MemoryData", "0=2 1=3 2=4", [("data", 24, False)]),
        ("MemoryData", "0=2 21=0", [("data", 2, True)]),
        ("LayerNorm", "0=8 2=0", []),
        ("RMSNorm", "0=8", [("gamma", 8, False)]),
        ("GroupNorm", "0=2 1=8", [("gamma", 8, False), ("beta", 8, False)]),
        ("Scale", "0=-233", []),
        ("Padding", "6=3", [("per_channel_pad", 3, False)]),
        ("Requantize", "2=4", [("scale_in", 1, False), ("scale_out", 1, False), ("bias", 4, False)]),
        ("Sigmoid", "", []),
    ],
)
def test_layer_entries(typ: str, params: str, want: list) -> None:
    assert [(e.role, e.count, e.tagged) for e in layer_entries(_layer(typ, params))] == want


def test_layer_entries_refuse_what_they_cannot_size() -> None:
    with pytest.raises(NcnnFormatError, match="'x'.*Mystery"):
        layer_entries(_layer("Mystery", ""))
    with pytest.raises(NcnnFormatError, match="weight-block"):
        layer_entries(_layer("Gemm", "5=1 8=4 9=4 18=801"))


def test_fp16_cast_matches_ncnn2int8_on_x86() -> None:
    """Blocks of 4 round to nearest even (F16C), the last n % 4 values are truncated (ncnn's
    scalar float32_to_float16, which also flushes fp16 denormals and overflows to inf)."""
    v = np.array([-0.2338686, 1e-6, 70000.0, 1.0 + 2**-11 + 2**-20], dtype=np.float32)
    head = np.frombuffer(_to_fp16(v), "<u2")
    with np.errstate(over="ignore"):
        assert np.array_equal(head, v.astype(np.float16).view(np.uint16))  # a full block: RNE
    tail = np.frombuffer(_to_fp16(np.concatenate([v, v])[:7]), "<u2")[4:]
    assert tail.tolist() == [0xB37B, 0x0000, 0x7C00]  # truncated, denormal -> 0, overflow -> inf
    assert head[0] == 0xB37C  # the same value rounds up in a block


def _tool() -> Path | None:
    tools = Path(os.environ.get("NCNN_TOOLS", Path(__file__).resolve().parents[2] / "shared" / "ncnn-tools"))
    return tools / "ncnn2int8" if (tools / "ncnn2int8").is_file() else None


@pytest.mark.skipif(_tool() is None, reason="ncnn2int8 not found (../shared/ncnn-tools or NCNN_TOOLS)")
def test_hand_written_params_match_ncnn2int8(tmp_path: Path) -> None:
    """Odd spellings converters may write (int for float, old/new arrays, defaults spelled out,
    pairs) come back exactly as ncnn2int8 writes them."""
    from lightning_ncnnqat.ncnn.int8_writer import write_int8

    text = (
        "7767517\n8 9\n"
        "Input            in0  0 1 in0 0=8 1=8 2=3\n"
        "Clip             c0   1 1 in0 a 0=-1.5 1=6\n"
        "Pooling          p0   1 1 a b 0=1 1=3 11=3 2=1 12=2 3=1 13=1 14=1 15=1 5=0\n"
        "Interp           i0   1 1 b c 0=2 1=2.0 2=2.000000e+00 6=0\n"
        "Reduction        r0   1 1 c d 0=0 1=0 -23303=1,0 4=1 5=1\n"
        "Slice            s0   1 2 d e f -23300=2,1,-233 1=0\n"
        "Eltwise          e0   2 1 e f g 0=1 1=0.5,2.0\n"
        "Softmax          sm   1 1 g out0 0=0\n"
    )
    param = NcnnParam.parse(text)
    res = write_int8(param, b"", {})
    (tmp_path / "f.param").write_text(text)
    (tmp_path / "t.table").write_text("")
    # "null": no .bin (these layers have no data)
    subprocess.run([str(_tool()), "f.param", "null", "r.param", "r.bin", "t.table"], cwd=tmp_path, check=True,
                   capture_output=True)
    assert (tmp_path / "r.param").read_text() == res.param_text_ncnn2int8
    assert " 1=8.407791e-45" in res.param_text  # Clip's "1=6": an int where ncnn reads a float (bits)
