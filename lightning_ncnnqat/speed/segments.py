"""Int8 chains of an exported int8 model, cut out and timed as units (issue 20).

Why units and not single layers: ncnn requantizes from an int8 Convolution/ConvolutionDepthWise
straight into the next int8 conv (``int8_scale_term`` + 100, written by ncnn2int8's
``NetQuantize::fuse_requantize``, ``tools/quantize/ncnn2int8.cpp``; the same rule in
:func:`lightning_ncnnqat.ncnn.int8_writer.fuse_by_index`: the conv's output read directly by an
int8 conv, or through a Split whose every output is read by one). Inside such a chain a layer
pays neither the quantize of its input nor the dequantize of its output; a layer timed alone pays
both, so timing layers alone leans to float for chained layers (benchncnn's MobileNet v1 gains
in int8 with all 13 depthwise layers inside chains). A *unit* is a connected set of int8 layers
under those fused edges (with the Splits between them): it takes float in and gives float out
as a whole, so units are independent of each other, and keeping a whole unit float changes no
other unit's chain. Timing each unit int8 against float is the price of that unit in the model.

:func:`chain_units` finds the units of an int8 ``.param``; :func:`unit_model` cuts one out
(fed by ``Input`` layers of the shapes ncnn gives its inputs); :func:`time_units` times many
units, int8 against the same layers of the float model, in one interleaved child process.
Torch-free (ncnn files and the timing child only).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lightning_ncnnqat.ncnn.bin_layout import locate
from lightning_ncnnqat.ncnn.param import CONV_TYPES, INT8_TYPES, NcnnLayer, NcnnParam
from lightning_ncnnqat.ncnn.timing import ModelToTime, Timing, blob_shapes, time_models

__all__ = ["DYNAMIC_INT8_TYPES", "ChainUnit", "chain_units", "unit_model", "UnitToTime", "time_units", "time_side_by_side"]


@dataclass(frozen=True)
class ChainUnit:
    """Int8 layers (ncnn names, .param order) that ncnn chains through requantize, and the Split
    layers between them: float in, float out as a whole."""

    int8: tuple[str, ...]
    splits: tuple[str, ...] = ()

    @property
    def layers(self) -> tuple[str, ...]:
        return self.int8 + self.splits


#: Layers the export writes int8 with activations quantized at run time (``int8_scale_term``,
#: param 18, as ncnn's gemm.cpp / multiheadattention.cpp / sdpa.cpp read it): float in, float out,
#: never in a requantize chain, so each is a unit of its own, except SDPA: the export tells ncnn's
#: SDPA layers apart by order only, so a model's SDPA layers are int8 all together or not at all
#: (``qat/attention_plan.py``) and are one unit.
DYNAMIC_INT8_TYPES = ("Gemm", "MultiHeadAttention", "SDPA")


def _is_int8(lay: NcnnLayer) -> bool:
    if lay.type in DYNAMIC_INT8_TYPES:
        return lay.get_int(18, 0) > 0
    return lay.type in INT8_TYPES and lay.get_int(8, 0) > 0


def _fused_readers(param: NcnnParam, lay: NcnnLayer) -> tuple[list[NcnnLayer], list[NcnnLayer]]:
    """The int8 convs an int8 conv with a fused requantize hands its output to, and the Splits
    in between (empty when its output is dequantized)."""
    if lay.type not in CONV_TYPES or lay.get_int(8, 0) <= 100:
        return [], []
    readers, splits = [], []
    for r in param.consumers(lay.tops[0]):
        if r.type == "Split":
            splits.append(r)
            for t in r.tops:
                readers += param.consumers(t)
        else:
            readers.append(r)
    return [r for r in readers if _is_int8(r)], splits


def chain_units(param: NcnnParam) -> list[ChainUnit]:
    """The int8 layers of an int8 ``param`` grouped into units: connected under the fused
    requantize edges (module docstring); a layer whose input and output are float is a unit of
    its own; the SDPA layers are one unit (:data:`DYNAMIC_INT8_TYPES`). In .param order of each
    unit's first layer."""
    int8 = [lay for lay in param.layers if _is_int8(lay)]
    parent = {lay.name: lay.name for lay in int8}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    sdpa = [lay.name for lay in int8 if lay.type == "SDPA"]
    for n in sdpa[1:]:  # one unit: all int8 or all float (DYNAMIC_INT8_TYPES)
        parent[root(n)] = root(sdpa[0])
    splits_of: dict[str, list[str]] = {}
    for lay in int8:
        readers, splits = _fused_readers(param, lay)
        for r in readers:
            parent[root(r.name)] = root(lay.name)
        if readers:
            splits_of.setdefault(lay.name, []).extend(s.name for s in splits)
    groups: dict[str, list[str]] = {}
    for lay in int8:
        groups.setdefault(root(lay.name), []).append(lay.name)
    units = []
    for names in groups.values():
        splits = tuple(s for n in names for s in splits_of.get(n, []))
        units.append(ChainUnit(tuple(names), splits))
    order = {lay.name: i for i, lay in enumerate(param.layers)}
    return sorted(units, key=lambda u: order[u.int8[0]])


def unit_model(param: NcnnParam, bin_bytes: bytes, names: Sequence[str], shapes: Mapping[str, list[int]]
               ) -> tuple[str, bytes, dict[str, list[int]], list[str]]:
    """The layers ``names`` of ``param`` (with their weights from ``bin_bytes``) as a model of
    their own: ``(param text, bin bytes, inputs {blob: shape}, outputs)``. Blobs read but not
    made inside are fed by ``Input`` layers of ``shapes`` (ncnn's [c, h, w]); blobs made but not
    read inside are the outputs. The layers keep their params (a fused requantize inside a unit
    stays fused: its readers are inside). Raises KeyError naming a layer not in ``param``."""
    idx = sorted(param.index(n) for n in names)
    layout = locate(param.layers, bin_bytes)
    made = {t for i in idx for t in param.layers[i].tops}
    read = [b for i in idx for b in param.layers[i].bottoms]
    ins = list(dict.fromkeys(b for b in read if b not in made))
    outs = [t for i in idx for t in param.layers[i].tops if t not in set(read)]
    inputs = [NcnnLayer("Input", f"in_{b}", [], [b], [(str(k), str(v)) for k, v in enumerate(list(shapes[b])[::-1])])
              for b in ins]
    layers = [NcnnLayer(param.layers[i].type, param.layers[i].name, list(param.layers[i].bottoms),
                        list(param.layers[i].tops), list(param.layers[i].params)) for i in idx]
    data = b"".join(bin_bytes[e.offset:e.offset + e.nbytes] for i in idx for e in layout[i])
    return NcnnParam(inputs + layers).to_text(), data, {b: list(shapes[b]) for b in ins}, outs


def time_side_by_side(models: Sequence[ModelToTime], runs: int, warmup: int = 3) -> dict[str, Timing]:
    """:func:`ncnn.timing.time_models` (which puts every timed run right after another model's
    run, however many models: see its comment on the round order)."""
    return time_models(models, runs=runs, warmup=warmup)


@dataclass(frozen=True)
class UnitToTime:
    """One unit to time: ``key`` names it; its int8 form is cut from ``int8_param``/``int8_bin``
    (the all-int8 model, or a variant with other layers float), its float form from the float
    model."""

    key: str
    unit: ChainUnit
    int8_param: NcnnParam
    int8_bin: bytes


def time_units(
    float_param: NcnnParam, float_bin: bytes, float_model: ModelToTime, units: Sequence[UnitToTime],
    threads: int = 1, runs: int = 30, warmup: int = 3,
) -> dict[str, tuple[Timing, Timing]]:
    """Time every unit int8 against its float twin, all in ONE interleaved child process;
    ``key -> (int8 timing, float timing)``. ``float_model``: the whole float model (its input
    shapes give every inner blob's shape, from ncnn itself). Raises NcnnRuntimeError when the
    child fails."""
    if not units:
        return {}
    blobs: set[str] = set()
    for u in units:
        p = u.int8_param
        made = {t for n in u.unit.layers for t in p.layers[p.index(n)].tops}
        blobs |= {b for n in u.unit.layers for b in p.layers[p.index(n)].bottoms if b not in made}
    need = sorted(b for b in blobs if b not in float_model.inputs)
    shapes = {**float_model.inputs, **(blob_shapes(float_model, need) if need else {})}
    models: list[ModelToTime] = []
    with tempfile.TemporaryDirectory(prefix="ncnnqat_units_") as tmp:
        for k, u in enumerate(units):
            for tag, param, data in (("int8", u.int8_param, u.int8_bin), ("float", float_param, float_bin)):
                text, blob, ins, outs = unit_model(param, data, u.unit.layers, shapes)
                p, b = Path(tmp) / f"{k}_{tag}.param", Path(tmp) / f"{k}_{tag}.bin"
                p.write_text(text, encoding="utf-8")
                b.write_bytes(blob)
                models.append(ModelToTime(f"{k}:{tag}", str(p), str(b), ins, outs, {"num_threads": int(threads)}))
        t = time_side_by_side(models, runs=runs, warmup=warmup)
    return {u.key: (t[f"{k}:int8"], t[f"{k}:float"]) for k, u in enumerate(units)}
