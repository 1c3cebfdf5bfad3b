"""The export's first two steps: the model's flat signature and the held batch (``inputs``), the
quantized layers read and checked (``validate``); and what every later step works from
(:class:`Prepared`), including the rows every table step writes (:func:`table_rows`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_ncnnqat import policy
from lightning_ncnnqat.conversion.graph_match import Wiring, torch_wiring
from lightning_ncnnqat.conversion.model_io import ModelIO, held_inputs, input_tensor, model_io
from lightning_ncnnqat.errors import LayerError
from lightning_ncnnqat.export.gemm_export import gemm_layer_reports
from lightning_ncnnqat.export.steps import step
from lightning_ncnnqat.ncnn.param import INT8_TYPES
from lightning_ncnnqat.ncnn.table import TableRow, check_scales
from lightning_ncnnqat.qat.batches import positional_names, to_model
from lightning_ncnnqat.qat.gemm import GemmLayerInfo, gemm_layers
from lightning_ncnnqat.qat.plan import QuantLayerInfo, get_plan
from lightning_ncnnqat.qat.prepared import deepcopy_model, float_layers, folded_float_model, input_quantizers, quantized_layers
from lightning_ncnnqat.qat.wrappers import unwrap
from lightning_ncnnqat.verification.report import ExportReport, LayerReport
from lightning_ncnnqat.verification.verdicts import render


def validate_layers(infos: list[QuantLayerInfo]) -> None:
    """Every quantized layer: finite positive input/weight scales, finite weights and bias."""
    for i in infos:
        check_scales(i.name, i.input_scale, [float(s) for s in i.weight_scales.reshape(-1)], i.num_groups)
        if not torch.isfinite(i.weight).all():
            raise LayerError(i.name, f"layer '{i.name}': its folded weight contains NaN or inf")
        if i.bias is not None and not torch.isfinite(i.bias).all():
            raise LayerError(i.name, f"layer '{i.name}': its folded bias contains NaN or inf")
        if i.kind not in INT8_TYPES:
            raise LayerError(i.name, f"layer '{i.name}': unknown ncnn type {i.kind!r}")


def table_rows(
    infos: list[QuantLayerInfo], names: dict[str, str], order: list[str], factors: dict[str, float] | None = None
) -> list[TableRow]:
    """Table rows in graph order; ``factors[name] = c``: the graph's layer holds ``c * w`` (a folded
    input scale), so its rows are ``weight_scales / c`` and ``input_scale * c``."""
    pos = {n: i for i, n in enumerate(order)}
    f = factors or {}
    rows = [
        TableRow(
            names[i.name], i.name,
            tuple(float(np.float32(s) / np.float32(f.get(i.name, 1.0))) for s in i.weight_scales.reshape(-1)),
            float(np.float32(i.input_scale) * np.float32(f.get(i.name, 1.0))),
        )
        for i in infos
    ]
    rows = list({r.layer: r for r in reversed(rows)}.values())  # one row per converted layer (see matching._share_merged)
    return sorted(rows, key=lambda r: pos.get(r.layer, len(pos)))


def fill_missing_ranges(model: nn.Module, io: ModelIO, inputs: list[torch.Tensor]) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` whose input ranges that no training step set are set from ``inputs``
    (absmax of one eval forward), and the names of those layers; ``model`` itself when none is
    missing. The user's model is never changed."""
    missing = [n for n, q in input_quantizers(model).items() if float(q.running_absmax.reshape(-1)[0]) < 0]
    if not missing:
        return model, []
    copy_ = deepcopy_model(model)
    copy_.eval()
    qs = input_quantizers(copy_)
    for q in qs.values():
        q.sync = False  # one process fills them: a DDP all-reduce here would wait for the others forever
    modules = dict(unwrap(copy_).named_modules())
    for n in missing:
        qs[n].training = True  # only these move; the forward runs the rest in eval
        modules[n].updates_range = True  # also under ranges="fixed", where no training step moves them
    device = next((p.device for p in copy_.parameters()), torch.device("cpu"))
    with torch.no_grad():
        dtype = next((p.dtype for p in copy_.parameters() if p.is_floating_point()), torch.float32)
        a, k = io.call([to_model(t, device, dtype) for t in inputs])
        copy_(*a, **k)
    for n in missing:
        qs[n].training = False
    return copy_, missing


@dataclass
class Prepared:
    """What every step after ``validate`` works from."""

    qmodel: nn.Module
    io: ModelIO
    held: list[torch.Tensor]
    infos: list[QuantLayerInfo]
    folded: nn.Module
    wiring: Wiring | None  # the folded model's traced graph: tells layers with equal weights apart
    gemms: list[GemmLayerInfo] = field(default_factory=list)  # int8 Gemm layers (export/gemm_export.py)


def prepare(model: nn.Module, example_input: Any, held_batch: Any, report: ExportReport, verbose: bool) -> Prepared:
    """The ``inputs`` and ``validate`` steps: the flat signature and the held batch in it, ranges
    no training step set filled on a copy (a warning), every quantized layer checked, the layer
    table of the report started, the folded float model and its traced graph."""
    with step("inputs", verbose):
        io = model_io(model, example_input)
        if held_batch is None:
            held = [input_tensor(t) for t in io.example_tensors()]
        else:
            held = held_inputs(io, held_batch, positional_names(model))
        report.io = io.describe()
    with step("validate", verbose):
        if get_plan(model) is None:
            raise ValueError(f"{type(model).__name__} is not prepared for QAT (call prepare_qat or use QATCallback)")
        qmodel, filled = fill_missing_ranges(model, io, held)
        if filled:
            render(report, [policy.ranges_from_held_batch(filled, len(held[0]))])
        infos = quantized_layers(qmodel)
        validate_layers(infos)
        report.float_layers = [{"name": n, "reason": r} for n, r in float_layers(qmodel)]
        report.layers = [
            LayerReport(i.name, None, None, i.kind, i.weight_bits, float(i.input_scale), int(i.weight_scales.numel()), i.input_owner)
            for i in infos
        ]
        gemms = gemm_layers(qmodel)
        report.layers += gemm_layer_reports(gemms)
        folded = folded_float_model(qmodel).cpu().eval()
        wiring = traced_wiring(folded, io, held, report)
    return Prepared(qmodel, io, held, infos, folded, wiring, gemms)


def traced_wiring(folded: nn.Module, io: ModelIO, held: list[torch.Tensor], report: ExportReport) -> Wiring | None:
    """The folded model's traced graph (graph_match.torch_wiring); None, with a note, if the trace
    fails: weight matching then works as before, and only layers with equal weights go unresolved."""
    try:
        return torch_wiring(folded, io, [t[:1] for t in held])
    except Exception as e:  # noqa: BLE001 - tracing runs the user's model, which may raise anything; an extra, not a step
        render(report, [policy.wiring_not_traced(f"{type(e).__name__}: {str(e)[:200]}")])
        return None
