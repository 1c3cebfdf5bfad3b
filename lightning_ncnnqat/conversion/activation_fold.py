"""Fold activation layers the converter left separate into the layer before them.

Why: ncnn2int8 hands an int8 conv's output on as int8 (requantize, ``int8_scale_term`` + 100)
only when the NEXT layer reading it is an int8 conv (``tools/quantize/ncnn2int8.cpp``,
``NetQuantize::fuse_requantize``); an activation LAYER in between breaks that chain, and the
conv dequantizes to float only for the next conv to quantize again. ncnn's Convolution,
ConvolutionDepthWise and InnerProduct apply a fused activation themselves (param 9
``activation_type``, param 10 ``activation_params``; ``src/layer/fused_activation.h``): 1 ReLU,
2 LeakyReLU (slope), 3 Clip (min, max), 4 Sigmoid, 5 Mish, 6 HardSwish (alpha, beta). The int8
requantize applies all six before it rounds (``requantize_from_int32_to_int8`` in
``src/layer/x86/convolution_x86.cpp`` / ``arm/convolution_arm.cpp`` and the depthwise forms,
``activation_ss/sse/avx/avx512`` of ``x86/x86_activation.h``, ``activation_ps`` of
``arm/arm_activation.h``; read at Tencent/ncnn a4d2ea1d4).

pnnx folds ReLU / LeakyReLU, Clip, Sigmoid and Mish (``tools/pnnx/src/pass_ncnn/
fuse_convolution_activation.cpp`` and the depthwise / innerproduct passes) but not HardSwish,
which ncnn's legacy ``ncnnoptimize`` does fold. This module does what those passes do on the
converted float model, for every type ncnn fuses, wherever the converter left one separate:
the activation must be the ONLY reader of the layer's output, that output must not be a model
output, and the layer must have no fused activation yet. The ``.bin`` is unchanged (these
activation layers hold no weights). The float model then computes the same function (the
fused activation is the same formula; ``verification.layer_checks.ncnn_activation`` models it),
and the int8 writer (``ncnn.int8_writer``) and ncnn2int8 alike requantize through it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from lightning_ncnnqat.conversion.pnnx import PnnxResult
from lightning_ncnnqat.ncnn.param import NcnnLayer, NcnnParam

#: ncnn layers that apply a fused activation AND run in int8 (the int8 writer's layer types).
FUSING_TYPES = ("Convolution", "ConvolutionDepthWise", "InnerProduct")

#: ncnn activation layer type -> its ``activation_type`` (ReLU with a slope becomes 2).
ACTIVATION_TYPES = {"ReLU": 1, "Clip": 3, "Sigmoid": 4, "Mish": 5, "HardSwish": 6}

# ncnn's defaults of the activation layers' params (src/layer/relu.cpp, clip.cpp, hardswish.cpp)
_DEFAULTS = {"ReLU": ("0.0",), "Clip": ("-3.40282347e+38", "3.40282347e+38"), "HardSwish": ("0.2", "0.5")}


@dataclass(frozen=True)
class Fold:
    """One activation layer folded into the layer before it."""

    activation: str  # the removed ncnn layer's name
    kind: str  # its ncnn type (HardSwish, ReLU, ...)
    into: str  # the ncnn layer that now applies it
    into_type: str  # Convolution / ConvolutionDepthWise / InnerProduct
    activation_type: int  # param 9 written


def _float_text(lay: NcnnLayer, pid: int, default: str) -> str:
    """Param ``pid`` of ``lay`` as a float token ncnn's ParamDict reads as a float array element
    (it must hold '.' or 'e' and fit in 15 characters, ``src/paramdict.cpp``)."""
    hit = [v for k, v in lay.params if k == str(pid)]
    text = hit[0] if hit else default
    if ("." in text or "e" in text.lower()) and len(text) <= 15:
        return text
    return f"{float(np.float32(float(text))):.8e}"


def _fused_form(lay: NcnnLayer) -> tuple[int, list[str]] | None:
    """``(activation_type, activation_params as float tokens)`` of an activation layer; None for a
    type ncnn cannot fuse (Swish, GELU, ELU, HardSigmoid, PReLU...)."""
    t = ACTIVATION_TYPES.get(lay.type)
    if t is None:
        return None
    if lay.type == "ReLU":
        slope = _float_text(lay, 0, "0.0")
        return (1, []) if float(slope) == 0.0 else (2, [slope])
    if lay.type in ("Clip", "HardSwish"):
        return t, [_float_text(lay, i, d) for i, d in enumerate(_DEFAULTS[lay.type])]
    return t, []


def fold_activations(param: NcnnParam, keep_blobs: tuple[str, ...] | list[str] = ()) -> list[Fold]:
    """Fold, in place, every activation layer ncnn can fuse into the Convolution /
    ConvolutionDepthWise / InnerProduct whose output it alone reads (see the module doc);
    ``keep_blobs`` (the model's output blobs) are never folded away. Returns what was folded,
    in layer order. The .bin needs no change."""
    readers: dict[str, int] = {}
    producer: dict[str, NcnnLayer] = {}
    for lay in param.layers:
        for b in lay.bottoms:
            readers[b] = readers.get(b, 0) + 1
        for t in lay.tops:
            producer[t] = lay
    folds: list[Fold] = []
    removed: set[int] = set()
    for act in param.layers:
        form = _fused_form(act)
        if form is None or len(act.bottoms) != 1 or len(act.tops) != 1:
            continue
        blob = act.bottoms[0]
        prod = producer.get(blob)
        if (prod is None or prod.type not in FUSING_TYPES or len(prod.tops) != 1 or readers.get(blob) != 1
                or blob in keep_blobs or prod.get_int(9, 0) != 0):
            continue
        t, values = form
        prod.params = [(k, v) for k, v in prod.params if k not in ("9", "10", "-23310")]
        prod.params.append(("9", str(t)))
        if values:
            prod.params.append(("-23310", ",".join([str(len(values)), *values])))
        prod.tops = list(act.tops)
        producer[act.tops[0]] = prod
        removed.add(id(act))
        folds.append(Fold(act.name, act.type, prod.name, prod.type, t))
    param.layers = [lay for lay in param.layers if id(lay) not in removed]
    return folds


def fold_converted(converted: PnnxResult, keep_blobs: tuple[str, ...] | list[str], notes: list[str]) -> PnnxResult:
    """The converter's float model with :func:`fold_activations` applied (the same object when
    nothing folds); a note saying what was folded is appended to ``notes`` (the report's)."""
    param = NcnnParam.parse(converted.param_text)
    folds = fold_activations(param, keep_blobs)
    if not folds:
        return converted
    kinds: dict[str, int] = {}
    for f in folds:
        kinds[f.kind] = kinds.get(f.kind, 0) + 1
    notes.append(
        f"folded {len(folds)} activation layer(s) ({', '.join(f'{k} x{n}' for k, n in sorted(kinds.items()))}) into the "
        "Convolution/InnerProduct before them (ncnn activation_type; pnnx leaves them separate): the int8 model "
        "requantizes through them"
    )
    return dataclasses.replace(converted, param_text=param.to_text())
