"""Where each layer's arrays lie in an ncnn ``.bin``: what its ``load_model`` reads, in order.

Facts from ncnn ``src/layer/*.cpp`` (``load_model``) and ``src/modelbin.cpp``: a layer reads
"tagged" arrays (ModelBin type 0: a 4-byte tag, then a float32 / float16 / int8 payload padded
to 4 bytes) and "raw" float32 arrays (type 1, no tag). Only the layer types listed in
:data:`DATA_TYPES` read anything; every other ncnn layer type (:data:`WEIGHTLESS_TYPES`)
reads nothing. A type that is in neither set is refused by name, so a writer never guesses
where a layer's bytes end.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lightning_ncnnqat.errors import NcnnQatError

TAG_FP32 = 0x00000000
TAG_FP16 = 0x01306B47
TAG_INT8 = 0x000D4B38

#: ncnn layer types whose load_model reads nothing (every ncnn layer without a load_model).
WEIGHTLESS_TYPES = frozenset(
    """
    AbsVal ArgMax BinaryOp BNLL Cast CELU Clip Concat CopyTo Crop CumulativeSum DeepCopy
    DetectionOutput Diag Dropout Einsum Eltwise ELU Erf Exp ExpandDims Flatten Flip Fold GELU GLU
    GridSample HardSigmoid HardSwish Input Interp InverseSpectrogram Log LRN MatMul Mish MVN Noop
    Packing Permute PixelShuffle Pooling Pooling1D Pooling3D Power PriorBox Proposal PSROIPooling
    Reduction ReLU Reorg Reshape ROIAlign ROIPooling RotaryEmbed SDPA SELU Shrink ShuffleChannel
    Sigmoid Slice Softmax Softplus Spectrogram Split SPP Squeeze StatisticsPooling Swish TanH
    Threshold Tile UnaryOp Unfold YoloDetectionOutput Yolov3DetectionOutput
    """.split()
)


class NcnnFormatError(NcnnQatError, ValueError):
    """A .param/.bin that does not follow the ncnn format (message names the layer)."""


@dataclass
class BinEntry:
    """One array a layer's load_model reads: tagged (weights) or raw float32.

    ``role`` names the array ("weight", "bias", "weight_scales", "input_scale", "A", "B", ...);
    ``count`` is its number of elements; ``offset``/``nbytes`` locate it in the file (the tag,
    payload and padding of a tagged array).
    """

    role: str
    count: int
    tagged: bool
    offset: int = 0
    nbytes: int = 0
    tag: int | None = None
    raw: str = "<f4"  # an untagged array's element type: "<f4", or "i1" (MemoryData 21=3)

    def values(self, data: bytes) -> np.ndarray:
        """The entry decoded to float32 (int8 payloads are returned as their integer values)."""
        start = self.offset + (4 if self.tagged else 0)
        if not self.tagged and self.raw == "i1":
            return np.frombuffer(data, np.int8, self.count, start).astype(np.float32)
        if not self.tagged or self.tag == TAG_FP32:
            return np.frombuffer(data, "<f4", self.count, start).copy()
        if self.tag == TAG_FP16:
            return np.frombuffer(data, "<f2", self.count, start).astype(np.float32)
        if self.tag == TAG_INT8:
            return np.frombuffer(data, np.int8, self.count, start).astype(np.float32)
        raise NcnnFormatError(f"unsupported weight tag 0x{self.tag:08X}")


def _t(role: str, n: int) -> BinEntry:
    return BinEntry(role, int(n), True)


def _r(role: str, n: int) -> BinEntry:
    return BinEntry(role, int(n), False)


def _conv(lay, g) -> list[BinEntry]:
    t = lay.type
    dynamic = g(28 if t.startswith("Deconvolution") else 19, 0) if not t.endswith("3D") else 0
    if dynamic:
        return []
    out = [_t("weight", g(6, 0))] + ([_r("bias", g(0, 0))] if g(5, 0) else [])
    term = g(8, 0) if t in ("Convolution", "ConvolutionDepthWise") else 0
    if term:
        if t == "Convolution" or term in (2, 102):
            n = g(0, 0) if t == "Convolution" else 1
        else:
            n = g(7, 1)
        out += [_r("weight_scales", n), _r("input_scale", 1)]
        if term > 100:
            out.append(_r("output_scale", 1))
    return out


def _innerproduct(lay, g) -> list[BinEntry]:
    n = g(0, 0)
    out = [_t("weight", g(2, 0))] + ([_r("bias", n)] if g(1, 0) else [])
    if g(8, 0):
        out += [_r("weight_scales", n), _r("input_scale", 1)]
    return out


def _weight_block_quantized(term: int) -> bool:
    return term in (4, 5, 6) or term >= 400


def _gemm(lay, g) -> list[BinEntry]:
    term = g(18, 0)
    if _weight_block_quantized(term):
        raise NcnnFormatError(f"layer '{lay.name}': Gemm with weight-block quantization (18={term}) is not handled", layer=lay.name)
    m, n, k = g(7, 0), g(8, 0), g(9, 0)
    out = []
    if g(4, 0):
        out.append(_t("A", m * k))
    if g(5, 0):
        out.append(_t("B", n * k))
    bt = g(10, 0)
    if g(6, 0) and bt != -1:
        sizes = {0: 1, 1: m, 2: m, 3: n * m, 4: n}
        if bt not in sizes:
            raise NcnnFormatError(f"layer '{lay.name}': Gemm constant_broadcast_type_C={bt} is invalid", layer=lay.name)
        out.append(_t("C", sizes[bt]))
    if term:
        out += ([_r("A_scales", m)] if g(4, 0) else []) + ([_r("B_scale", 1)] if g(5, 0) else [])
    return out


def _mha(lay, g) -> list[BinEntry]:
    term = g(18, 0)
    if _weight_block_quantized(term):
        raise NcnnFormatError(
            f"layer '{lay.name}': MultiHeadAttention with weight-block quantization (18={term}) is not handled"
        )
    e = g(0, 0)
    if e <= 0:
        raise NcnnFormatError(f"layer '{lay.name}': MultiHeadAttention embed_dim (0={e}) must be positive", layer=lay.name)
    qdim, kdim, vdim = g(2, 0) // e, g(3, e), g(4, e)
    out = [
        _t("q_weight", e * qdim), _r("q_bias", e), _t("k_weight", e * kdim), _r("k_bias", e),
        _t("v_weight", e * vdim), _r("v_bias", e), _t("out_weight", qdim * e), _r("out_bias", qdim),
    ]
    if term:
        out += [_r("q_scales", e), _r("k_scales", e), _r("v_scales", e), _r("out_scale", 1)]
    return out


def _recurrent(lay, g) -> list[BinEntry]:
    t, no, nd = lay.type, g(0, 0), 2 if g(2, 0) == 2 else 1
    hidden = g(3, no) if t == "LSTM" else no
    gates = {"RNN": 1, "LSTM": 4, "GRU": 3}[t]
    if no <= 0 or hidden <= 0:
        raise NcnnFormatError(f"layer '{lay.name}': {t} num_output (0={no}) must be positive", layer=lay.name)
    size = g(1, 0) // nd // hidden // gates
    out = [
        _t("weight_xc", size * hidden * gates * nd),
        _t("bias_c", (4 if t == "GRU" else gates) * hidden * nd),
        _t("weight_hc", no * hidden * gates * nd),
    ]
    if t == "LSTM" and no != hidden:
        out.append(_t("weight_hr", hidden * no * nd))
    if g(8, 0):
        out += [_r("weight_xc_scales", hidden * gates * nd), _r("weight_hc_scales", hidden * gates * nd)]
    return out


#: MemoryData's param 21 (``load_type``, ``src/layer/memorydata.cpp``: ``mb.load(..., load_type)``)
#: -> (tagged, raw element type). 0: a tagged array; 1 (ncnn's default): raw float32; 3: raw signed
#: bytes, padded to 4, read as float (pnnx 20261020 writes a constant bool mask so; measured with
#: ncnn 1.0.20261020: bytes 255, 128, 1 load as -1, -128, 1). Other values are refused by name.
MEMORYDATA_LOAD_TYPES = {0: (True, "<f4"), 1: (False, "<f4"), 3: (False, "i1")}


def _memorydata(lay, g) -> list[BinEntry]:
    w, h, d, c = g(0, 0), g(1, 0), g(11, 0), g(2, 0)
    if d:
        n = w * h * d * c
    elif c:
        n = w * h * c
    elif h:
        n = w * h
    else:
        n = w
    if not n:
        return []
    load_type = g(21, 1)
    if load_type not in MEMORYDATA_LOAD_TYPES:
        raise NcnnFormatError(
            f"layer '{lay.name}' (MemoryData) has load type 21={load_type}; this exporter reads "
            f"{sorted(MEMORYDATA_LOAD_TYPES)} (tagged, raw float32, raw int8)", layer=lay.name,
        )
    is_tagged, raw = MEMORYDATA_LOAD_TYPES[load_type]
    return [BinEntry("data", n, is_tagged, raw=raw)]


def _norm(lay, g) -> list[BinEntry]:
    t = lay.type
    affine_id, count_id = {"LayerNorm": (2, 0), "RMSNorm": (2, 0), "GroupNorm": (3, 1), "InstanceNorm": (2, 0)}[t]
    if not g(affine_id, 1):
        return []
    c = g(count_id, 0)
    return [_r("gamma", c)] + ([] if t == "RMSNorm" else [_r("beta", c)])


_RULES: dict[str, Callable] = {
    **{t: _conv for t in (
        "Convolution", "ConvolutionDepthWise", "Convolution1D", "ConvolutionDepthWise1D", "Convolution3D",
        "ConvolutionDepthWise3D", "Deconvolution", "DeconvolutionDepthWise", "Deconvolution1D",
        "DeconvolutionDepthWise1D", "Deconvolution3D", "DeconvolutionDepthWise3D",
    )},
    "DeformableConv2D": lambda lay, g: [_t("weight", g(6, 0))] + ([_r("bias", g(0, 0))] if g(5, 0) else []),
    "InnerProduct": _innerproduct,
    "Gemm": _gemm,
    "MultiHeadAttention": _mha,
    "RNN": _recurrent, "LSTM": _recurrent, "GRU": _recurrent,
    "Embed": lambda lay, g: [_t("weight", g(3, 0))] + ([_r("bias", g(0, 0))] if g(2, 0) else [])
    + ([_r("weight_scale", 1)] if g(18, 0) else []),
    "BatchNorm": lambda lay, g: [_r(r, g(0, 0)) for r in ("slope", "mean", "var", "bias")],
    "Bias": lambda lay, g: [_r("bias", g(0, 0))],
    "Scale": lambda lay, g: []
    if g(0, 0) == -233
    else [_r("scale", g(0, 0))] + ([_r("bias", g(0, 0))] if g(1, 0) else []),
    "PReLU": lambda lay, g: [_r("slope", g(0, 0))],
    "Normalize": lambda lay, g: [_r("scale", g(3, 0))],
    "Padding": lambda lay, g: [_r("per_channel_pad", g(6, 0))] if g(6, 0) > 0 else [],
    "LayerNorm": _norm, "RMSNorm": _norm, "GroupNorm": _norm, "InstanceNorm": _norm,
    "MemoryData": _memorydata,
    "Quantize": lambda lay, g: [_r("scale", g(0, 1))],
    "Dequantize": lambda lay, g: [_r("scale", g(0, 1))] + ([_r("bias", g(1, 0))] if g(1, 0) else []),
    "Requantize": lambda lay, g: [_r("scale_in", g(0, 1)), _r("scale_out", g(1, 1))]
    + ([_r("bias", g(2, 0))] if g(2, 0) else []),
}

#: Layer types whose load_model reads data from the .bin.
DATA_TYPES = frozenset(_RULES)


def layer_entries(lay) -> list[BinEntry]:
    """What ``lay`` (an ``NcnnLayer``)'s load_model reads, in order (offsets not yet known)."""
    if lay.type in WEIGHTLESS_TYPES:
        return []
    rule = _RULES.get(lay.type)
    if rule is None:
        raise NcnnFormatError(
            f"layer '{lay.name}' has type {lay.type}, whose .bin layout this exporter does not know; "
            "it cannot rewrite this model"
        )
    entries = rule(lay, lay.get_int)
    for e in entries:
        if e.count < 0:
            raise NcnnFormatError(f"layer '{lay.name}' ({lay.type}): negative size {e.count} for its {e.role}", layer=lay.name)
    return entries


def _align4(n: int) -> int:
    return (n + 3) & ~3


def locate(layers, data: bytes) -> list[list[BinEntry]]:
    """Entries of every layer, by layer index, located in ``data``; the walk must consume it exactly."""
    pos = 0
    out: list[list[BinEntry]] = []
    for lay in layers:
        entries = layer_entries(lay)
        for e in entries:
            e.offset = pos
            if e.tagged:
                if pos + 4 > len(data):
                    raise NcnnFormatError(f"layer '{lay.name}': .bin ends inside its {e.role}", layer=lay.name)
                (e.tag,) = struct.unpack_from("<I", data, pos)
                if e.tag == TAG_FP32:
                    e.nbytes = 4 + 4 * e.count
                elif e.tag == TAG_FP16:
                    e.nbytes = 4 + _align4(2 * e.count)
                elif e.tag == TAG_INT8:
                    e.nbytes = 4 + _align4(e.count)
                else:
                    raise NcnnFormatError(
                        f"layer '{lay.name}': {e.role} has tag 0x{e.tag:08X} "
                        "(only float32, float16 and int8 are handled)"
                    )
            else:
                e.nbytes = _align4(e.count) if e.raw == "i1" else 4 * e.count
            pos += e.nbytes
            if pos > len(data):
                raise NcnnFormatError(f"layer '{lay.name}': .bin ends inside its {e.role} ({pos} > {len(data)} bytes)", layer=lay.name)
        out.append(entries)
    if pos != len(data):
        raise NcnnFormatError(f".bin has {len(data) - pos} bytes after the last layer's data: layout mismatch")
    return out


def tagged(tag: int, payload: bytes) -> bytes:
    """A tagged array: tag, payload, zero padding to 4 bytes."""
    pad = _align4(len(payload)) - len(payload)
    return struct.pack("<I", tag) + payload + b"\0" * pad


def raw_f32(values: np.ndarray) -> bytes:
    """A raw (untagged) little-endian float32 array."""
    return np.ascontiguousarray(values, dtype="<f4").tobytes()
