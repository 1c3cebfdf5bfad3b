"""Tell apart layers with identical weights by their place in the graph.

Weight matching (:mod:`.matching`) finds each torch layer's converted layer by equal weights.
Freshly initialised networks hold layers with EQUAL weights: timm's ResNets zero the last
BatchNorm's gamma of every block (after the fold every block's last conv is all zeros), a head
deep-copied from another (YOLOv10's one-to-one heads), tied weights. Those are told apart by where
they sit: which weighted layers (or model inputs ``in:i``) feed them and which weighted layers (or
model outputs ``out:j``) they feed, through any number of weightless ops. Both graphs are reduced
to that skeleton: the torch graph from one traced call (:func:`torch_wiring`, ``graph.py``'s
DataFlow), the converted one from its layers' blobs (:func:`ncnn_wiring`, or ONNX nodes' values).
A candidate stays only if the layers already matched around it sit around it on both sides
(:func:`resolve_by_place`); a match found so lets its neighbours be found in turn.

Layers still alike after that read the same tensor with the same weights: they compute the same
values and get the same table rows, so they are paired in graph order and a note says so
(:func:`interchangeable`); anything else is an error naming the layers, never a guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from lightning_ncnnqat.qat.graph import trace_call
from lightning_ncnnqat.conversion.model_io import FlatModel, ModelIO

#: torch ops that hand their input on unchanged (their output is read as the same tensor).
_TORCH_ALIASES = ("detach", "contiguous", "clone")


@dataclass
class Wiring:
    """A graph as a list of nodes in topological order: ``(key, input values, output values)``.

    ``inputs`` / ``outputs``: the graph's input and output values in blob order (``in0..``,
    ``out0..``); ``aliases``: values that are another value unchanged (ncnn Split tops, a torch
    ``detach``), mapped to their source.
    """

    nodes: list[tuple[str, list[str], list[str]]]
    inputs: list[str]
    outputs: list[str]
    aliases: dict[str, str] = field(default_factory=dict)

    def source(self, value: str) -> str:
        """``value`` through its aliases (the tensor it is, unchanged)."""
        while value in self.aliases:
            value = self.aliases[value]
        return value

    def reads(self) -> dict[str, tuple[str, ...]]:
        """node key -> the (alias-resolved) values it reads."""
        return {k: tuple(self.source(v) for v in ins) for k, ins, _ in self.nodes}

    def inputs_of(self, key: str) -> list[str]:
        """The values node ``key`` reads (empty when there is no such node)."""
        return next((list(ins) for k, ins, _ in self.nodes if k == key), [])

    def order(self) -> dict[str, int]:
        return {k: i for i, (k, _, _) in enumerate(self.nodes)}


def neighbours(w: Wiring, weighted: set[str]) -> tuple[dict[str, frozenset[str]], dict[str, frozenset[str]]]:
    """For every weighted node: the nearest weighted nodes or inputs (``in:i``) upstream, and the
    nearest weighted nodes or outputs (``out:j``) downstream, through weightless nodes."""
    up: dict[str, frozenset[str]] = {v: frozenset({f"in:{i}"}) for i, v in enumerate(w.inputs)}
    for key, ins, outs in w.nodes:
        above = frozenset({key}) if key in weighted else frozenset().union(*(up.get(v, frozenset()) for v in ins))
        for v in outs:
            up[v] = above
    consumers: dict[str, list[str]] = {}
    for key, ins, _ in w.nodes:
        for v in ins:
            consumers.setdefault(v, []).append(key)
    out_of: dict[str, set[str]] = {}
    for j, v in enumerate(w.outputs):
        out_of.setdefault(v, set()).add(f"out:{j}")
    below_node: dict[str, frozenset[str]] = {}
    down: dict[str, frozenset[str]] = {}

    def down_of(v: str) -> frozenset[str]:
        if v not in down:
            down[v] = frozenset(out_of.get(v, set())).union(*(below_node.get(c, frozenset()) for c in consumers.get(v, [])))
        return down[v]

    for key, _, outs in reversed(w.nodes):
        below_node[key] = frozenset({key}) if key in weighted else frozenset().union(*(down_of(v) for v in outs))
    preds, succs = {}, {}
    for key, ins, outs in w.nodes:
        if key in weighted:
            preds[key] = frozenset().union(*(up.get(v, frozenset()) for v in ins))
            succs[key] = frozenset().union(*(down_of(v) for v in outs))
    return preds, succs


class _Marked(nn.Module):
    """``flat`` with an ``nn.Identity`` on every input and output, so the trace names them."""

    def __init__(self, flat: nn.Module, n_inputs: int, n_outputs: int) -> None:
        super().__init__()
        self.flat = flat
        self.ins = nn.ModuleList(nn.Identity() for _ in range(n_inputs))
        self.outs = nn.ModuleList(nn.Identity() for _ in range(n_outputs))

    def forward(self, *xs: Tensor) -> tuple[Tensor, ...]:
        ys = self.flat(*[m(x) for m, x in zip(self.ins, xs)])
        ys = ys if isinstance(ys, tuple) else (ys,)
        return tuple(m(y) for m, y in zip(self.outs, ys))


def torch_wiring(model: nn.Module, io: ModelIO, inputs: Sequence[Tensor]) -> Wiring:
    """The wiring of one eval call of ``model`` (in its flat signature) on ``inputs`` (``[1, ...]``
    per input blob), traced with ``graph.trace_call``; module nodes keyed by the module's name in
    ``model`` (a module called more than once: ``name@call``), function nodes ``fn@index``."""
    marked = _Marked(FlatModel(model, io), len(inputs), len(io.output_paths))
    flow = trace_call(marked, tuple(inputs))
    prefix = "flat.model."
    ins: list[str] = [""] * len(inputs)
    outs: list[str] = [""] * len(marked.outs)
    nodes: list[tuple[str, list[str], list[str]]] = []
    aliases: dict[str, str] = {}
    for node in flow.nodes:
        vin, vout = [str(v) for v in node.inputs], [str(v) for v in node.outputs]
        t = node.target
        if node.module is not None and t.startswith("ins."):
            ins[int(t[4:])] = vout[0]
            continue
        if node.module is not None and t.startswith("outs."):
            outs[int(t[5:])] = vin[0]
            continue
        if node.module is not None:
            name = t[len(prefix):] if t.startswith(prefix) else t
            key = name if len(flow.calls.get(t, [])) == 1 else f"{name}@{node.index}"
            if isinstance(node.module, (nn.Identity, nn.Dropout)) and len(vin) == 1 and len(vout) == 1:
                aliases[vout[0]] = vin[0]
        else:
            key = f"{t}@{node.index}"
            if t in _TORCH_ALIASES and vin and len(vout) == 1:
                aliases[vout[0]] = vin[0]
        nodes.append((key, vin, vout))
    return Wiring(nodes, ins, outs, aliases)


def ncnn_wiring(param, inputs: Sequence[str] | None = None, outputs: Sequence[str] | None = None) -> Wiring:  # noqa: ANN001
    """The wiring of an ncnn model (``NcnnParam``): nodes keyed ``name#index`` (the owners' keys of
    :mod:`.matching`), Split tops as aliases of their bottom; ``inputs`` / ``outputs``: blob names
    (default: the Input layers' tops and the tops nothing reads, in file order, as pnnx writes them)."""
    if inputs is None:
        inputs = [t for lay in param.layers if lay.type == "Input" for t in lay.tops]
    if outputs is None:
        read = {b for lay in param.layers for b in lay.bottoms}
        outputs = [t for lay in param.layers if lay.type != "Input" for t in lay.tops if t not in read]
    nodes, aliases = [], {}
    for i, lay in enumerate(param.layers):
        if lay.type == "Input":
            continue
        if lay.type == "Split" and len(lay.bottoms) == 1:
            aliases.update({t: lay.bottoms[0] for t in lay.tops})
        nodes.append((f"{lay.name}#{i}", list(lay.bottoms), list(lay.tops)))
    return Wiring(nodes, list(inputs), list(outputs), aliases)


def _consistent(here: frozenset[str], there: frozenset[str], fwd: dict[str, str], back: dict[str, str]) -> bool:
    """Every matched neighbour on one side is the matched neighbour on the other, both ways."""
    return all(fwd[p] in there for p in here if p in fwd) and all(back[q] in here for q in there if q in back)


def resolve_by_place(
    cands: dict[str, list[str]], result: dict[str, str], torch_w: Wiring, target_w: Wiring
) -> None:
    """Narrow every unmatched torch layer's candidates (``cands``: torch name -> owner keys) to
    those whose matched neighbours agree with its own, and match it once one is left; repeated
    until nothing changes. ``result`` (torch name -> owner key) is extended in place."""
    tp, ts = neighbours(torch_w, set(cands))
    gp, gs = neighbours(target_w, {k for c in cands.values() for k in c})
    anchors = {f"in:{i}": f"in:{i}" for i in range(len(torch_w.inputs))}
    anchors.update({f"out:{j}": f"out:{j}" for j in range(len(torch_w.outputs))})
    changed = True
    while changed:
        changed = False
        fwd = {**anchors, **result}
        back = {v: k for k, v in fwd.items()}
        for name in cands:
            if name in result or name not in tp:
                continue
            free = [o for o in cands[name] if o not in back]
            fits = [o for o in free if o in gp and _consistent(tp[name], gp[o], fwd, back)
                    and _consistent(ts[name], gs[o], fwd, back)]
            if len(fits) == 1:
                result[name] = fits[0]
                fwd[name], back[fits[0]] = fits[0], name
                changed = True
            elif fits and len(fits) < len(cands[name]):
                cands[name] = fits
                changed = True


def _same_or_none(a: object, b: object) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.shape != b.shape:
            return False
        return bool(torch.equal(a.detach().cpu(), b.detach().cpu()))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    return a == b


#: Attributes of a matched layer that must agree for two layers to share table rows.
ROW_ATTRS = ("kind", "bias", "weight_bits", "num_groups", "input_scale", "weight_scales")


def same_rows(a: object, b: object) -> bool:
    """Whether two matched layers (infos) agree on every row attribute (:data:`ROW_ATTRS`)."""
    return all(_same_or_none(getattr(a, k, None), getattr(b, k, None)) for k in ROW_ATTRS)


def interchangeable(
    group: Sequence, keys: Sequence[str], torch_w: Wiring, target_w: Wiring
) -> list[tuple[str, str]] | None:
    """Pairs (torch name, owner key) in graph order when the torch layers ``group`` (infos with
    identical weights) all read one tensor, the converted layers ``keys`` all read one blob, and
    every row attribute (:data:`ROW_ATTRS`) agrees: they compute the same values and get the same
    table rows, so which is which changes nothing. None when they are not so."""
    t_reads, g_reads = torch_w.reads(), target_w.reads()
    if len({t_reads.get(i.name) for i in group}) != 1 or None in {t_reads.get(i.name) for i in group}:
        return None
    if len({g_reads.get(k) for k in keys}) != 1 or None in {g_reads.get(k) for k in keys}:
        return None
    if not all(same_rows(group[0], info) for info in group[1:]):
        return None
    t_order, g_order = torch_w.order(), target_w.order()
    names = sorted((i.name for i in group), key=lambda n: t_order.get(n, 0))
    return list(zip(names, sorted(keys, key=lambda k: g_order.get(k, 0))))
