"""The ``.param`` text ncnn's own tools write back (``tools/modelwriter.h``, used by ncnn2int8).

ncnn2int8 does not copy the ``.param`` it reads: it loads every layer (``ParamDict`` parsing,
``src/paramdict.cpp``) and writes each one again, in its own order and format:

* per layer type a fixed list of param ids; an id is written only when its value differs from
  the default (``fprintf_param_value``), or, for the second half of a pair (kernel_h vs
  kernel_w, pad_top vs pad_left, ...), when it differs from its partner;
* ints as ``%d``, floats as ``%e``, arrays as ``-233xx=len,v,...`` (only when non-empty),
  strings as ``id="..."``; ids the writer does not know are dropped;
* two fixed quirks: Reduction adds ``5=1`` when it has axes, Softmax adds ``1=1`` when
  ``axis != 0``;
* layer types the writer has no entry for lose all their params.

:func:`modelwriter_param_text` reproduces that, so a model this package writes is byte-identical
to ncnn2int8's, with two deliberate differences (``keep_read_params=False`` drops them too):

* a layer type the writer does not know (``Cast``, ``Flip``, ``Shrink``, ...) keeps its params
  verbatim, since ncnn2int8 would silently turn it into a different layer;
* ids ncnn reads but the writer drops are kept verbatim after the others: ``Reshape`` 12/13
  (batch axes: pnnx writes ``12=0 13=0`` next to shape expressions such as
  ``6="1,1,//(8,0n),0n"``, and without them the ncnn runtime segfaults on that Reshape; seen on
  a squeeze-excitation block converted by pnnx 20261020, with ncnn2int8's own output), ``Slice``
  2 (indices), ``Input`` 11 (depth), ``PriorBox`` 14/15.
"""

from __future__ import annotations

import math
import re
import struct

import numpy as np

from lightning_ncnnqat.ncnn.bin_layout import NcnnFormatError

FLT_MAX = float(np.finfo(np.float32).max)

# Per type: the ids ModelWriter writes, in its order. ``id:d`` int, ``id:e`` float,
# ``id:ia``/``id:fa`` int/float array (written when non-empty), ``id:s`` string.
# ``=v``: default v (written when different); ``@r``: written when different from param r's
# value (which is also its default when absent); ``^r``: absent means param r's value, but it is
# compared with r's default. Facts from ncnn's tools/modelwriter.h and src/layer/*.cpp load_param.
_SPEC_TEXT = {
    "BatchNorm": "0:d=0 1:e=0",
    "Bias": "0:d=0",
    "BinaryOp": "0:d=0 1:d=0 2:e=0",
    "CELU": "0:e=1",
    "Clip": "0:e=-FLT_MAX 1:e=FLT_MAX",
    "Concat": "0:d=0",
    "Convolution": "0:d=0 1:d=0 11:d@1 2:d=1 12:d@2 3:d=1 13:d@3 4:d=0 14:d@4 15:d@4 16:d@14 18:e=0 5:d=0 6:d=0 "
    "8:d=0 9:d=0 10:fa 19:d=0",
    "Convolution1D": "0:d=0 1:d=0 2:d=1 3:d=1 4:d=0 15:d@4 18:e=0 5:d=0 6:d=0 9:d=0 10:fa 19:d=0",
    "Convolution3D": "0:d=0 1:d=0 11:d@1 21:d@1 2:d=1 12:d@2 22:d@2 3:d=1 13:d@3 23:d@3 4:d=0 14:d@4 24:d@4 15:d@4 "
    "16:d@14 17:d@24 18:e=0 5:d=0 6:d=0 9:d=0 10:fa",
    "ConvolutionDepthWise": "0:d=0 1:d=0 11:d@1 2:d=1 12:d@2 3:d=1 13:d@3 4:d=0 14:d@4 15:d@4 16:d@14 18:e=0 5:d=0 "
    "6:d=0 7:d=1 8:d=0 9:d=0 10:fa 19:d=0",
    "ConvolutionDepthWise1D": "0:d=0 1:d=0 2:d=1 3:d=1 4:d=0 15:d@4 18:e=0 5:d=0 6:d=0 7:d=1 9:d=0 10:fa 19:d=0",
    "ConvolutionDepthWise3D": "0:d=0 1:d=0 11:d@1 21:d@1 2:d=1 12:d@2 22:d@2 3:d=1 13:d@3 23:d@3 4:d=0 14:d@4 "
    "24:d@4 15:d@4 16:d@14 17:d@24 18:e=0 5:d=0 6:d=0 7:d=1 9:d=0 10:fa",
    "CopyTo": "0:d=0 1:d=0 13:d=0 2:d=0 9:ia 11:ia",
    "Crop": "0:d=0 1:d=0 13:d=0 2:d=0 3:d=0 4:d=0 14:d=0 5:d=0 6:d=0 7:d=0 15:d=0 8:d=0 9:ia 10:ia 11:ia 19:s "
    "20:s 21:s",
    "CumulativeSum": "0:d=0",
    "Deconvolution": "0:d=0 1:d=0 11:d@1 2:d=1 12:d@2 3:d=1 13:d@3 4:d=0 14:d@4 15:d@4 16:d@14 18:d=0 19:d@18 "
    "20:d=0 21:d@20 5:d=0 6:d=0 9:d=0 10:fa 28:d=0",
    "Deconvolution1D": "0:d=0 1:d=0 2:d=1 3:d=1 4:d=0 15:d@4 18:d=0 20:d=0 5:d=0 6:d=0 9:d=0 10:fa 28:d=0",
    "Deconvolution3D": "0:d=0 1:d=0 11:d@1 21:d@1 2:d=1 12:d@2 22:d@2 3:d=1 13:d@3 23:d@3 4:d=0 14:d@4 24:d@4 "
    "15:d@4 16:d@14 17:d@24 18:d=0 19:d@18 20:d@18 25:d=0 26:d@25 27:d@25 5:d=0 6:d=0 9:d=0 10:fa",
    "DeconvolutionDepthWise": "0:d=0 1:d=0 11:d@1 2:d=1 12:d@2 3:d=1 13:d@3 4:d=0 14:d@4 15:d@4 16:d@14 18:d=0 "
    "19:d@18 20:d=0 21:d@20 5:d=0 6:d=0 7:d=1 9:d=0 10:fa 28:d=0",
    "DeconvolutionDepthWise1D": "0:d=0 1:d=0 2:d=1 3:d=1 4:d=0 15:d@4 18:d=0 20:d=0 5:d=0 6:d=0 7:d=1 9:d=0 10:fa "
    "28:d=0",
    "DeconvolutionDepthWise3D": "0:d=0 1:d=0 11:d@1 21:d@1 2:d=1 12:d@2 22:d@2 3:d=1 13:d@3 23:d@3 4:d=0 14:d@4 "
    "24:d@4 15:d@4 16:d@14 17:d@24 18:d=0 19:d@18 20:d@18 25:d=0 26:d@25 27:d@25 5:d=0 6:d=0 7:d=1 9:d=0 10:fa",
    "DeformableConv2D": "0:d=0 1:d=0 11:d@1 2:d=1 12:d@2 3:d=1 13:d@3 4:d=0 14:d@4 15:d@4 16:d@14 5:d=0 6:d=0 "
    "9:d=0 10:fa",
    "Dequantize": "0:d=1 1:d=0",
    "DetectionOutput": "0:d=0 1:e=0.05 2:d=300 3:d=100 4:e=0.5 5:e=0.1 6:e=0.1 7:e=0.2 8:e=0.2",
    "Diag": "0:d=0",
    "Dropout": "0:e=1",
    "Eltwise": "0:d=0 1:fa",
    "ELU": "0:e=0.1",
    "Embed": "0:d=0 1:d=0 2:d=0 3:d=0 18:d=0",
    "Exp": "0:e=-1 1:e=1 2:e=0",
    "ExpandDims": "3:ia",
    "Fold": "1:d=0 11:d@1 2:d=1 12:d@2 3:d=1 13:d@3 4:d=0 14:d@4 15:d@4 16:d@14 20:d=0 21:d@20",
    "GELU": "0:d=0",
    "Gemm": "0:e=1 1:e=1 2:d=0 3:d=0 4:d=0 5:d=0 6:d=0 7:d=0 8:d=0 9:d=0 10:d=0 11:d=0 12:d=0 13:d=0 14:d=0 "
    "18:d=0 20:d=0 21:d=0 22:d=0",
    "GLU": "0:d=0",
    "GridSample": "0:d=1 1:d=1 2:d=0 3:d=0",
    "GroupNorm": "0:d=1 1:d=0 2:e=0.001 3:d=1",
    "GRU": "0:d=0 1:d=0 2:d=0 8:d=0",
    "HardSigmoid": "0:e=0.2 1:e=0.5",
    "HardSwish": "0:e=0.2 1:e=0.5",
    "InnerProduct": "0:d=0 1:d=0 2:d=0 8:d=0 9:d=0 10:fa",
    "Input": "0:d=0 1:d=0 2:d=0",
    "InstanceNorm": "0:d=0 1:e=0.001 2:d=1",
    "Interp": "0:d=0 1:e=1 2:e=1 3:d=0 4:d=0 5:d=0 6:d=0 9:s",
    "LayerNorm": "0:d=0 1:e=0.001 2:d=1",
    "Log": "0:e=-1 1:e=1 2:e=0",
    "LRN": "0:d=0 1:d=5 2:e=1 3:e=0.75 4:e=1",
    "LSTM": "0:d=0 1:d=0 2:d=0 3:d^0 8:d=0",
    "MatMul": "0:d=0",
    "MemoryData": "0:d=0 1:d=0 2:d=0 11:d=0",
    "MultiHeadAttention": "0:d=0 1:d=1 2:d=0 3:d^0 4:d^0 5:d=0 6:e=mha 7:d=0 18:d=0",
    "MVN": "0:d=0 1:d=0 2:e=0.0001",
    "Normalize": "0:d=0 1:d=0 2:e=0.0001 3:d=0 4:d=1 9:d=0",
    "Padding": "0:d=0 1:d=0 2:d=0 3:d=0 4:d=0 5:e=0 6:d=0 7:d=0 8:d=0",
    "Permute": "0:d=0",
    "PixelShuffle": "0:d=1 1:d=0",
    "Pooling": "0:d=0 1:d=0 11:d@1 2:d=1 12:d@2 3:d=0 13:d@3 14:d@3 15:d@13 4:d=0 5:d=0 6:d=0 7:d=0 8:d=0 18:d@8",
    "Pooling1D": "0:d=0 1:d=0 2:d=1 3:d=0 14:d@3 4:d=0 5:d=0 6:d=0 7:d=0 8:d=0",
    "Pooling3D": "0:d=0 1:d=0 11:d@1 21:d@1 2:d=1 12:d@2 22:d@2 3:d=0 13:d@3 23:d@3 14:d@3 15:d@13 16:d@23 4:d=0 "
    "5:d=0 6:d=0 7:d=0 8:d=0 18:d@8 28:d@8",
    "Power": "0:e=1 1:e=1 2:e=0",
    "PReLU": "0:d=0",
    "PriorBox": "0:fa 1:fa 2:fa 3:e=0.1 4:e=0.1 5:e=0.2 6:e=0.2 7:d=1 8:d=0 9:d=0 10:d=0 11:e=-233 12:e=-233 13:e=0",
    "Proposal": "0:d=16 1:d=16 2:d=6000 3:d=300 4:e=0.7 5:d=16",
    "PSROIPooling": "0:d=7 1:d=7 2:e=0.0625 3:d=0",
    "Quantize": "0:d=1",
    "Reduction": "0:d=0 1:d=1 2:e=1 3:ia 4:d=0",
    "ReLU": "0:e=0",
    "Reorg": "0:d=1 1:d=0",
    "Requantize": "0:d=1 1:d=1 2:d=0 3:d=0 4:fa",
    "Reshape": "0:d=-233 1:d=-233 11:d=-233 2:d=-233 6:s",
    "RMSNorm": "0:d=0 1:e=0.001 2:d=1",
    "RNN": "0:d=0 1:d=0 2:d=0 8:d=0",
    "ROIAlign": "0:d=0 1:d=0 2:e=1 3:d=0 4:d=0 5:d=0",
    "ROIPooling": "0:d=0 1:d=0 2:e=1",
    "RotaryEmbed": "0:d=0",
    "Scale": "0:d=0 1:d=0",
    "SDPA": "5:d=0 6:e=0 7:d=0 18:d=0",
    "ShuffleChannel": "0:d=1 1:d=0",
    "Slice": "0:ia 1:d=0",
    "Softmax": "0:d=0",
    "Squeeze": "0:d=0 1:d=0 11:d=0 2:d=0 3:ia",
    "Threshold": "0:e=0",
    "Tile": "0:d=0 1:d=1 2:ia",
    "UnaryOp": "0:d=0",
    "Unfold": "1:d=0 11:d@1 2:d=1 12:d@2 3:d=1 13:d@3 4:d=0 14:d@4 15:d@4 16:d@14 18:e=0",
    "YoloDetectionOutput": "0:d=20 1:d=5 2:e=0.01 3:e=0.45 4:fa",
    "Yolov3DetectionOutput": "0:d=20 1:d=5 2:e=0.01 3:e=0.45 4:fa 5:ia 6:fa",
}

#: ids ncnn reads that ModelWriter drops; kept verbatim (see the module docstring).
_KEPT_EXTRA = {"Reshape": ("12", "13"), "Slice": ("2",), "Input": ("11",), "PriorBox": ("14", "15")}

_TOKEN = re.compile(r"(\d+):(d|e|ia|fa|s)(?:([=@^])(\S+))?$")


def _parse_spec(text: str) -> list[tuple[int, str, str, str]]:
    out = []
    for tok in text.split():
        m = _TOKEN.match(tok)
        if m is None:
            raise AssertionError(f"bad spec token {tok!r}")
        out.append((int(m.group(1)), m.group(2), m.group(3) or "", m.group(4) or ""))
    return out


SPECS = {t: _parse_spec(s) for t, s in _SPEC_TEXT.items()}

#: Layer types ncnn's ModelWriter has an entry for.
KNOWN_TYPES = frozenset(SPECS)


# ------------------------------------------------------------------ values as ParamDict holds them


def vstr_to_float(v: str) -> float:
    """ncnn's ``vstr_to_float``: its own decimal parser (double arithmetic, then float32)."""
    p, n = 0, len(v)
    neg = p < n and v[p] == "-"
    if p < n and v[p] in "+-":
        p += 1
    whole = 0
    while p < n and v[p].isdigit():
        whole = (whole * 10 + int(v[p])) & 0xFFFFFFFF
        p += 1
    val = float(whole)
    if p < n and v[p] == ".":
        p += 1
        frac, pow10 = 0, 1
        while p < n and v[p].isdigit():
            frac = (frac * 10 + int(v[p])) & 0xFFFFFFFF
            pow10 = (pow10 * 10) & 0xFFFFFFFF
            p += 1
        val += frac / float(pow10)
    if p < n and v[p] in "eE":
        p += 1
        exp_pos = not (p < n and v[p] == "-")
        if p < n and v[p] in "+-":
            p += 1
        expon = 0
        while p < n and v[p].isdigit():
            expon = expon * 10 + int(v[p])
            p += 1
        scale = 1.0
        while expon >= 8:
            scale *= 1e8
            expon -= 8
        while expon > 0:
            scale *= 10.0
            expon -= 1
        val = val * scale if exp_pos else val / scale
    return float(np.float32(-val if neg else val))


def _is_float(v: str) -> bool:
    return any(c in ".eE" for c in v[:15])


def _bits(v: str) -> int:
    """One scalar as the 32 bits ParamDict stores (float or int, by ncnn's look-ahead rule)."""
    if _is_float(v):
        return struct.unpack("<I", struct.pack("<f", vstr_to_float(v)))[0]
    m = re.match(r"\s*[+-]?\d+", v)
    if m is None:
        raise NcnnFormatError(f"param value {v!r} is not a number")
    return int(m.group(0)) & 0xFFFFFFFF


def _as_int(bits: int) -> int:
    return bits - (1 << 32) if bits & 0x80000000 else bits


def _as_float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _f32(x: float) -> float:
    return float(np.float32(x))


def parse_values(params: list[tuple[str, str]]) -> dict[int, tuple[str, object]]:
    """id -> ("scalar", bits) | ("array", [bits...]) | ("string", text), as ParamDict parses them."""
    out: dict[int, tuple[str, object]] = {}
    for key, val in params:
        pid = int(key)
        if pid <= -23300:
            parts = val.split(",")
            n = int(parts[0])
            if len(parts) - 1 < n:
                raise NcnnFormatError(f"array param {key} declares {n} values, has {len(parts) - 1}")
            out[-pid - 23300] = ("array", [_bits(x) for x in parts[1 : 1 + n]])
        elif val[:1].isalpha() or val[:1] == '"':
            text = val[1:] if val.startswith('"') else val
            out[pid] = ("string", text[:-1] if text.endswith('"') else text)
        elif "," in val:
            out[pid] = ("array", [_bits(x) for x in val.split(",")])
        else:
            out[pid] = ("scalar", _bits(val))
    return out


def _default_const(fmt: str, text: str) -> float | int:
    if fmt == "e":
        return {"FLT_MAX": FLT_MAX, "-FLT_MAX": -FLT_MAX}.get(text, None) or _f32(float(text))
    return int(text)


class _Layer:
    def __init__(self, typ: str, params: list[tuple[str, str]]) -> None:
        self.type = typ
        self.values = parse_values(params)
        self.spec = {pid: (fmt, how, arg) for pid, fmt, how, arg in SPECS[typ]}

    def default(self, pid: int):
        """The value of ``pid`` in a layer loaded from an empty ParamDict."""
        fmt, how, arg = self.spec[pid]
        if how == "=":
            if arg == "mha":
                return math.inf  # 1/sqrtf(embed_dim / num_heads) with embed_dim 0
            return _default_const(fmt, arg)
        return self.default(int(arg))

    def value(self, pid: int):
        fmt, how, arg = self.spec[pid]
        got = self.values.get(pid)
        if got is not None:
            kind, v = got
            if kind != "scalar":
                raise NcnnFormatError(f"param {pid} of a {self.type} must be a number, got {kind}")
            return _f32(_as_float(v)) if fmt == "e" else _as_int(v)
        if how == "=" and arg == "mha":
            embed, heads = self.value(0), self.value(1)
            q = int(embed / heads) if heads else 0
            return _f32(1.0 / float(np.sqrt(np.float32(q)))) if q > 0 else math.inf
        if how == "=":
            return self.default(pid)
        return self.value(int(arg))

    def token(self, pid: int) -> str:
        fmt, how, arg = self.spec[pid]
        if fmt in ("ia", "fa"):
            got = self.values.get(pid)
            if got is None or got[0] != "array" or not got[1]:
                return ""
            conv = (lambda b: "%d" % _as_int(b)) if fmt == "ia" else (lambda b: "%e" % _as_float(b))
            return f" -{23300 + pid}={len(got[1])}" + "".join("," + conv(b) for b in got[1])
        if fmt == "s":
            got = self.values.get(pid)
            if got is None:
                return ""
            text = got[1] if got[0] == "string" else None
            if text is None:
                raise NcnnFormatError(f"param {pid} of a {self.type} must be a string")
            return f' {pid}="{text}"' if text else ""
        v = self.value(pid)
        ref = self.value(int(arg)) if how == "@" else self.default(int(arg)) if how == "^" else self.default(pid)
        if v == ref and not (isinstance(v, float) and math.isnan(v)):
            return ""
        return f" {pid}=%e" % v if fmt == "e" else f" {pid}={v}"

    def text(self) -> str:
        out = "".join(self.token(pid) for pid, _, _, _ in SPECS[self.type])
        if self.type == "Reduction" and self.values.get(3, ("", []))[1]:
            out += " 5=1"
        if self.type == "Softmax" and self.value(0) != 0:
            out += " 1=1"
        return out


def _shape_hint(params: list[tuple[str, str]], top_count: int) -> str:
    """ModelWriter's ``-23330=`` shape hint, rebuilt from the one read (ncnn src/net.cpp)."""
    hint = parse_values([(k, v) for k, v in params if k in ("-23330", "30")]).get(30)
    if hint is None or hint[0] != "array" or top_count == 0:
        return ""
    vals = [_as_int(b) for b in hint[1]]
    step = len(vals) // top_count
    if step < 4:
        return ""
    out = []
    for j in range(top_count):
        p = vals[j * step : (j + 1) * step]
        dims = p[0]
        if dims == 1:
            shape = (1, p[1], 1, 1, 1)
        elif dims == 2:
            shape = (2, p[1], p[2], 1, 1)
        elif dims == 3:
            shape = (3, p[1], p[2], 1, p[4] if step == 5 else p[3])
        elif dims == 4:
            shape = (4, p[1], p[2], p[3], p[4])
        else:
            return ""
        out.extend(shape)
    return f" -23330={len(out)}" + "".join(f",{v}" for v in out)


def modelwriter_params(
    typ: str, params: list[tuple[str, str]], top_count: int = 1, keep_read_params: bool = True
) -> str:
    """The params part of a layer line as ModelWriter writes it (leading space per token); with
    ``keep_read_params`` plus what ncnn reads and ModelWriter drops (module docstring).

    Raises NcnnFormatError when a value cannot be read the way ncnn reads it.
    """
    hint = _shape_hint(params, top_count)
    rest = [(k, v) for k, v in params if k not in ("-23330", "30")]
    if typ not in KNOWN_TYPES:
        return hint + ("".join(f" {k}={v}" for k, v in rest) if keep_read_params else "")
    text = hint + _Layer(typ, rest).text()
    for extra in _KEPT_EXTRA.get(typ, ()) if keep_read_params else ():
        text += "".join(f" {k}={v}" for k, v in rest if k == extra or k == str(-23300 - int(extra)))
    return text


def modelwriter_param_text(param, keep_read_params: bool = True) -> str:
    """The whole ``.param`` (an ``NcnnParam``) as ncnn's ModelWriter writes it; with
    ``keep_read_params=False`` exactly, else keeping what ncnn reads (module docstring)."""
    out = [str(7767517), f"{len(param.layers)} {param.blob_count()}"]
    for lay in param.layers:
        head = "%-24s %-24s %d %d" % (lay.type, lay.name, len(lay.bottoms), len(lay.tops))
        blobs = "".join(" " + b for b in lay.bottoms + lay.tops)
        try:
            params = modelwriter_params(lay.type, lay.params, len(lay.tops), keep_read_params)
        except (NcnnFormatError, ValueError, KeyError) as e:
            raise NcnnFormatError(f"layer '{lay.name}' ({lay.type}): {e}", layer=lay.name) from e
        out.append(head + blobs + params)
    return "\n".join(out) + "\n"
