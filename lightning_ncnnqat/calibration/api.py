"""``calibrate()``: ncnn's post-training calibration (ncnn2table) in PyTorch.

Same layers as QAT (``prepare.plan_qat``), same BN-folded float weights as the export, and per
layer exactly the numbers ``tools/quantize/ncnn2table.cpp`` computes from the same inputs:
input threshold and scale (KL / ACIQ / EQ), per-channel weight scales. The result writes the
calibration table for a converted model, keyed by its ncnn layer names, so ncnn2int8 (or the
package's own int8 writer) gives ncnn's PTQ model without building ncnn's C++ tools.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from lightning_ncnnqat.qat.batches import INPUT_KEYS, model_input, to_model
from lightning_ncnnqat.qat.config import QATConfig
from lightning_ncnnqat.conversion.model_io import input_tensor
from lightning_ncnnqat.ncnn.table import TableRow, format_table
from lightning_ncnnqat.qat.plan import QATPlan, get_plan
from lightning_ncnnqat.qat.prepare import apply_plan, plan_qat
from lightning_ncnnqat.qat.prepared import folded_float_model
from lightning_ncnnqat.qat.prepared import deepcopy_model
from lightning_ncnnqat.calibration import eq as eq_search
from lightning_ncnnqat.calibration.aciq import aciq_threshold
from lightning_ncnnqat.calibration.ncnn_activations import convert_float, ncnn_feed, workdir
from lightning_ncnnqat.calibration.histogram import Feed, InputStats, collect_input_stats, torch_feed
from lightning_ncnnqat.calibration.kl import kl_threshold, scale_from_threshold
from lightning_ncnnqat.calibration.table import layer_order, ncnn2table_text, ncnn_names_by_weights, ncnn_names_from_report, rows_for
from lightning_ncnnqat.calibration.weights import METHODS, weight_scales


@dataclass
class LayerCalibration:
    """One quantized layer's calibration (the ``name`` row and the ``name_param_0`` row).

    ``input_scale = 127 / input_threshold`` (float32 multiplier, ``q = round(x * scale)``);
    ``input_absmax`` and ``input_threshold`` are in the unit of the layer's input. ``weight``
    and ``bias`` are the BN-folded float32 tensors the scales were computed from (CPU).
    """

    name: str
    kind: str
    weight_bits: int
    input_owner: str
    input_absmax: float
    input_threshold: float
    input_scale: float
    weight_scales: Tensor  # float32 [num_groups]
    elements_per_sample: int
    threshold_bin: int | None = None  # KL's chosen bin count T (128..2047)
    histogram: np.ndarray | None = field(default=None, repr=False)  # int64 [2048]
    weight: Tensor | None = field(default=None, repr=False)
    bias: Tensor | None = field(default=None, repr=False)


@dataclass
class CalibrationResult:
    """What :func:`calibrate` computed, by torch layer name, in the model's module order."""

    method: str
    layers: dict[str, LayerCalibration]
    float_layers: dict[str, str]
    num_samples: int
    warnings: list[str] = field(default_factory=list)
    activations: str = "torch"  # where the layer inputs were computed: "torch" or "ncnn"

    def input_scales(self) -> dict[str, float]:
        return {n: c.input_scale for n, c in self.layers.items()}

    def table_rows(self, names: Mapping[str, str], order: Sequence[str] | None = None) -> list[TableRow]:
        """Rows keyed by ``names[torch_name]`` (ncnn or ONNX layer names), in ``order`` if given."""
        return rows_for(self.layers, names, order)

    def table_text(self, names: Mapping[str, str], order: Sequence[str] | None = None, style: str = "package") -> str:
        """The table text; ``style="ncnn2table"`` prints it as the tool does (``%f``).

        Raises:
            ValueError: unknown style; LayerError: a name ncnn2int8 cannot read, a bad scale.
        """
        rows = self.table_rows(names, order)
        if style == "package":
            return format_table(rows, "ncnn layer")
        if style == "ncnn2table":
            return ncnn2table_text(rows)
        raise ValueError(f"`style` must be 'package' or 'ncnn2table', got {style!r}")

    def ncnn_names(self, param_path: str | Path, bin_path: str | Path | None = None) -> dict[str, str]:
        """torch -> ncnn layer names for a converted float model, by weights (``bin_path``), or
        from an export's ``report.json`` when ``param_path`` is that file."""
        if bin_path is None:
            return ncnn_names_from_report(param_path)
        return ncnn_names_by_weights(list(self.layers.values()), param_path, bin_path)

    def write_ncnn_table(
        self, path: str | Path, param_path: str | Path, bin_path: str | Path, style: str = "package"
    ) -> dict[str, str]:
        """Write the table for the float ncnn model ``param_path``/``bin_path`` (e.g. an export's
        ``model.ncnn.param/.bin``, or pnnx output with ``fp16=0``); returns the name map used.

        Feed it to ``ncnn2int8 model.param model.bin int8.param int8.bin TABLE``.
        """
        names = self.ncnn_names(param_path, bin_path)
        text = self.table_text(names, layer_order(param_path), style)
        Path(path).write_text(text)
        return names


def _batches_from(data: Any, num_batches: int | None) -> Iterator[Tensor]:
    if isinstance(data, Tensor):
        data = [data]
    it = iter(data)
    for i, batch in enumerate(it):
        if num_batches is not None and i >= num_batches:
            break
        x = model_input(batch)
        if x is None:
            raise TypeError(
                f"calibration batch {i} is a {type(batch).__name__}: expected a tensor, or a batch holding the "
                f"input tensor first (or under one of the keys {', '.join(INPUT_KEYS)})"
            )
        if x.is_complex() or x.dtype == torch.bool:  # float inputs, or integer ids (nn.Embedding)
            raise TypeError(f"calibration batch {i} holds a {x.dtype} input: calibrate needs float or integer inputs")
        yield x.detach()


def _same_layout(batches: Iterable[Tensor], ref: Tensor) -> Iterator[Tensor]:
    """``batches``, each checked against ``ref``: same rank and channels (ncnn2table reads one
    fixed ``shape=[w,h,c]``; a batch of another layout is a mistake in ``data``)."""
    for i, x in enumerate(batches):
        if x.dim() != ref.dim() or (x.dim() > 1 and x.shape[1] != ref.shape[1]):
            raise ValueError(
                f"calibration batch {i} has shape {tuple(x.shape)}, unlike the example input {tuple(ref.shape)} "
                "(same rank and channels expected)"
            )
        if x.is_floating_point() != ref.is_floating_point():
            raise TypeError(
                f"calibration batch {i} holds a {x.dtype} input where the example input is {ref.dtype}: float inputs "
                "and integer inputs (token ids) cannot be mixed"
            )
        yield x


def _one_input(example: Any) -> Tensor:
    """The one input tensor of ``example``; ValueError for a model call with several tensors."""
    if isinstance(example, (tuple, list, dict)):
        values = list(example.values()) if isinstance(example, dict) else list(example)
        tensors = [v for v in values if isinstance(v, Tensor)]
        if len(tensors) == 1 and len(values) == 1:
            return tensors[0]
        raise ValueError(
            f"calibrate handles models with one input tensor (each calibration batch gives one); `example_input` "
            f"is a {type(example).__name__} of {len(values)} values ({len(tensors)} tensors)"
        )
    x = model_input(example)
    if x is None:
        raise TypeError(f"`example_input` must be a tensor or a batch holding one, got {type(example).__name__}")
    return x


def _device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    if device is None:
        p = next(iter(model.parameters()), None)
        return p.device if p is not None else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"`device` must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device` is {device!r}, but this torch has no CUDA device available")
    return dev


def _folded_copy(model: nn.Module, example: Any, config: QATConfig | None) -> tuple[nn.Module, QATPlan]:
    """The BN-folded float copy of ``model`` and its plan; ``model`` is left untouched."""
    plan = get_plan(model)
    if plan is not None:
        return folded_float_model(model), plan
    plan = plan_qat(model, example, config)
    if not plan.layers:
        raise ValueError(f"{type(model).__name__} has no layer ncnn can run in int8; nothing to calibrate")
    work = deepcopy_model(model)
    apply_plan(work, plan)
    return folded_float_model(work), plan


def _input_threshold(method: str, stats: InputStats, name: str) -> tuple[float, int | None]:
    if method == "aciq":
        return aciq_threshold(stats.absmax, stats.elements_per_sample), None
    t, thr = kl_threshold(stats.histogram, stats.absmax)
    return thr, t


def calibrate(
    model: nn.Module,
    data: Iterable[Any] | Tensor,
    example_input: Any = None,
    method: str = "kl",
    num_batches: int | None = None,
    *,
    config: QATConfig | None = None,
    device: str | torch.device | None = None,
    cache_batches: bool = True,
    eq_samples: int = eq_search.MAX_SAMPLES,
    activations: Literal["torch", "ncnn"] = "torch",
) -> CalibrationResult:
    """ncnn2table's calibration of ``model`` on ``data``, per layer QAT would quantize.

    Args:
        model: a float ``nn.Module`` / LightningModule (or one already prepared for QAT: its
            folded float weights are used). Never modified.
        data: a DataLoader, any iterable of batches (a tensor ``[N, C, H, W]`` float32, an
            ``(inputs, targets)`` tuple, a dict with an input key), or one tensor. Inputs are
            exactly what the model takes (what ncnn2table reads from ``.npy`` with ``type=1``).
        example_input: input for planning (tracing); defaults to the first batch's input.
        method: "kl" (2048-bin histogram, KL search), "aciq" (Gaussian clip), or "eq" (KL, then
            the cosine search; slow: 100 int8 runs of each layer per scale).
        num_batches: use only the first ``num_batches`` batches.
        config: the QAT config deciding which layers are quantized and the 6-bit 3x3 rule
            (default ``QATConfig()``, which matches ncnn2table's layer choice except grouped convs).
        device: where the model runs (default: where its parameters are).
        cache_batches: keep the inputs of the first pass in CPU memory for the second (else
            ``data`` is iterated again and must give the same batches in the same order).
        eq_samples: samples EQ evaluates (the tool: the first 50).
        activations: where the layers' inputs are computed. "torch": the folded model in
            PyTorch (fast, on ``device``). "ncnn": the folded model converted with pnnx and run
            in ncnn's float runtime with ncnn2table's options, on CPU in a child process, so
            the table equals ncnn2table's on the same inputs to the printed digit (PyTorch's
            and ncnn's float kernels differ by a few ulp, which can move a KL bin). Needs a
            model pnnx converts, with one input.
    Returns:
        A :class:`CalibrationResult` (float32 scales; thresholds in the input's unit).
    Raises:
        ValueError: unknown method, activations or device; empty data; a batch whose rank or
            channels differ from the example's; ``data`` giving other samples on its second
            pass (``cache_batches=False`` with a one-shot iterator); a layer input with NaN/inf;
            a model with several inputs; nothing to quantize.
        TypeError: a batch with no input tensor, or with a non-float one.
        LayerError: (``"ncnn"``) pnnx failed, or a layer is not found in the ncnn model.
        NcnnRuntimeError: (``"ncnn"``) the ncnn runtime crashed or failed on a batch.
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
    if activations not in ("torch", "ncnn"):
        raise ValueError(f"`activations` must be 'torch' or 'ncnn', got {activations!r}")
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"`num_batches` must be a positive int or None, got {num_batches!r}")
    device = _device(device, model)
    if not cache_batches and isinstance(data, Iterator):
        raise ValueError(
            f"`cache_batches=False` reads `data` once per pass, but `data` is a one-shot {type(data).__name__}: "
            "pass a list or a DataLoader, or keep cache_batches=True"
        )
    cached: list[Tensor] | None = None
    if cache_batches:
        cached = [x.cpu() for x in _batches_from(data, num_batches)]
        if not cached:
            raise ValueError("`data` gave no calibration batch")
    if example_input is not None:
        ex = _one_input(example_input)
    else:  # without a cache this reads the first batch once more
        ex = cached[0] if cached else next(iter(_batches_from(data, num_batches)), None)
        if ex is None:
            raise ValueError("`data` gave no calibration batch")

    def batches() -> Iterable[Tensor]:
        return _same_layout(cached if cached is not None else _batches_from(data, num_batches), ex)

    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    ex = to_model(ex, device, p.dtype if p is not None else torch.float32)  # batches likewise; ids stay integer
    folded, plan = _folded_copy(model, ex, config)
    names = [n for n, _ in folded.named_modules() if n in plan.layers]
    modules = dict(folded.named_modules())
    if activations == "ncnn":
        with workdir() as tmp:
            folded = folded.cpu().eval()
            infos = [_LayerWeights(n, plan.layers[n].kind, modules[n].weight, modules[n].bias) for n in names]
            ncnn_model = convert_float(folded, input_tensor(ex), infos, Path(tmp))
            return _calibrate_layers(
                ncnn_feed(ncnn_model, batches), folded, plan, names, method, eq_samples, activations
            )
    folded = folded.to(device).eval()
    feed = torch_feed(folded, names, batches, device)
    return _calibrate_layers(feed, folded, plan, names, method, eq_samples, activations)


@dataclass
class _LayerWeights:
    """What weight matching reads of a layer (name, kind, weight, bias)."""

    name: str
    kind: str
    weight: Tensor
    bias: Tensor | None


def _calibrate_layers(
    feed: Feed, folded: nn.Module, plan: QATPlan, names: list[str], method: str, eq_samples: int, activations: str
) -> CalibrationResult:
    """Thresholds and scales of every layer in ``names`` from its inputs as ``feed`` gives them."""
    stats = collect_input_stats(feed, names, histogram=method != "aciq")
    modules = dict(folded.named_modules())
    result = CalibrationResult(
        method, {}, dict(plan.float_layers), num_samples=stats[names[0]].samples, activations=activations
    )
    for name in names:
        p, s, m = plan.layers[name], stats[name], modules[name]
        thr, t = _input_threshold(method, s, name)
        scale = scale_from_threshold(thr)
        if not (np.isfinite(scale) and scale > 0):
            result.warnings.append(
                f"layer '{name}': its input is zero on every calibration sample (threshold {thr}); "
                "ncnn2table writes scale inf there; scale 1 is used"
            )
            scale = 1.0
        w = m.weight.detach().float().cpu()
        result.layers[name] = LayerCalibration(
            name=name, kind=p.kind, weight_bits=p.weight_bits, input_owner=p.input_owner,
            input_absmax=s.absmax, input_threshold=thr, input_scale=scale,
            weight_scales=weight_scales(w, p.num_groups, p.weight_bits, method),
            elements_per_sample=s.elements_per_sample, threshold_bin=t, histogram=s.histogram,
            weight=w, bias=None if m.bias is None else m.bias.detach().float().cpu(),
        )
    if method == "eq":
        _run_eq(feed, folded, result, plan, eq_samples)
    return result


def _run_eq(feed: Feed, folded: nn.Module, result: CalibrationResult, plan: QATPlan, n_max: int) -> None:
    """Replace the KL scales of ``result`` with EQ's (inputs of the first ``n_max`` samples)."""
    names = list(result.layers)
    inputs: dict[str, list[Tensor]] = {n: [] for n in names}

    def grab(name: str, x: Tensor) -> None:
        inputs[name].append(x.detach().float().cpu())

    feed(grab, max_samples=n_max)
    modules = dict(folded.named_modules())
    for name in names:
        c = result.layers[name]
        layer = eq_search.Int8Layer(modules[name].cpu(), plan.layers[name].num_groups)
        x = torch.cat(inputs[name])
        if not layer.conv and x.dim() != 2:  # an ncnn InnerProduct's bottom blob may be [C, 1, 1]
            x = x.reshape(x.shape[0], -1)
        ws, s_in = eq_search.search_layer(layer, x, c.weight_scales, c.input_scale)
        c.weight_scales, c.input_scale = ws, s_in
        c.input_threshold = float(np.float32(127) / np.float32(s_in))
    owners: dict[str, list[str]] = {}
    for name, c in result.layers.items():
        owners.setdefault(c.input_owner, []).append(name)
    for owner, readers in owners.items():
        vals = {result.layers[r].input_scale for r in readers}
        if len(vals) > 1:
            result.warnings.append(
                f"EQ gave the readers {readers} of one tensor different input scales {sorted(vals)}; ncnn2int8's "
                "requantize fusion assumes one scale per tensor"
            )
