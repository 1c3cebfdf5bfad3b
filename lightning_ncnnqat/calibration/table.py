"""Calibration tables from a :class:`CalibrationResult`: names for each layer, and the text.

Two texts: the package's (``export.tables.format_table``: ``%.9g``, round-trips float32, what
ncnn2int8 reads), and ncnn2table's own layout (``%f`` with a space after every value, weight
rows then input rows) so a table can be compared with the tool's file byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from lightning_ncnnqat.conversion.graph_match import Wiring, ncnn_wiring
from lightning_ncnnqat.conversion.matching import WeightOwner, match_by_weights
from lightning_ncnnqat.ncnn.param import INT8_TYPES, NcnnParam, bin_layout
from lightning_ncnnqat.ncnn.table import TableRow


def ncnn_owners(param_text: str, bin_bytes: bytes) -> list[WeightOwner]:
    """Every Convolution / ConvolutionDepthWise / InnerProduct of a float ncnn model, with weights."""
    param = NcnnParam.parse(param_text)
    layout = bin_layout(param, bin_bytes)
    owners = []
    for i, lay in enumerate(param.layers):
        if lay.type not in INT8_TYPES:
            continue
        es = {e.role: e for e in layout[lay.name]}
        if "weight" not in es:
            continue
        bias = es["bias"].values(bin_bytes) if "bias" in es else None
        owners.append(WeightOwner(lay.name, lay.type, es["weight"].values(bin_bytes), bias, i))
    return owners


def ncnn_names_by_weights(
    layers: Sequence, param_path: str | Path, bin_path: str | Path, torch_graph: Wiring | None = None
) -> dict[str, str]:
    """torch layer name -> ncnn layer name, by equal float32 weights (pnnx ``fp16=0`` output);
    ``torch_graph`` (the traced float model, ``graph_match.torch_wiring``) tells layers with equal
    weights apart by their place.

    Raises:
        LayerError: a layer has no (or no unique) weight match in the ncnn model; the message
            names it (a converter that stored fp16 weights matches nothing).
    """
    text = Path(param_path).read_text()
    data = Path(bin_path).read_bytes()
    graphs = None if torch_graph is None else (torch_graph, ncnn_wiring(NcnnParam.parse(text)))
    return match_by_weights(layers, ncnn_owners(text, data), f"ncnn model ({Path(param_path).name})", graphs=graphs)


def ncnn_names_from_report(report_path: str | Path) -> dict[str, str]:
    """torch layer name -> ncnn layer name, from the ``report.json`` that ``export`` writes."""
    data = json.loads(Path(report_path).read_text())
    names = {x["torch_name"]: x["ncnn_name"] for x in data.get("layers", []) if x.get("ncnn_name")}
    if not names:
        raise ValueError(f"{report_path} names no ncnn layer (was the ncnn branch of the export written?)")
    return names


def layer_order(param_path: str | Path) -> list[str]:
    """Layer names in .param order (ncnn2table writes its rows in this order)."""
    return [lay.name for lay in NcnnParam.parse(Path(param_path).read_text()).layers]


def rows_for(layers: Mapping, names: Mapping[str, str], order: Sequence[str] | None = None) -> list[TableRow]:
    """One :class:`TableRow` per calibrated layer that ``names`` maps, in ``order`` if given.

    Raises:
        KeyError: a calibrated layer has no name in ``names``.
    """
    missing = [t for t in layers if t not in names]
    if missing:
        raise KeyError(f"no table name for layers {missing}")
    rows = [
        TableRow(names[t], t, tuple(float(s) for s in c.weight_scales.reshape(-1)), float(c.input_scale))
        for t, c in layers.items()
    ]
    if order is not None:
        pos = {n: i for i, n in enumerate(order)}
        rows.sort(key=lambda r: pos.get(r.layer, len(pos)))
    return rows


def ncnn2table_text(rows: Sequence[TableRow]) -> str:
    """The table as ncnn2table prints it (``%f``, trailing spaces): for byte comparisons only.

    ``%f`` of a float32 value is what C's ``fprintf("%f", float)`` prints (the float is promoted
    to double, as Python's float is exact for it).
    """

    def f(v: float) -> str:
        return "%f " % float(np.float32(v))

    lines = [f"{r.layer}_param_0 " + "".join(f(s) for s in r.weight_scales) for r in rows]
    lines += [f"{r.layer} " + f(r.input_scale) for r in rows]
    return "".join(line + "\n" for line in lines)
