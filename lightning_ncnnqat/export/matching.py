"""Find each quantized torch layer in a converted graph by its weights, whatever it became.

Converters rename and reorder layers (pnnx: ``convrelu_0``, ``conv_7`` before ``conv_8`` for
branches in the other order), and change their types: pnnx turns a 1x1 ``Conv2d`` on a 1x1 map
(squeeze-excitation, a conv head after global pooling) into an ``InnerProduct``, and a ``Linear``
on a 3-D/4-D tensor into a ``Gemm``. The folded float weights pass through unchanged (pnnx with
``fp16=0``, the ONNX exporter), so a layer is found by equal weights in the same flat order,
whatever its converted type (a layer of the torch kind is preferred when several match).
Identical weights in two layers (rare: e.g. a copied block) are resolved by an optional
tie-breaker; a layer found nowhere, or twice, is an error naming it: the converter changed its
weights (fused another op into it) and the table would not describe the model.

What a matched layer becomes in ncnn2int8 depends on its converted type
(:func:`converted_int8_kind`): the table rows apply to Convolution / ConvolutionDepthWise /
InnerProduct; a Gemm is quantized by ncnn2int8 with its own scales, whatever the table says.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import LayerError

#: ncnn types a table row quantizes (ncnn2int8's quantize_convolution/-depthwise/innerproduct).
TABLE_INT8_TYPES = ("Convolution", "ConvolutionDepthWise", "InnerProduct")


@dataclass
class WeightOwner:
    """A converted layer holding a weight: its name, ncnn type, flat float32 weight, bias.

    ``weight`` is in torch order (``[out, in, kh, kw]`` / ``[out, in]`` flattened), ``index``
    the layer's position in the .param (names can repeat), -1 when unknown.
    """

    name: str
    kind: str
    weight: np.ndarray
    bias: np.ndarray | None
    index: int = -1


def converted_int8_kind(kind: str) -> str:
    """How ncnn2int8 treats a layer of converted type ``kind``.

    "table": quantized from its table rows (Convolution, ConvolutionDepthWise, InnerProduct);
    "gemm": quantized by ncnn2int8 itself, without rows (one scale for a constant B);
    "float": kept in float.
    """
    if kind in TABLE_INT8_TYPES:
        return "table"
    return "gemm" if kind == "Gemm" else "float"


def ncnn_weight_owners(param, data: bytes) -> list[WeightOwner]:
    """Candidates for matching in an ncnn model (``NcnnParam`` + .bin bytes): every
    Convolution / ConvolutionDepthWise / InnerProduct with its weight and bias, and every Gemm
    with a constant B (as ``[N, K]``, the torch Linear order) and its per-N constant C."""
    from .ncnn_bin_layout import locate

    layout = locate(param.layers, data)
    owners = []
    for i, (lay, entries) in enumerate(zip(param.layers, layout)):
        es = {e.role: e for e in entries}
        if lay.type in TABLE_INT8_TYPES and "weight" in es:
            bias = es["bias"].values(data) if "bias" in es else None
            owners.append(WeightOwner(lay.name, lay.type, es["weight"].values(data), bias, i))
        elif lay.type == "Gemm" and "B" in es and not lay.get_int(18, 0):
            n, k = lay.get_int(8, 0), lay.get_int(9, 0)
            b = es["B"].values(data)
            if lay.get_int(3, 0) == 0:
                b = b.reshape(k, n).T
            c = es["C"].values(data) if "C" in es and lay.get_int(10, 0) == 4 else None
            owners.append(WeightOwner(lay.name, "Gemm", np.ascontiguousarray(b).ravel(), c, i))
    return owners


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    if np.array_equal(a, b):
        return True
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    return bool(np.allclose(a, b, rtol=1e-6, atol=1e-6 * max(scale, 1e-30)))


def _owner_key(o: WeightOwner) -> str:
    return f"{o.name}#{o.index}"


def match_owners(
    infos: Sequence,
    owners: Sequence[WeightOwner],
    where: str,
    tiebreak: Callable[[str, list[str]], str | None] | None = None,
) -> dict[str, WeightOwner]:
    """torch layer name -> the converted layer holding its weights (any type; see the module doc).

    ``infos``: objects with ``name``, ``kind``, ``weight`` and ``bias`` (torch tensors).
    ``tiebreak(torch_name, candidate names)`` picks among layers with identical weights.
    Raises LayerError naming the torch layer when it is found nowhere or cannot be told apart.
    """
    by_key = {_owner_key(o): o for o in owners}
    cands: dict[str, list[str]] = {}
    for info in infos:
        w = info.weight.detach().cpu().float().numpy().ravel()
        b = None if info.bias is None else info.bias.detach().cpu().float().numpy().ravel()
        hits = [o for o in owners if _same(o.weight, w)]
        if len(hits) > 1:
            hits = [o for o in hits if o.kind == info.kind] or hits
        if len(hits) > 1 and b is not None:
            hits = [o for o in hits if o.bias is not None and _same(o.bias, b)] or hits
        if not hits:
            raise LayerError(
                info.name,
                f"layer '{info.name}' ({info.kind}, weight {tuple(info.weight.shape)}) has no layer with its "
                f"weights in the {where} (layers with weights: {[o.name for o in owners] or 'none'}); the "
                "converter changed its weights (fused another op into it?)",
            )
        cands[info.name] = [_owner_key(o) for o in hits]
    result: dict[str, str] = {}
    changed = True
    while changed:
        changed = False
        for name, c in cands.items():
            if name in result:
                continue
            free = [o for o in c if o not in result.values()]
            if len(free) == 1:
                result[name] = free[0]
                changed = True
    for name, c in cands.items():
        if name in result:
            continue
        free = [o for o in c if o not in result.values()]
        names = [by_key[o].name for o in free]
        pick = tiebreak(name, names) if (tiebreak and free) else None
        if pick is None or pick not in names:
            shown = names or [by_key[o].name for o in c]
            raise LayerError(
                name,
                f"layer '{name}' cannot be told apart in the {where}: layers {shown} hold the same weights",
            )
        result[name] = free[names.index(pick)]
    inverse: dict[str, str] = {}
    for t, o in result.items():
        if o in inverse:
            raise LayerError(t, f"layers '{inverse[o]}' and '{t}' both match '{by_key[o].name}' in the {where}")
        inverse[o] = t
    return {t: by_key[o] for t, o in result.items()}


def match_by_weights(
    infos: Sequence,
    owners: Sequence[WeightOwner],
    where: str,
    tiebreak: Callable[[str, list[str]], str | None] | None = None,
) -> dict[str, str]:
    """torch layer name -> converted layer name (:func:`match_owners`, names only)."""
    return {t: o.name for t, o in match_owners(infos, owners, where, tiebreak).items()}
