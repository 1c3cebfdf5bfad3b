"""The QAT start's timings of chain units and its split of whole-model rounds (issue 20).

:func:`time_chains` times every int8 chain of an export whole (``speed.segments``), int8 against
float, and, for a chain holding layers of :data:`policy.SPEED_SPLIT_KINDS` among others, the pieces
it breaks into with those layers float (cut from an int8 model written that way by
``speed.variants``, so a piece's ends pay the quantize/dequantize they would pay). Torch names
come from the export's layer table. :func:`split_rounds` splits an interleaved timing's rounds
in two halves: one chooses, the other is reported (an unbiased figure for the chosen plan).
"""

from __future__ import annotations

from pathlib import Path

from lightning_ncnnqat.ncnn.fp32_blobs import featmask, mask_fp32_blobs
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.ncnn.timing import ModelToTime, Timing, paired_speedup
from lightning_ncnnqat.policy import speed as policy
from lightning_ncnnqat.speed.candidates import UnitSpeed
from lightning_ncnnqat.speed.segments import ChainUnit, UnitToTime, chain_units, time_units
from lightning_ncnnqat.speed.variants import write_variant

__all__ = ["time_chains", "split_rounds"]


def _low(t: Timing, clock: str) -> float | None:
    return t.cpu_min_ms if clock == "cpu" else t.min_ms


def time_chains(d: Path, fp: ModelToTime, torch_of: dict[str, str], threads: int, clock: str,
                 float_weights: str) -> list[UnitSpeed]:
    """Every int8 chain of export ``d`` timed whole, int8 against float (its layers as they run in
    the int8 model when kept float: with its feature masks); a chain holding layers of
    :data:`policy.SPEED_SPLIT_KINDS` among others also in its pieces with those layers float."""
    qparam = NcnnParam.parse((d / "model.int8.param").read_text(encoding="utf-8"))
    ftext = (d / "model.ncnn.param").read_text(encoding="utf-8")
    if any(featmask(lay) for lay in qparam.layers):
        # a unit kept float runs in the int8 model with the export's feature mask (float32 blobs;
        # on x86 that also keeps a float InnerProduct's weights float32 instead of F16C's fp16: a
        # 1024->1000 classifier ran 1.5x slower so): its float form is timed as it will run there
        ftext = mask_fp32_blobs(ftext)[0]
    fparam = NcnnParam.parse(ftext)
    fbin, qbin = (d / "model.ncnn.bin").read_bytes(), (d / "model.int8.bin").read_bytes()
    kind = {lay.name: lay.type for lay in qparam.layers}
    segs = chain_units(qparam)
    todo = [UnitToTime(f"s{i}", u, qparam, qbin) for i, u in enumerate(segs)]
    split = {i for i, u in enumerate(segs) if 0 < sum(kind[n] in policy.SPEED_SPLIT_KINDS for n in u.int8) < len(u.int8)}
    pieces_of: dict[int, list[tuple[str, ChainUnit]]] = {}
    if split:
        names = {n for i in split for n in segs[i].int8 if kind[n] in policy.SPEED_SPLIT_KINDS}
        text, vbin = write_variant(d, names, float_weights)
        vparam = NcnnParam.parse(text)
        seg_of = {n: i for i, u in enumerate(segs) for n in u.int8}
        for j, p in enumerate(chain_units(vparam)):
            i = seg_of.get(p.int8[0], -1)
            if i in split:
                todo.append(UnitToTime(f"p{j}", p, vparam, vbin))
                pieces_of.setdefault(i, []).append((f"p{j}", p))
    timed = time_units(fparam, fbin, fp, todo, threads, policy.SPEED_LAYER_RUNS)

    def speed(key: str, u: ChainUnit) -> UnitSpeed:
        q, f = timed[key]
        return UnitSpeed(tuple(torch_of.get(n, n) for n in u.int8), tuple(kind[n] for n in u.int8),
                         q.ms(clock), f.ms(clock), _low(q, clock), _low(f, clock), paired=paired_speedup(f, q, clock))

    units = []
    for i, u in enumerate(segs):
        us = speed(f"s{i}", u)
        us.pieces = [speed(k, p) for k, p in pieces_of.get(i, [])]
        units.append(us)
    return units


def split_rounds(t: Timing) -> tuple[Timing, Timing]:
    """The rounds of ``t`` in two halves, by pairs of rounds (each pair runs the models in both
    orders, A B then B A): rounds 0, 1, 4, 5, ... and 2, 3, 6, 7, ..."""
    wall, cpu = t.wall_runs or [], t.cpu_runs or []

    def pick(xs: list[float], h: int) -> list[float]:
        return [x for r, x in enumerate(xs) if (r // 2) % 2 == h]

    return Timing.of(pick(wall, 0), pick(cpu, 0) or None), Timing.of(pick(wall, 1), pick(cpu, 1) or None)
