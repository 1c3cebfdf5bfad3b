"""Find each quantized torch layer in a converted graph by its weights, whatever it became.

Converters rename and reorder layers (pnnx: ``convrelu_0``, ``conv_7`` before ``conv_8`` for
branches in the other order), and change their types: pnnx turns a 1x1 ``Conv2d`` on a 1x1 map
(squeeze-excitation, a conv head after global pooling) into an ``InnerProduct``, and a ``Linear``
on a 3-D/4-D tensor into a ``Gemm``. The folded float weights pass through unchanged (pnnx with
``fp16=0``, the ONNX exporter), so a layer is found by equal weights in the same flat order,
whatever its converted type (a layer of the torch kind is preferred when several match).
Identical weights in several layers (a freshly initialised network: zero-initialised residual
branches, a deep-copied head, tied weights) are told apart first by their biases (tied heads share
one weight Parameter, often one initializer in ONNX, but keep their own biases, and may sit alike
in the graph: fed by one layer, feeding one output), then by their place in the graph when both
graphs are given (:mod:`.graph_match`); layers that read the same tensor with the same weights and
rows are paired in graph order with a note. A layer found nowhere, or that cannot be told apart,
is an error naming it: the converter changed its weights (fused another op into it) and the table
would not describe the model.

What a matched layer becomes in ncnn2int8 depends on its converted type
(:func:`converted_int8_kind`): the table rows apply to Convolution / ConvolutionDepthWise /
InnerProduct; a Gemm is quantized by ncnn2int8 with its own scales, whatever the table says.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lightning_ncnnqat.errors import LayerError
from lightning_ncnnqat.ncnn.bin_layout import locate
from lightning_ncnnqat.conversion.graph_match import Wiring, interchangeable, neighbours, resolve_by_place, same_rows

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


def _weight_candidates(infos: Sequence, owners: Sequence[WeightOwner], where: str) -> dict[str, list[str]]:
    """torch layer name -> keys of the owners holding its weights (its kind / bias preferred)."""
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
    return cands


def _propagate(cands: dict[str, list[str]], result: dict[str, str]) -> None:
    """Match every layer left with exactly one free candidate, until none is (in place)."""
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


def _place(name: str, w: Wiring | None, weighted: set[str]) -> str:
    """Where torch layer ``name`` sits, for an error: its weighted neighbours."""
    if w is None:
        return ""
    preds, succs = neighbours(w, weighted)
    if name not in preds:
        return ""
    return f" (fed by {sorted(preds[name])}, feeding {sorted(succs[name])})"


def match_owners(
    infos: Sequence,
    owners: Sequence[WeightOwner],
    where: str,
    tiebreak: Callable[[str, list[str]], str | None] | None = None,
    graphs: tuple[Wiring, Wiring] | None = None,
    notes: list[str] | None = None,
) -> dict[str, WeightOwner]:
    """torch layer name -> the converted layer holding its weights (any type; see the module doc).

    ``infos``: objects with ``name``, ``kind``, ``weight`` and ``bias`` (torch tensors; the row
    attributes of :data:`.graph_match.ROW_ATTRS` where they have them).
    ``graphs``: (torch wiring keyed by ``infos`` names, converted wiring keyed ``name#index`` as
    the owners): layers with identical weights are told apart by their place in the graph.
    ``tiebreak(torch_name, candidate names)`` picks among layers still alike.
    ``notes``: receives a line for each group of interchangeable layers paired in graph order.
    Raises LayerError naming the torch layer when it is found nowhere or cannot be told apart.
    """
    by_key = {_owner_key(o): o for o in owners}
    cands = _weight_candidates(infos, owners, where)
    result: dict[str, str] = {}
    shared: dict[str, list[str]] = {}  # owner key -> torch layers a converter computes once
    _propagate(cands, result)
    if graphs is not None and len(result) < len(cands):
        resolve_by_place(cands, result, *graphs)
        _propagate(cands, result)
        _pair_interchangeable(infos, cands, result, graphs, by_key, where, notes)
        shared = _share_merged(infos, cands, result, graphs, by_key, where, notes)
    for name, c in cands.items():
        if name in result:
            continue
        free = [o for o in c if o not in result.values()]
        names = [by_key[o].name for o in free]
        pick = tiebreak(name, names) if (tiebreak and free) else None
        if pick is None or pick not in names:
            shown = names or [by_key[o].name for o in c]
            alike = sorted(n for n, o in cands.items() if n not in result and set(o) & set(c))
            place = _place(name, graphs[0] if graphs else None, set(cands))
            raise LayerError(
                name,
                f"layer '{name}' cannot be told apart in the {where}: layers {shown} hold the same weights"
                + (f" as torch layers {alike}" if len(alike) > 1 else "")
                + (f" and sit alike in the graph{place}" if graphs else "")
                + "; train a step first (layers sharing one weight and bias Parameter stay alike: tied "
                "weights with one bias), or keep one of them in float (QATConfig(skip=...))",
            )
        result[name] = free[names.index(pick)]
    inverse: dict[str, str] = {}
    for t, o in result.items():
        if o in inverse and t not in shared.get(o, ()):
            raise LayerError(t, f"layers '{inverse[o]}' and '{t}' both match '{by_key[o].name}' in the {where}")
        inverse.setdefault(o, t)
    return {t: by_key[o] for t, o in result.items()}


def _share_merged(
    infos: Sequence, cands: dict[str, list[str]], result: dict[str, str], graphs: tuple[Wiring, Wiring],
    by_key: dict[str, WeightOwner], where: str, notes: list[str] | None,
) -> dict[str, list[str]]:
    """Converters compute identical work once (pnnx and onnxsim merge a deep-copied head reading the
    same tensor into one): an unmatched torch layer whose candidates are all matched shares the one
    whose torch layer has the same rows (:data:`.graph_match.ROW_ATTRS`) and whose place fits its own
    (its matched neighbours are the converted layer's). Extends ``result`` in place; returns
    ``{owner key: torch layers sharing it}``."""
    by_name = {i.name: i for i in infos}
    tp, ts = neighbours(graphs[0], set(cands))
    gp, gs = neighbours(graphs[1], {k for c in cands.values() for k in c})
    shared: dict[str, list[str]] = {}
    changed = True
    while changed:
        changed = False
        fwd = {**{f"in:{i}": f"in:{i}" for i in range(len(graphs[0].inputs))},
               **{f"out:{j}": f"out:{j}" for j in range(len(graphs[0].outputs))}, **result}
        owner_of = {}
        for t, o in result.items():
            owner_of.setdefault(o, t)
        for name, c in cands.items():
            if name in result or name not in tp or any(o not in owner_of for o in c):
                continue
            fits = [o for o in c if o in gp and same_rows(by_name[owner_of[o]], by_name[name])
                    and all(fwd[p] in gp[o] for p in tp[name] if p in fwd) and all(fwd[q] in gs[o] for q in ts[name] if q in fwd)]
            if len(fits) == 1:
                result[name] = fits[0]
                shared.setdefault(fits[0], [owner_of[fits[0]]]).append(name)
                changed = True
    if notes is not None:
        for o, ts_ in shared.items():
            notes.append(
                f"layers {ts_} hold identical weights and rows, and the {where} computes them once, as "
                f"'{by_key[o].name}': its table rows serve all of them"
            )
    return shared


def _pair_interchangeable(
    infos: Sequence, cands: dict[str, list[str]], result: dict[str, str], graphs: tuple[Wiring, Wiring],
    by_key: dict[str, WeightOwner], where: str, notes: list[str] | None,
) -> None:
    """Pair, in graph order, groups of unmatched layers that share their free candidates and are
    :func:`.graph_match.interchangeable` (in place), with a note for each group."""
    by_name = {i.name: i for i in infos}
    done: set[str] = set()
    for name in list(cands):
        if name in result or name in done:
            continue
        free = frozenset(o for o in cands[name] if o not in result.values())
        group = [n for n in cands if n not in result and frozenset(o for o in cands[n] if o not in result.values()) == free]
        done.update(group)
        if len(group) != len(free):
            continue
        pairs = interchangeable([by_name[n] for n in group], sorted(free), *graphs)
        if pairs is None:
            continue
        result.update(dict(pairs))
        if notes is not None:
            notes.append(
                f"layers {[t for t, _ in pairs]} hold identical weights and read the same tensor, so they compute the "
                f"same values and get the same table rows; paired in graph order with {[by_key[k].name for _, k in pairs]} "
                f"in the {where}"
            )


def match_by_weights(
    infos: Sequence,
    owners: Sequence[WeightOwner],
    where: str,
    tiebreak: Callable[[str, list[str]], str | None] | None = None,
    graphs: tuple[Wiring, Wiring] | None = None,
    notes: list[str] | None = None,
) -> dict[str, str]:
    """torch layer name -> converted layer name (:func:`match_owners`, names only)."""
    return {t: o.name for t, o in match_owners(infos, owners, where, tiebreak, graphs, notes).items()}
