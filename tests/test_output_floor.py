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
from lightning_ncnnqat.conversion.model_io import model_io, torch_outputs
from lightning_ncnnqat.ncnn.bin_layout import locate
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.ncnn.fp32_blobs import strip_fp32_blobs
from lightning_ncnnqat.verification.output_floor import (
    FLOOR_FACTOR,
    MIN_DEFAULT_OPTIONS_COSINE,
    MIN_OUTPUT_COSINE,
    Float32Floor,
    at_floor,
    float64_outputs,
    judge_output,
)
from lightning_ncnnqat.verification.parity import agreement, cosine
from lightning_ncnnqat.verification.report import ExportReport, OutputParity
from lightning_ncnnqat.verification.runtime_checks import ModelFiles, approximation_gap, blob_names, measure
from lightning_ncnnqat.verification.judging import judge
from lightning_ncnnqat.qat.prepared import folded_float_model
from models import MixedNet

C = 64


class Cancelling(nn.Module):
    """``a(x) - b(swap(x))``: the same weights (b's input channel halves swapped) and biases that
    differ by 0.3..0.6, with weights ~``magnitude``: outputs ~30x that whose difference is ~0.5, so
    float32 rounding of the two accumulations (in different orders) is a large part of the output."""

    def __init__(self, magnitude: float = 1000.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Conv2d(C, 8, 3, padding=1)
        self.b = nn.Conv2d(C, 8, 3, padding=1)
        with torch.no_grad():
            w = torch.randn(8, C, 3, 3, generator=g) * magnitude
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


def _magnitude_for_this_cpu(x: torch.Tensor) -> float:
    """The weight magnitude at which this CPU's float32 convolutions miss float64 by 1-cos in
    [1.5e-4, 5e-4] on ``x``: the floor then lies well inside (0.999, 0.9999) whatever the kernels'
    accumulation order (an AVX-512 machine rounds ~30x less than an AVX2 one at the same weights).
    The error grows as the square of the magnitude, so steps of sqrt(2) cannot jump the band."""
    for k in range(16):
        magnitude = 1000.0 * 2 ** (k / 2)
        m = Cancelling(magnitude).eval()
        with torch.no_grad():
            y32 = m(x).double().flatten()
            y64 = m.double()(x.double()).flatten()
        err = 1.0 - float(y32 @ y64 / (y32.norm() * y64.norm()))
        if 1.5e-4 <= err <= 5e-4:
            return magnitude
        if err > 5e-4:
            break
    pytest.fail(f"no weight magnitude puts this CPU's float32 error in [1.5e-4, 5e-4] (last: {err:.3g} at {magnitude})")


@pytest.fixture(scope="module")
def cancelling(tmp_path_factory):
    torch.set_num_threads(1)
    x = torch.randn(8, C, 8, 8, generator=torch.Generator().manual_seed(1))
    model = _qat(Cancelling(_magnitude_for_this_cpu(x)), x)
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
    assert floor.measured and verdict["at_float32_floor"] is False and verdict["float32_floor"] > 0.999
    f = verdict["float32_floor"]
    assert report.float32_floor is None and report.outputs[0].float32_floor is None  # x86's fields: x86 only
    assert report.warnings == [
        f"on arm64-a53, int8 output cosine with the QAT model is only 0.600000 with fp16 storage/arithmetic and "
        f"packed kernels off, beyond the QAT model's float32 floor {f:.6f} (int8 error 1-cos 0.4 > 3 x the floor's "
        f"{1 - f:.3g}); 0.500000 under default options"
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


def _arm(target: str) -> bool:
    from lightning_ncnnqat.ncnn.targets import available_targets

    return target in available_targets()


def _measured_on(cancelling, target: str) -> tuple[ExportReport, dict]:  # noqa: ANN001
    """The cancelling model's int8 export measured on x86 and ``target``: the report and its
    ``runtime[target]`` entry (which must hold no error)."""
    model, x, out, _ = cancelling
    io = model_io(model, x[:1])
    param = NcnnParam.parse((out / "model.int8.param").read_text())
    report = ExportReport(str(out))
    measure(report, ModelFiles(out, param, *blob_names(param, io)), model, folded_float_model(model), io, [x], [], {},
            1, 0, None, targets=("x86", target))
    entry = report.runtime[target]
    assert "error" not in entry, entry.get("error")
    return report, entry


def _arm64_a53() -> bool:
    return _arm("arm64-a53")


@pytest.mark.skipif(not _arm64_a53(), reason="arm64-a53 emulation not set up (python -m lightning_ncnnqat.ncnn.targets setup-arm)")
def test_emulated_target_is_judged_against_the_same_floor(cancelling) -> None:
    report, entry = _measured_on(cancelling, "arm64-a53")
    cos, floor = entry["int8_vs_qat"]["cosine"], report.float32_floor
    assert cos < MIN_OUTPUT_COSINE and entry["float32_floor"] == floor and entry["outputs"][0]["at_float32_floor"]
    assert not [w for w in report.warnings if "output cosine" in w], report.warnings
    assert [n for n in report.notes if n.startswith("on arm64-a53, int8 output cosine") and f"{floor:.6f}" in n]


def test_summary_names_the_floor(cancelling) -> None:
    report = cancelling[3]
    assert f"cosine {report.int8_vs_qat.cosine:.6f} (float32 floor {report.float32_floor:.6f})" in report.summary()


def _x86_passing_report(model: nn.Module, x: torch.Tensor) -> tuple[ExportReport, Float32Floor]:
    """A report whose x86 output equals the QAT model's (passes the bar), with a real floor."""
    io = model_io(model, x[:1])
    q_ref = torch_outputs(model, io, [x])
    a = agreement(q_ref[0], q_ref[0], False)
    report = ExportReport("unused", outputs=[OutputParity("out0", "", int8_vs_qat=a)], int8_vs_qat=a)
    report.runtime = {"x86": {"int8_vs_qat": a.__dict__}}
    return report, Float32Floor(model, io, [x], q_ref)


def test_a_target_only_miss_leaves_this_machines_floor_unset(cancelling) -> None:
    """The floor measured for an emulated target goes to its runtime entry, not to x86's fields."""
    model, x, _, _ = cancelling
    report, floor = _x86_passing_report(model, x)
    assert judge_output(report, floor, 0, report.outputs[0].int8_vs_qat.cosine, "") is None
    verdict = judge_output(report, floor, 0, 0.99, "", on="on arm64-a76, ", strict=0.99)
    assert verdict is not None and verdict["float32_floor"] > 0.999 and verdict["at_float32_floor"] is False
    assert report.float32_floor is None and report.outputs[0].float32_floor is None
    report.runtime["arm64-a76"] = {"emulated": True, "profile": "A76", "int8_vs_qat": {"cosine": 0.99, "top1_agreement": None},
                                   "float32_floor": verdict["float32_floor"]}
    lines = report.summary().splitlines()
    x86 = [ln for ln in lines if ln.startswith("  ncnn int8 vs PyTorch QAT:")]
    a76 = [ln for ln in lines if "on arm64-a76" in ln and ln.startswith("  ncnn int8")]
    assert len(x86) == 1 and "float32 floor" not in x86[0], x86
    assert len(a76) == 1 and f"cosine 0.990000 (float32 floor {verdict['float32_floor']:.6f})" in a76[0], a76


def test_default_options_are_judged_on_their_own_below_099(cancelling) -> None:
    """Strict at the floor, default far below: a note of the strict figure, a warning of the default."""
    model, x, _, _ = cancelling
    report, floor = _x86_passing_report(model, x)
    # default options within the runtime's approximations (>= 0.99), strict fine: nothing to judge
    assert judge_output(report, floor, 0, 0.995, "", on="on arm64-a76, ", strict=0.99995) is None
    assert not floor.measured and not report.warnings and not report.notes
    f = floor.cosines()[0]
    strict = 1 - 0.9 * (1 - f)  # at the floor
    verdict = judge_output(report, floor, 0, 0.5, "", on="on arm64-a76, ", strict=strict)
    assert verdict == {"float32_floor": f, "at_float32_floor": True, "default_options_ok": False}
    (note,) = [n for n in report.notes if "at the float32 floor" in n]
    assert f"is {strict:.6f} with fp16 storage/arithmetic and packed kernels off, below" in note
    assert "0.500000" not in note  # the note is of the figure at the floor only
    (warning,) = report.warnings
    assert warning.startswith("on arm64-a76, int8 output cosine with the QAT model is only 0.500000 under default")
    assert f"{strict:.6f}" in warning and f"{MIN_DEFAULT_OPTIONS_COSINE}" in warning
    # default below the bar but above 0.99: the note names it as the runtime's approximation, no warning
    report.notes.clear(), report.warnings.clear()
    verdict = judge_output(report, floor, 0, 0.995, "", on="on arm64-a76, ", strict=strict)
    assert verdict["default_options_ok"] and not report.warnings
    assert report.notes[0].endswith("; under default options it is 0.995000: the runtime's own approximation")


def test_approximation_note_needs_a_material_gap() -> None:
    assert not approximation_gap(0.999999, 1.0)  # 1e-6: fp16 storage on a well-conditioned model
    assert approximation_gap(0.999953, 0.999997)  # README: trained ResNet-18 on Cortex-A76
    assert approximation_gap(0.0, 0.999711)
    assert approximation_gap(0.99989, 0.999905)  # below the bar only under default options
    assert not approximation_gap(0.999895, 0.999901)  # crosses the bar by less than the gap floor
    assert not approximation_gap(0.9990, 0.9994)  # material, but not over twice the strict error


def test_no_approximation_note_for_a_negligible_gap(tmp_path) -> None:
    """A well-conditioned model on x86: default options a hair below strict, no note about it."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    model = _qat(MixedNet(), x)
    report = export(model, tmp_path, x[:1], x, verbose=False, targets="x86", timing_runs=0, check_onnx=False)
    d, s = report.runtime["x86"]["int8_vs_qat"]["cosine"], report.runtime["x86"]["int8_vs_qat_strict"]["cosine"]
    assert (1 - d) > 2 * (1 - s) > 0 or (1 - d) > 0 == (1 - s) or s > d  # the old rule would have noted it
    assert s - d < 1e-5
    assert not [n for n in report.notes if "int8 vs QAT cosine is" in n], report.notes


def test_near_ties_are_no_excuse_for_a_failing_output(cancelling) -> None:
    """A broken classifier output: its own noise makes every flip a 'near-tie'; still a warning."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(16, 3, 16, 16)
    model = _qat(MixedNet(), x)
    io = model_io(model, x[:1])
    q_ref = torch_outputs(model, io, [x])
    broken = np.random.default_rng(0).normal(0, 10 * q_ref[0].std(), q_ref[0].shape).astype(np.float32)
    a = agreement(q_ref[0], broken, True)
    assert a.cosine < 0.5 and a.top1_flips > 0 and a.top1_agreement_beyond_noise >= 0.995  # all "near-ties"
    report = ExportReport("unused", outputs=[OutputParity("out0", "", int8_vs_qat=a)], int8_vs_qat=a)
    report.runtime = {"x86": {}}
    judge(report, Float32Floor(model, io, [x], q_ref))
    assert not [n for n in report.notes if "near-ties" in n], report.notes
    assert [w for w in report.warnings if w.startswith("int8 top-1 agreement") and "fails too" in w], report.warnings
    assert "within the int8 noise" not in report.summary()


@pytest.mark.skipif(not _arm("arm64-a76"), reason="arm64-a76 emulation not set up (python -m lightning_ncnnqat.ncnn.targets setup-arm)")
def test_a76_default_options_far_below_the_floor_is_warned(cancelling, tmp_path) -> None:
    """Cortex-A76 stores the conv outputs (~3e4) in fp16: the cancellation is lost under default
    options while the strict run sits at the floor. (The export's float32-blob feature mask,
    ncnn/fp32_blobs.py, prevents that: it is stripped here to reach the default-options verdict.)"""
    model, x, out, rep = cancelling
    shutil.copytree(out, tmp_path / "fp16")
    (tmp_path / "fp16" / "model.int8.param").write_text(strip_fp32_blobs((out / "model.int8.param").read_text()))
    report, entry = _measured_on((model, x, tmp_path / "fp16", rep), "arm64-a76")
    d, s, f = entry["int8_vs_qat"]["cosine"], entry["int8_vs_qat_strict"]["cosine"], entry["float32_floor"]
    assert d < MIN_DEFAULT_OPTIONS_COSINE and at_floor(s, f) and not at_floor(d, f)
    assert entry["outputs"][0]["at_float32_floor"] and not entry["outputs"][0]["default_options_ok"]
    (note,) = [n for n in report.notes if n.startswith("on arm64-a76, int8 output cosine")]
    assert f"is {s:.6f} with fp16" in note and "at the float32 floor" in note and f"{d:.6f}" not in note
    (warning,) = [w for w in report.warnings if w.startswith("on arm64-a76, int8 output cosine")]
    assert f"only {d:.6f} under default options, {s:.6f}" in warning
    assert f"cosine {d:.6f} ({s:.6f} with fp16 and packing off; float32 floor {f:.6f})" in report.summary()
