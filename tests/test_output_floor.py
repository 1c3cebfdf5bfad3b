"""The int8-vs-QAT output-cosine rule judged against the QAT model's own float32 floor.

Real prepare_qat, export (pnnx, ncnn) and ncnn runs; no mocks. The poorly conditioned model is a
difference of two large, nearly equal convolutions that float32 accumulates in different orders
(one reads its input with the channel halves swapped): ncnn int8 accumulates exactly, so it sits at
the floor; a 1% wrong weight scale in the int8 .bin is far beyond it.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lightning_ncnnqat import prepare_qat
from lightning_ncnnqat.export import export
from lightning_ncnnqat.export.model_io import model_io, torch_outputs
from lightning_ncnnqat.export.ncnn_bin_layout import locate
from lightning_ncnnqat.export.ncnn_param import NcnnParam
from lightning_ncnnqat.export.output_floor import (
    FLOOR_FACTOR,
    MIN_OUTPUT_COSINE,
    Float32Floor,
    at_floor,
    float64_outputs,
    judge_output,
)
from lightning_ncnnqat.export.parity import cosine
from lightning_ncnnqat.export.report import ExportReport, OutputParity
from lightning_ncnnqat.export.runtime_checks import ModelFiles, blob_names, measure
from lightning_ncnnqat.prepare import folded_float_model
from models import MixedNet

C = 64


class Cancelling(nn.Module):
    """``a(x) - b(swap(x))``: the same weights (b's input channel halves swapped) and biases that
    differ by 0.3..0.6, with weights ~1000: outputs ~3e4 whose difference is ~0.5, so float32
    rounding of the two accumulations (in different orders) is a large part of the output."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Conv2d(C, 8, 3, padding=1)
        self.b = nn.Conv2d(C, 8, 3, padding=1)
        with torch.no_grad():
            w = torch.randn(8, C, 3, 3, generator=g) * 1000
            self.a.weight.copy_(w)
            self.b.weight.copy_(torch.cat([w[:, C // 2 :], w[:, : C // 2]], 1))
            bias = torch.randn(8, generator=g) * 1000
            self.a.bias.copy_(bias)
            self.b.bias.copy_(bias - 0.3 * (1 + torch.rand(8, generator=g)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) - self.b(torch.cat([x[:, C // 2 :], x[:, : C // 2]], 1))


def _qat(model: nn.Module, x: torch.Tensor) -> nn.Module:
    prepare_qat(model, x[:1])
    model.train()
    with torch.no_grad():
        for _ in range(3):  # set the input ranges
            model(x)
    return model.eval()


@pytest.fixture(scope="module")
def cancelling(tmp_path_factory):
    torch.set_num_threads(1)
    x = torch.randn(8, C, 8, 8, generator=torch.Generator().manual_seed(1))
    model = _qat(Cancelling(), x)
    out = tmp_path_factory.mktemp("cancelling")
    report = export(model, out, x[:1], x, verbose=False, targets="x86", timing_runs=0, check_onnx=False)
    return model, x, out, report


def test_rule_on_measured_zoo_figures() -> None:
    """Zoo figures (README, x86 unless said): at the floor where int8 and float32 agree alike."""
    assert at_floor(0.99614, 0.99636)  # resnext50_32x4d
    assert at_floor(0.99827, 0.99834)  # regnet_x_400mf
    assert at_floor(0.99455, 0.99686)  # mobilenet_v3_large, strict options: the largest ratio, 1.74
    assert at_floor(0.99494, 0.99686)  # the same on Cortex-A53
    # mobilenet_v2 under default options (packed depthwise requantize): 9.8x the floor's error
    assert not at_floor(0.98337, 0.99830)
    assert not at_floor(0.999, 1.0)  # a model that float32 computes exactly has no excuse


def test_poorly_conditioned_model_gets_the_note_not_the_warning(cancelling) -> None:
    _, _, out, report = cancelling
    cos, floor = report.int8_vs_qat.cosine, report.float32_floor
    assert floor is not None and 0.999 < floor < MIN_OUTPUT_COSINE  # float32 itself misses the bar
    assert cos < MIN_OUTPUT_COSINE and at_floor(cos, floor)
    assert (1 - cos) / (1 - floor) < 1.5  # int8 (exact accumulation) is as close as float64 is
    assert not [w for w in report.warnings if "output cosine" in w], report.warnings
    notes = [n for n in report.notes if "at the float32 floor" in n]
    assert len(notes) == 1 and f"{cos:.6f}" in notes[0] and f"{floor:.6f}" in notes[0]
    saved = json.loads((out / "report.json").read_text())
    assert saved["float32_floor"] == pytest.approx(floor)
    assert saved["outputs"][0]["float32_floor"] == pytest.approx(floor)
    assert saved["runtime"]["x86"]["float32_floor"] == pytest.approx(floor)


def _damage_weight_scale(export_dir: Path, layer: str, factor: float) -> None:
    """Multiply output channel 0's weight scale of int8 layer ``layer`` in model.int8.bin."""
    param = NcnnParam.parse((export_dir / "model.int8.param").read_text())
    data = bytearray((export_dir / "model.int8.bin").read_bytes())
    entries = dict(zip((lay.name for lay in param.layers), locate(param.layers, bytes(data))))[layer]
    scales = next(e for e in entries if e.role == "weight_scales")
    (v,) = struct.unpack_from("<f", data, scales.offset)
    struct.pack_into("<f", data, scales.offset, v * factor)
    (export_dir / "model.int8.bin").write_bytes(bytes(data))


def test_wrong_int8_model_is_warned_even_on_a_poorly_conditioned_model(cancelling, tmp_path) -> None:
    model, x, out, _ = cancelling
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    _damage_weight_scale(tmp_path, "conv_0", 1.01)  # layer a, one channel 1% off
    io = model_io(model, x[:1])
    param = NcnnParam.parse((tmp_path / "model.int8.param").read_text())
    files = ModelFiles(tmp_path, param, *blob_names(param, io))
    report = ExportReport(str(tmp_path))
    measure(report, files, model, folded_float_model(model), io, [x], [], {}, 1, 0, None)
    cos, floor = report.int8_vs_qat.cosine, report.float32_floor
    assert floor is not None and floor > 0.999
    assert (1 - cos) > 10 * FLOOR_FACTOR * (1 - floor)
    warned = [w for w in report.warnings if "int8 output cosine with the QAT model is only" in w]
    assert len(warned) == 1 and f"{cos:.6f}" in warned[0] and f"float32 floor {floor:.6f}" in warned[0]
    assert not [n for n in report.notes if "at the float32 floor" in n]


def test_floor_is_measured_only_when_the_bar_is_missed(cancelling) -> None:
    model, x, _, _ = cancelling
    io = model_io(model, x[:1])
    q_ref = torch_outputs(model, io, [x])
    report = ExportReport("unused", outputs=[OutputParity("out0", "")])
    floor = Float32Floor(model, io, [x], q_ref)
    assert judge_output(report, floor, 0, 0.99995, "") is None
    assert not floor.measured and report.float32_floor is None and not report.warnings and not report.notes
    verdict = judge_output(report, floor, 0, 0.5, "", on="on arm64-a53, ", strict=0.6)
    assert floor.measured and verdict == {"float32_floor": report.float32_floor, "at_float32_floor": False}
    assert report.warnings == [
        f"on arm64-a53, int8 output cosine with the QAT model is only 0.500000 (0.600000 with fp16 storage/"
        f"arithmetic and packed kernels off), beyond the QAT model's float32 floor {report.float32_floor:.6f} "
        f"(int8 error 1-cos 0.4 > 3 x the floor's {1 - report.float32_floor:.3g})"
    ]


def test_float64_copy_quantizes_as_the_model_and_leaves_it_unchanged() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    model = _qat(MixedNet(), x)
    io = model_io(model, x[:1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    f32 = torch_outputs(model, io, [x])
    f64 = float64_outputs(model, io, [x])
    assert f64[0].dtype == np.float64 and f64[0].shape == f32[0].shape
    assert cosine(f32[0], f64[0]) > 0.9999  # a well-conditioned net: float32 is near float64
    assert not np.array_equal(f32[0], f64[0])  # but it did run in float64
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert np.array_equal(torch_outputs(model, io, [x])[0], f32[0])


def _arm64_a53() -> bool:
    from lightning_ncnnqat.targets import available_targets

    return "arm64-a53" in available_targets()


@pytest.mark.skipif(not _arm64_a53(), reason="arm64-a53 emulation not set up (python -m lightning_ncnnqat.targets setup-arm)")
def test_emulated_target_is_judged_against_the_same_floor(cancelling) -> None:
    model, x, out, _ = cancelling
    io = model_io(model, x[:1])
    param = NcnnParam.parse((out / "model.int8.param").read_text())
    report = ExportReport(str(out))
    measure(report, ModelFiles(out, param, *blob_names(param, io)), model, folded_float_model(model), io, [x], [], {},
            1, 0, None, targets=("x86", "arm64-a53"))
    entry = report.runtime["arm64-a53"]
    assert "error" not in entry, entry.get("error")
    cos, floor = entry["int8_vs_qat"]["cosine"], report.float32_floor
    assert cos < MIN_OUTPUT_COSINE and entry["float32_floor"] == floor and entry["outputs"][0]["at_float32_floor"]
    assert not [w for w in report.warnings if "output cosine" in w], report.warnings
    assert [n for n in report.notes if n.startswith("on arm64-a53, int8 output cosine") and f"{floor:.6f}" in n]


def test_summary_names_the_floor(cancelling) -> None:
    report = cancelling[3]
    assert f"cosine {report.int8_vs_qat.cosine:.6f} (float32 floor {report.float32_floor:.6f})" in report.summary()
