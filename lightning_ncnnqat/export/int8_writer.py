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
* every other tagged weight (float layers' convolution / inner-product weights) is written as
  float16 (``storage_type = 1``); untagged float32 arrays stay float32 with denormals flushed
  to zero, as ModelWriter does.

The int8 weights are computed with the same rounding (half away from zero) as the QAT forward
(``ops.reference``), from the float weights in the ncnn model, which equal the folded torch
weights (the layer was matched by them), and are checked against the fake-quantized weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from ..ops import reference
from .errors import LayerError
from .ncnn_param import (
    CONV_TYPES,
    INT8_TYPES,
    TAG_FP16,
    TAG_FP32,
    TAG_INT8,
    NcnnLayer,
    NcnnParam,
    bin_layout,
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
    param_text: str
    bin_bytes: bytes
    int8_scale_term: dict[str, int]  # ncnn layer -> param 8 written
    requantize: dict[str, tuple[str, float]]  # producer -> (first consumer, output scale)


def quantize_weights(w: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """int8 weights, one scale per row of ``w`` reshaped to ``[len(scales), -1]``."""
    wt = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32).reshape(len(scales), -1))
    st = torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32)).reshape(-1, 1)
    v = torch.clamp(wt * st, -127.0, 127.0)
    return reference.round_half_away(v).to(torch.int8).numpy().ravel()


def _flush_denormals(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32, copy=True)
    a[(np.abs(a) < 1e-30) & (a != 0)] = 0.0
    return a


def _to_fp16(a: np.ndarray) -> bytes:
    """float32 -> float16 with ncnn's own conversion (what ncnn2int8 on this machine does)."""
    import ncnn

    arr = np.ascontiguousarray(a, dtype=np.float32)
    if arr.size == 0:
        return b""
    src = ncnn.Mat(arr)
    half = np.array(ncnn.cast_float32_to_float16(src), copy=True)
    del src
    return half.astype("<f2", copy=False).tobytes()


def _first(layers: list[NcnnLayer], start: int, pred) -> int | None:
    for k in range(start, len(layers)):
        if pred(layers[k]):
            return k
    return None


def _single_input_conv_on(blob: str):
    return lambda lay: lay.type in CONV_TYPES and len(lay.bottoms) == 1 and lay.bottoms[0] == blob


def fuse_requantize(param: NcnnParam, specs: dict[str, Int8Spec]) -> dict[str, tuple[str, float, list[str]]]:
    """ncnn2int8's two fusion passes: producer -> (first consumer, its input scale, all consumers)."""
    layers = param.layers
    q = set(specs)
    fused: dict[str, tuple[str, float, list[str]]] = {}
    # pass 1: conv -> conv
    for i, lay in enumerate(layers):
        if lay.type not in CONV_TYPES:
            continue
        j = _first(layers, i + 1, _single_input_conv_on(lay.tops[0]))
        if j is None:
            continue
        if lay.name in q and layers[j].name in q:
            c = layers[j].name
            fused[lay.name] = (c, specs[c].input_scale, [c])
    # pass 2: conv -> Split -> convs
    for i, lay in enumerate(layers):
        if lay.type not in CONV_TYPES:
            continue
        top = lay.tops[0]
        j = _first(layers, i + 1, lambda m: m.type == "Split" and len(m.bottoms) == 1 and m.bottoms[0] == top)
        if j is None:
            continue
        split = layers[j]
        consumers = []
        for p in split.tops:
            k = _first(layers, j + 1, _single_input_conv_on(p))
            if k is None or layers[k].name not in q:
                consumers = None
                break
            consumers.append(layers[k].name)
        if consumers is None:
            continue
        # ncnn takes the consumer of the split's first output (blob.consumer: the last layer
        # listing it as a bottom; a blob has one consumer in an ncnn graph)
        first = [m for m in layers if split.tops[0] in m.bottoms][-1]
        if lay.name in q and first.name in q and first.type in CONV_TYPES:
            fused[lay.name] = (first.name, specs[first.name].input_scale, consumers)
    return fused


def write_int8(param: NcnnParam, bin_bytes: bytes, specs: dict[str, Int8Spec]) -> Int8Result:
    """The int8 .param text and .bin bytes (see the module docstring)."""
    layout = bin_layout(param, bin_bytes)
    out_param = copy.deepcopy(param)
    by_name = {lay.name: lay for lay in out_param.layers}
    for name, spec in specs.items():
        if name not in by_name:
            raise LayerError(spec.torch_name, f"layer '{spec.torch_name}': ncnn layer '{name}' is not in the model")
        lay = by_name[name]
        if lay.type not in INT8_TYPES:
            raise LayerError(spec.torch_name, f"layer '{spec.torch_name}': ncnn layer '{name}' is {lay.type}, not int8-capable")
        if lay.get_int(8, 0):
            raise LayerError(spec.torch_name, f"layer '{spec.torch_name}': ncnn layer '{name}' is already int8")
        n = lay.get_int(7, 1) if lay.type == "ConvolutionDepthWise" else lay.get_int(0, 0)
        if len(spec.weight_scales) != n:
            raise LayerError(
                spec.torch_name,
                f"layer '{spec.torch_name}': {len(spec.weight_scales)} weight scales for ncnn layer '{name}' "
                f"({lay.type}), which needs {n}",
            )
    fused = fuse_requantize(param, specs)
    for prod, (_, out_scale, consumers) in fused.items():
        for c in consumers:
            if np.float32(specs[c].input_scale) != np.float32(out_scale):
                raise LayerError(
                    specs[c].torch_name,
                    f"layer '{specs[c].torch_name}' (ncnn '{c}') reads the int8 output of '{prod}', requantized with "
                    f"scale {out_scale!r} (its first consumer's), but its own input scale is {specs[c].input_scale!r}: "
                    "ncnn would compute wrong values. Layers reading one tensor must share one input range",
                )
    terms: dict[str, int] = {}
    chunks: list[bytes] = []
    for lay in param.layers:
        entries = layout[lay.name]
        spec = specs.get(lay.name)
        if spec is None:
            for e in entries:
                vals = e.values(bin_bytes)
                if e.tagged and e.tag in (TAG_FP32, TAG_FP16):
                    chunks.append(tagged(TAG_FP16, _to_fp16(vals)))
                elif e.tagged:  # int8 payload stays as it is
                    chunks.append(bin_bytes[e.offset : e.offset + e.nbytes])
                else:
                    chunks.append(raw_f32(_flush_denormals(vals)))
            continue
        term = 1 if lay.type == "ConvolutionDepthWise" else 2
        if lay.name in fused:
            term += 100
        terms[lay.name] = term
        by_name[lay.name].set_int(8, term)
        for e in entries:
            vals = e.values(bin_bytes)
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
        if lay.name in fused:
            chunks.append(raw_f32(np.asarray([fused[lay.name][1]], dtype=np.float32)))
    return Int8Result(
        out_param.to_text(),
        b"".join(chunks),
        terms,
        {p: (c, s) for p, (c, s, _) in fused.items()},
    )
