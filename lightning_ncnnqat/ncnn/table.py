"""The ncnn calibration table: validation and text.

What ncnn2int8 reads (``tools/quantize/ncnn2int8.cpp``, ``read_int8scale_table``): each line is
split on single spaces with ``strtok``; the first token is the key (read with ``%255s``), the
rest are floats (``%f``). A key containing ``_param_`` is a weight row, anything else an input
row; an empty line ends the file. So a layer name must be 1..255 characters without whitespace
(ncnn's .param parser has the same limit, ``%255s``), and an input row's key must not contain
``_param_``. Purely numeric names ("123", what onnx2ncnn uses for a node without a name) are
ordinary keys: they are written as the text they are. Scales are written with ``%.9g``, which
round-trips any float32 exactly (``%f``, what ncnn2table prints, loses small scales).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lightning_ncnnqat.errors import LayerError

MAX_NAME = 255
FLT_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class TableRow:
    """The two rows of one quantized layer."""

    layer: str  # key in the table (ncnn or ONNX layer name)
    torch_name: str
    weight_scales: tuple[float, ...]
    input_scale: float


def check_scale(torch_name: str, what: str, value: float) -> None:
    """A scale must be a finite positive float32."""
    v = float(value)
    if not math.isfinite(v) or v <= 0.0 or v > FLT_MAX:
        raise LayerError(torch_name, f"layer '{torch_name}': {what} is {value!r}; it must be finite and > 0")


def check_scales(torch_name: str, input_scale: float, weight_scales: Sequence[float], expected: int) -> None:
    """Validate one layer's scales (before anything is written)."""
    check_scale(torch_name, "input scale", input_scale)
    if len(weight_scales) != expected:
        raise LayerError(
            torch_name, f"layer '{torch_name}': {len(weight_scales)} weight scales, expected {expected}"
        )
    for i, s in enumerate(weight_scales):
        check_scale(torch_name, f"weight scale [{i}]", s)


def check_table_name(name: str, torch_name: str, what: str) -> None:
    """Raise if ``name`` cannot be a key of ncnn2int8's table (and of an ncnn .param)."""
    if not name:
        raise LayerError(torch_name, f"layer '{torch_name}': its {what} name is empty")
    if len(name) > MAX_NAME:
        raise LayerError(
            torch_name,
            f"layer '{torch_name}': {what} name {name!r} has {len(name)} characters; ncnn reads at most {MAX_NAME}",
        )
    if any(c.isspace() for c in name) or "\0" in name:
        raise LayerError(
            torch_name,
            f"layer '{torch_name}': {what} name {name!r} contains whitespace; ncnn's table and .param "
            "readers split on it, so it cannot be represented (rename the node/layer)",
        )
    if "_param_" in name:
        raise LayerError(
            torch_name,
            f"layer '{torch_name}': {what} name {name!r} contains '_param_'; ncnn2int8 would read its "
            "input row as a weight row",
        )


def format_scale(v: float) -> str:
    """Shortest-safe text of a float32 scale (round-trips through ``sscanf("%f")``)."""
    s = "%.9g" % float(np.float32(v))
    return s


def format_table(rows: Sequence[TableRow], what: str) -> str:
    """Table text: all weight rows, then all input rows (ncnn2table's order), no blank line."""
    seen: set[str] = set()
    for r in rows:
        check_table_name(r.layer, r.torch_name, what)
        if r.layer in seen:
            raise LayerError(r.torch_name, f"layer '{r.torch_name}': {what} name {r.layer!r} is used by two layers")
        seen.add(r.layer)
        check_scales(r.torch_name, r.input_scale, r.weight_scales, len(r.weight_scales))
        if not r.weight_scales:
            raise LayerError(r.torch_name, f"layer '{r.torch_name}': no weight scales")
    lines = [f"{r.layer}_param_0 " + " ".join(format_scale(s) for s in r.weight_scales) for r in rows]
    lines += [f"{r.layer} {format_scale(r.input_scale)}" for r in rows]
    return "\n".join(lines) + "\n"


def parse_table(text: str) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Read a table as ncnn2int8 does: ``(weight rows by layer, input scale by layer)``.

    Stops at the first empty line, like ncnn2int8; keys of weight rows lose ``_param_0``.
    """
    weights: dict[str, list[float]] = {}
    inputs: dict[str, float] = {}
    for line in text.split("\n"):
        line = line.rstrip("\r")
        toks = [t for t in line.split(" ") if t]
        if not toks:
            break
        key, vals = toks[0], [float(t) for t in toks[1:]]
        if "_param_" in key:
            base, _, idx = key.rpartition("_param_")
            if idx != "0":
                raise ValueError(f"table row {key!r}: only _param_0 rows are expected")
            weights[base] = vals
        else:
            if len(vals) != 1:
                raise ValueError(f"table row {key!r}: an input row has one scale, got {len(vals)}")
            inputs[key] = vals[0]
    return weights, inputs
