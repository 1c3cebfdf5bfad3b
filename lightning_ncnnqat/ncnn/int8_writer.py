"""Write the int8 ncnn model ncnn2int8 would write from the float32 model and the table.

What ncnn2int8 does (``tools/quantize/ncnn2int8.cpp`` and ``tools/modelwriter.h``), and so
what this module does, without the C++ tool:

* every Convolution / ConvolutionDepthWise / InnerProduct with an input row in the table gets
  int8 weights ``clamp(round(w * s_w), -127, 127)`` (one scale per output channel, per group for
  depthwise), stored with tag 0x000D4B38 and padded to 4 bytes; its bias stays float32; its
  weight scales and input scale follow in the .bin; param 8 (int8_scale_term) becomes 2
  (Convolution, InnerProduct) or 1 (ConvolutionDepthWise);
* requantize fusion (``fuse_requantize``): a quantized conv whose output goes directly to a
  quantized conv, or through a Split whose every output goes to a quantized conv, gets
  param 8 += 100 and one more float in the .bin: the FIRST consumer's input scale, with which
  it writes its output as int8. Every consumer then reads those int8 values as if quantized
  with its own input scale, so consumers of one blob must share one input scale (checked here:
  ncnn2int8 would silently write a wrong model);
* every ``Gemm`` is quantized without any table row (``quantize_gemm``): a constant A gets one
  scale per row (127 / row absmax), a constant B ONE scale, 127 / absmax of what ncnn2int8
  reads as B's first row when B is stored transposed (``3=1``, pnnx's form: the other rows
  are clipped to +-127 with it) or of all of B otherwise; A/B are stored row-major
  (``2=0``/``3=1``), param 18 = 2, and the scales follow the arrays. Every ``SDPA`` gets 18=2
  (``sdpa_int8=False``, not ncnn2int8: none does, for a model QAT did not train so).
* layers with rows-only int8 in ncnn2int8 (MultiHeadAttention, RNN, LSTM, GRU, Embed) stay
  float, as ncnn2int8 leaves them when the table has no row for them;
* every other tagged array (float layers' weights) is written as float16 (``storage_type =
  1``), int8 arrays as they are; untagged float32 arrays stay float32 with denormals flushed to
  zero, as ModelWriter does; MemoryData is written untagged whatever it was read as.
  ``float_weights="fp32"`` (not ncnn2int8) keeps float layers' tagged float32 arrays as they
  are instead (tag 0): the weights QAT trained, computed exactly so where ncnn runs float
  layers in float32 (x86, ARMv8.0); ARMv8.2's default fp16 storage converts them at load;
* the ``.param`` is written the way ModelWriter writes it (:mod:`lightning_ncnnqat.ncnn.model_writer`), except
  that params ncnn reads and ModelWriter drops are kept (``Reshape`` 12/13: without them
  ncnn2int8's own output segfaults in the runtime); ``Int8Result.param_text_ncnn2int8`` is
  the tool's exact text.

Layers are addressed by index (layer names may repeat); the table addresses them by name, so a
quantized layer must carry a unique name.

The int8 weights are computed with the same rounding (half away from zero) as the QAT forward
(``ops.reference``), from the float weights in the ncnn model, which equal the folded torch
weights (the layer was matched by them), and are checked against the fake-quantized weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from lightning_ncnnqat.errors import LayerError
from lightning_ncnnqat.ncnn.bin_layout import BinEntry, locate
from lightning_ncnnqat.ncnn.int8_attention import write_mha_int8, write_sdpa_int8
from lightning_ncnnqat.ncnn.int8_gemm import GemmSpec, check_gemm_specs, ncnn2int8_gemm_chunks, write_gemm_int8
from lightning_ncnnqat.ncnn.model_writer import modelwriter_param_text
from lightning_ncnnqat.ncnn.param import (
    CONV_TYPES,
    INT8_TYPES,
    TAG_FP16,
    TAG_FP32,
    TAG_INT8,
    NcnnLayer,
    NcnnParam,
    raw_f32,
    tagged,
)


@dataclass
class Int8Spec:
    """The table entries of one quantized ncnn layer."""

    ncnn_name: str
    torch_name: str
    weight_scales: np.ndarray  # float32 [n]
    input_scale: float
    weight_fq: np.ndarray | None = None  # fake-quantized torch weight, flat, for the self-check


@dataclass
class Int8Result:
    """The int8 model and what was done to it (layers by ncnn name)."""

    param_text: str
    bin_bytes: bytes
    int8_scale_term: dict[str, int]  # ncnn layer -> param 8 written (table-driven layers)
    requantize: dict[str, tuple[str, float]]  # producer -> (first consumer, output scale)
    gemm_int8: dict[str, dict[str, object]] = field(default_factory=dict)  # Gemm -> its dynamic scales
    float_types: dict[str, str] = field(default_factory=dict)  # data layers left in float -> their type
    attention_int8: dict[str, str] = field(default_factory=dict)  # MultiHeadAttention / SDPA written int8 -> type
    # the .param exactly as ncnn2int8 writes it (param_text keeps what ncnn reads and
    # ncnn2int8 drops, e.g. Reshape 12/13: see ncnn_modelwriter)
    param_text_ncnn2int8: str = ""


def quantize_weights(w: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """int8 weights, one scale per row of ``w`` reshaped to ``[len(scales), -1]``."""
    wt = np.ascontiguousarray(w, dtype=np.float32).reshape(len(scales), -1)
    st = np.ascontiguousarray(scales, dtype=np.float32).reshape(-1, 1)
    v = np.clip(wt * st, np.float32(-127.0), np.float32(127.0))
    return round_half_away(v).astype(np.int8).ravel()


def round_half_away(v: np.ndarray) -> np.ndarray:
    """C ``round()`` on float32 (ties away from zero), as ncnn's ``float2int8``; equal to
    ``ops.reference.round_half_away`` (the QAT ops' rounding) element for element."""
    t = np.trunc(v)
    return t + np.where(np.abs(v - t) >= np.float32(0.5), np.sign(v), np.float32(0.0)).astype(v.dtype)


def _flush_denormals(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32, copy=True)
    a[(np.abs(a) < 1e-30) & (a != 0)] = 0.0
    return a


def _fp16_scalar(a: np.ndarray) -> np.ndarray:
    """ncnn's scalar ``float32_to_float16`` (src/mat.cpp): mantissa truncated, no fp16 denormals."""
    u = a.astype("<f4").view("<u4")
    sign = ((u >> 31) & 1).astype(np.uint16) << 15
    exp = ((u >> 23) & 0xFF).astype(np.int32)
    sig = u & 0x7FFFFF
    newexp = exp - 127 + 15
    out = sign | ((np.clip(newexp, 0, 31).astype(np.uint16)) << 10) | (sig >> 13).astype(np.uint16)
    out = np.where((exp == 0) | (newexp <= 0), sign, out)
    out = np.where((newexp >= 31) & (exp != 0xFF), sign | np.uint16(0x7C00), out)
    out = np.where(exp == 0xFF, sign | np.uint16(0x7C00) | np.where(sig != 0, 0x200, 0).astype(np.uint16), out)
    return out.astype("<u2")


def _to_fp16(a: np.ndarray) -> bytes:
    """float32 -> float16 as ncnn2int8 writes it on x86 (ncnn's Cast, ``cast_fp16.h``): blocks of
    4 with the F16C instruction (round to nearest even), the last ``n % 4`` values with the
    scalar ``float32_to_float16`` (truncation)."""
    arr = np.ascontiguousarray(a, dtype=np.float32).ravel()
    n4 = len(arr) // 4 * 4
    with np.errstate(over="ignore"):
        head = arr[:n4].astype("<f2").view("<u2")
    return head.tobytes() + _fp16_scalar(arr[n4:]).tobytes()


def _first(layers: list[NcnnLayer], start: int, pred) -> int | None:
    for k in range(start, len(layers)):
        if pred(layers[k]):
            return k
    return None


def _single_input_conv_on(blob: str):
    return lambda lay: lay.type in CONV_TYPES and len(lay.bottoms) == 1 and lay.bottoms[0] == blob


def fuse_by_index(layers: list[NcnnLayer], quantized: set[int]) -> dict[int, tuple[int, list[int]]]:
    """ncnn2int8's two fusion passes: producer index -> (first consumer index, all consumers).

    Pass 1: a conv whose output's first single-input conv reader is int8 (both int8).
    Pass 2: a conv whose output goes to a Split each of whose outputs goes to an int8 conv; the
    output scale is the one of the consumer of the split's first output (``blob.consumer``,
    the last layer listing it as an input).
    """
    fused: dict[int, tuple[int, list[int]]] = {}
    for i, lay in enumerate(layers):
        if lay.type not in CONV_TYPES:
            continue
        j = _first(layers, i + 1, _single_input_conv_on(lay.tops[0]))
        if j is not None and i in quantized and j in quantized:
            fused[i] = (j, [j])
    for i, lay in enumerate(layers):
        if lay.type not in CONV_TYPES:
            continue
        top = lay.tops[0]
        j = _first(layers, i + 1, lambda m: m.type == "Split" and len(m.bottoms) == 1 and m.bottoms[0] == top)
        if j is None:
            continue
        split = layers[j]
        consumers: list[int] | None = []
        for p in split.tops:
            k = _first(layers, j + 1, _single_input_conv_on(p))
            if k is None or k not in quantized:
                consumers = None
                break
            consumers.append(k)
        if consumers is None:
            continue
        readers = [k for k, m in enumerate(layers) if split.tops[0] in m.bottoms]
        first = readers[-1] if readers else None
        if i in quantized and first in quantized and layers[first].type in CONV_TYPES:
            fused[i] = (first, consumers)
    return fused


def fuse_requantize(param: NcnnParam, specs: dict[str, Int8Spec]) -> dict[str, tuple[str, float, list[str]]]:
    """``fuse_by_index`` by name: producer -> (first consumer, its input scale, all consumers)."""
    idx = {param.index(n): n for n in specs}
    names = [lay.name for lay in param.layers]
    out = {}
    for i, (j, cons) in fuse_by_index(param.layers, set(idx)).items():
        out[names[i]] = (names[j], specs[names[j]].input_scale, [names[k] for k in cons])
    return out


def _check_specs(param: NcnnParam, specs: dict[str, Int8Spec]) -> dict[int, Int8Spec]:
    """Index -> spec, after checking each names one int8-capable float layer with enough scales."""
    by_index: dict[int, Int8Spec] = {}
    for name, spec in specs.items():
        hits = param.indices(name)
        if len(hits) != 1:
            what = "is not in the model" if not hits else f"names {len(hits)} layers: a table cannot address it"
            raise LayerError(spec.torch_name, f"layer '{spec.torch_name}': ncnn layer '{name}' {what}")
        lay = param.layers[hits[0]]
        if lay.type not in INT8_TYPES:
            raise LayerError(
                spec.torch_name, f"layer '{spec.torch_name}': ncnn layer '{name}' is {lay.type}, not int8-capable"
            )
        if lay.get_int(8, 0):
            raise LayerError(spec.torch_name, f"layer '{spec.torch_name}': ncnn layer '{name}' is already int8")
        n = lay.get_int(7, 1) if lay.type == "ConvolutionDepthWise" else lay.get_int(0, 0)
        if len(spec.weight_scales) != n:
            raise LayerError(
                spec.torch_name,
                f"layer '{spec.torch_name}': {len(spec.weight_scales)} weight scales for ncnn layer '{name}' "
                f"({lay.type}), which needs {n}",
            )
        by_index[hits[0]] = spec
    return by_index


#: How float layers' tagged weights are stored in the int8 .bin: ``"fp16"`` as ncnn2int8
#: writes them (half the bytes, rounded), ``"fp32"`` the float32 values QAT trained (exact).
FLOAT_WEIGHTS = ("fp32", "fp16")


def check_float_weights(float_weights: str) -> str:
    """``float_weights`` if it is one of :data:`FLOAT_WEIGHTS`; ValueError naming it otherwise."""
    if float_weights not in FLOAT_WEIGHTS:
        raise ValueError(f"`float_weights` must be one of {FLOAT_WEIGHTS}, not {float_weights!r}")
    return float_weights


def _float_chunks(lay: NcnnLayer, entries: list[BinEntry], data: bytes, float_weights: str = "fp16") -> list[bytes]:
    """A layer left in float: tagged float32 -> float16 (ncnn2int8) or kept float32 verbatim
    (``float_weights="fp32"``), float16 re-rounded as ncnn2int8 does, int8 kept, raw float32
    flushed."""
    out = []
    for e in entries:
        if lay.type == "MemoryData" or not e.tagged:
            out.append(raw_f32(_flush_denormals(e.values(data))))
        elif e.tag == TAG_FP32 and float_weights == "fp32":
            out.append(data[e.offset : e.offset + e.nbytes])
        elif e.tag in (TAG_FP32, TAG_FP16):
            out.append(tagged(TAG_FP16, _to_fp16(e.values(data))))
        else:
            out.append(data[e.offset : e.offset + e.nbytes])
    return out


def _quantized_chunks(lay: NcnnLayer, entries: list[BinEntry], data: bytes, spec: Int8Spec) -> list[bytes]:
    chunks = []
    for e in entries:
        vals = e.values(data)
        if e.role == "weight":
            if e.tag == TAG_INT8:
                raise LayerError(spec.torch_name, f"ncnn layer '{lay.name}' already holds int8 weights")
            scales = np.asarray(spec.weight_scales, dtype=np.float32)
            qw = quantize_weights(vals, scales)
            if spec.weight_fq is not None:
                # the integer levels the QAT forward used: round(w_fq * s) (exact up to ulps)
                ref = np.asarray(spec.weight_fq, dtype=np.float32).reshape(len(scales), -1) * scales[:, None]
                bad = int(np.count_nonzero(np.rint(ref).ravel() != qw))
                if bad:
                    raise LayerError(
                        spec.torch_name,
                        f"layer '{spec.torch_name}': {bad} int8 weights of ncnn layer '{lay.name}' differ from the "
                        "QAT forward's fake-quantized weights",
                    )
            chunks.append(tagged(TAG_INT8, qw.astype(np.int8).tobytes()))
        elif e.role == "bias":
            chunks.append(raw_f32(_flush_denormals(vals)))
        else:
            raise LayerError(spec.torch_name, f"ncnn layer '{lay.name}' has unexpected data '{e.role}'")
    chunks.append(raw_f32(np.asarray(spec.weight_scales, dtype=np.float32)))
    chunks.append(raw_f32(np.asarray([spec.input_scale], dtype=np.float32)))
    return chunks


#: Types ncnn2int8 quantizes only from table rows this package never writes: they stay float.
ROW_ONLY_INT8_TYPES = ("MultiHeadAttention", "RNN", "LSTM", "GRU", "Embed")


def write_int8(
    param: NcnnParam,
    bin_bytes: bytes,
    specs: dict[str, Int8Spec],
    *,
    quantize_gemm: bool = True,
    float_weights: str = "fp16",
    gemm_specs: dict[str, GemmSpec] | None = None,
    mha_int8: frozenset[str] | set[str] = frozenset(),
    sdpa_int8: bool = True,
) -> Int8Result:
    """The int8 .param text and .bin bytes ncnn2int8 writes from ``param``/``bin_bytes`` and a
    table holding ``specs`` (ncnn layer name -> its scales); see the module docstring.

    ``quantize_gemm=False`` keeps every Gemm in float (float16 storage) instead of ncnn2int8's
    per-tensor int8 (which clips the rows of a transposed B beyond its first row's range; see
    ``Int8Result.gemm_int8[name]["B_clipped"]``): not what ncnn2int8 writes, but exact.

    ``float_weights="fp32"`` keeps the float32 weights of layers left in float (tag 0, the
    input's bytes) instead of ncnn2int8's float16 (``"fp16"``, the default here: byte-identical
    to the tool); a float16 input array stays float16 either way.

    Raises LayerError (naming the torch layer) when a spec does not fit its ncnn layer or when
    consumers of one requantized blob have different input scales; NcnnFormatError when the
    .bin does not match the .param.

    ``gemm_specs`` (ncnn Gemm name -> :class:`~lightning_ncnnqat.ncnn.int8_gemm.GemmSpec`): Gemms
    QAT trained as int8, written by :func:`~lightning_ncnnqat.ncnn.int8_gemm.write_gemm_int8` with
    the weight scale of the whole B (not ncnn2int8's first-row scale) whatever ``quantize_gemm``
    says; ``Int8Result.gemm_int8`` says what was written and what the tool would have written.

    ``mha_int8``: names of MultiHeadAttention layers QAT trained as int8, written by
    ``int8_attention.write_mha_int8`` (ncnn2int8 needs table rows for them); ``sdpa_int8=False``
    leaves every SDPA float, where ncnn2int8 (the default, True) sets 18=2 on all of them.
    """
    check_float_weights(float_weights)
    gemm = check_gemm_specs(param, gemm_specs)
    layout = locate(param.layers, bin_bytes)
    quant = _check_specs(param, specs)
    fused = fuse_by_index(param.layers, set(quant))
    names = [lay.name for lay in param.layers]
    for prod, (first, consumers) in fused.items():
        out_scale = quant[first].input_scale
        for c in consumers:
            if np.float32(quant[c].input_scale) != np.float32(out_scale):
                raise LayerError(
                    quant[c].torch_name,
                    f"layer '{quant[c].torch_name}' (ncnn '{names[c]}') reads the int8 output of '{names[prod]}', "
                    f"requantized with scale {out_scale!r} (its first consumer's), but its own input scale is "
                    f"{quant[c].input_scale!r}: ncnn would compute wrong values. Layers reading one tensor must "
                    "share one input range",
                )
    out_param = copy.deepcopy(param)
    result = Int8Result("", b"", {}, {})
    chunks: list[bytes] = []
    for i, lay in enumerate(param.layers):
        entries, out_lay = layout[i], out_param.layers[i]
        spec = quant.get(i)
        if spec is not None:
            term = (1 if lay.type == "ConvolutionDepthWise" else 2) + (100 if i in fused else 0)
            out_lay.set_int(8, term)
            result.int8_scale_term[lay.name] = term
            chunks += _quantized_chunks(lay, entries, bin_bytes, spec)
            if i in fused:
                first = fused[i][0]
                chunks.append(raw_f32(np.asarray([quant[first].input_scale], dtype=np.float32)))
                result.requantize[lay.name] = (names[first], quant[first].input_scale)
        elif lay.type == "Gemm" and lay.name in gemm:  # QAT-trained int8 Gemm (ncnn/int8_gemm.py)
            gem, result.gemm_int8[lay.name] = write_gemm_int8(out_lay, entries, bin_bytes, gemm[lay.name])
            chunks += gem
        elif lay.type == "Gemm" and quantize_gemm:
            gem, info = ncnn2int8_gemm_chunks(
                out_lay, entries, bin_bytes, lambda la, es: _float_chunks(la, es, bin_bytes, float_weights)
            )
            chunks += gem
            if info:
                result.gemm_int8[lay.name] = info
        elif lay.type == "MultiHeadAttention" and lay.name in mha_int8:  # QAT-trained (ncnn/int8_attention.py)
            chunks += write_mha_int8(out_lay, entries, bin_bytes)[0]
            result.attention_int8[lay.name] = lay.type
        else:
            if lay.type == "SDPA" and sdpa_int8:
                write_sdpa_int8(out_lay)
                result.attention_int8[lay.name] = lay.type
            if entries and not any(e.tagged and e.tag == TAG_INT8 for e in entries):
                result.float_types[lay.name] = lay.type
            chunks += _float_chunks(lay, entries, bin_bytes, float_weights)
    result.param_text = modelwriter_param_text(out_param)
    result.param_text_ncnn2int8 = modelwriter_param_text(out_param, keep_read_params=False)
    result.bin_bytes = b"".join(chunks)
    return result
