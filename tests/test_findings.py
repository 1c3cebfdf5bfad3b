"""Verdicts as findings: policy's rules return them from measured figures, one place renders them.

The rule tests feed figures of the kinds the export measures (an output cosine, a floor, top-1
flips, a per-layer check); the measured test damages a real int8 model's weight scale and
judges what ncnn then computes; the rendering tests check report.json and the printed summary.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import FrozenInstanceError
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_ncnnqat import policy, prepare_qat
from lightning_ncnnqat.conversion.model_io import model_io
from lightning_ncnnqat.export import export
from lightning_ncnnqat.ncnn.bin_layout import locate
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.policy import (
    MAX_ONNX_REL_ERR,
    MIN_DEFAULT_OPTIONS_COSINE,
    MIN_LAYER_COSINE,
    MIN_OUTPUT_COSINE,
    MIN_TOP1_AGREEMENT,
    Finding,
)
from lightning_ncnnqat.policy.findings import note
from lightning_ncnnqat.qat.prepared import folded_float_model
from lightning_ncnnqat.verification.layer_checks import LayerCheck
from lightning_ncnnqat.verification.report import ExportReport
from lightning_ncnnqat.verification.runtime_checks import ModelFiles, blob_names, measure
from lightning_ncnnqat.verification.verdicts import render


# ---- the rules: figures in, findings out -----------------------------------------------------


@pytest.mark.parametrize("cos", [0.5, 0.99, 0.99985])
def test_an_output_below_the_bar_without_a_floor_is_a_warning_with_value_and_bar(cos: float) -> None:
    verdict = policy.judge_output(cos, None)
    (f,) = verdict.findings
    assert (f.severity, f.code, f.value, f.bar, f.layer) == ("warning", "output_below_bar", cos, MIN_OUTPUT_COSINE, None)
    assert f"{cos:.6f}" in f.message and verdict.float32_floor is None and verdict.at_float32_floor is None


def test_an_output_at_the_bar_needs_no_floor_and_gives_nothing() -> None:
    assert not policy.needs_floor(MIN_OUTPUT_COSINE) and policy.judge_output(MIN_OUTPUT_COSINE, None) is None
    assert policy.judge_output(0.999999, 0.5) is None  # a floor, if any, is not needed


def test_an_output_at_its_float32_floor_is_a_note_beyond_it_a_warning() -> None:
    floor = 0.9990  # the QAT model itself: float32 vs float64
    at = policy.judge_output(0.9985, floor)  # 1.5e-3 <= 3 x 1e-3
    (n,) = at.findings
    assert (n.severity, n.code, n.value, n.bar) == ("note", "output_at_float32_floor", 0.9985, MIN_OUTPUT_COSINE)
    assert at.at_float32_floor is True and f"{floor:.6f}" in n.message
    beyond = policy.judge_output(0.99, floor)  # 1e-2 > 3 x 1e-3
    (w,) = beyond.findings
    assert (w.severity, w.code) == ("warning", "output_below_bar") and beyond.at_float32_floor is False
    assert "beyond the QAT model's float32 floor" in w.message


def test_default_options_far_below_a_right_strict_figure_are_judged_on_their_own() -> None:
    verdict = policy.judge_output(0.95, None, on="on arm64-a76, ", strict=0.999995)
    (w,) = verdict.findings
    assert (w.code, w.value, w.bar) == ("default_options_below_bar", 0.95, MIN_DEFAULT_OPTIONS_COSINE)
    assert w.message.startswith("on arm64-a76, ") and verdict.default_options_ok is False
    assert verdict.as_dict(strict_judged=True) == {"float32_floor": None, "at_float32_floor": None, "default_options_ok": False}
    # within the runtime's usual approximation (>= 0.99) and strict fine: nothing to say
    assert policy.judge_output(0.995, None, strict=0.999995) is None


def _top1(agree: float, beyond: float, flips: int, ties: int, cos: float) -> SimpleNamespace:
    return SimpleNamespace(cosine=cos, top1_agreement=agree, top1_agreement_beyond_noise=beyond,
                           top1_flips=flips, near_tie_flips=ties, noise_rms=0.01)


def test_top1_flips_that_are_near_ties_are_a_note_unless_the_output_fails() -> None:
    (n,) = policy.judge_top1(_top1(0.98, 1.0, 2, 2, 0.99995), None)
    assert (n.severity, n.code, n.value, n.bar) == ("note", "top1_near_ties", 0.98, MIN_TOP1_AGREEMENT)
    (w,) = policy.judge_top1(_top1(0.98, 1.0, 2, 2, 0.5), None)  # the noise itself is the defect
    assert (w.severity, w.code) == ("warning", "top1_below_bar") and "fails too" in w.message
    (w,) = policy.judge_top1(_top1(0.9, 0.95, 10, 5, 0.99995), None)
    assert "5 of 10 flips are beyond the int8 noise" in w.message
    assert policy.judge_top1(_top1(0.999, 0.999, 1, 0, 0.99995), None) == []
    assert policy.judge_top1(_top1(None, None, 0, 0, 0.5), None) == []  # not class scores


def _check(name: str, cos: float, rel: float, **kw) -> LayerCheck:  # noqa: ANN003
    ok = policy.layer_ok(cos, rel)
    return LayerCheck(name, f"n_{name}", cos, rel, cos, rel, kw.pop("ok", ok), **kw)


def test_layer_rules_name_the_layer_with_its_figure_and_bar() -> None:
    assert policy.layer_ok(0.9995, 0.01) and not policy.layer_ok(0.9985, 0.01) and not policy.layer_ok(0.9999, 0.2)
    checks = [
        _check("good", 0.99999, 0.004, int8_step_mismatch=0.02, int8_step_mismatch_without_packing=0.0),
        _check("bad", 0.42, 0.9, ok_without_packing=True),
        _check("garbage", float("nan"), float("nan"), ok=None),
    ]
    found = policy.host_layer_findings(checks)
    assert [(f.severity, f.code, f.layer) for f in found] == [
        ("note", "layer_int8_steps_off", "good"), ("warning", "layer_wrong", "bad"), ("warning", "layer_not_judged", "garbage"),
    ]
    assert found[1].value == 0.42 and found[1].bar == MIN_LAYER_COSINE and "use_packing_layout = False" in found[1].message
    (t,) = policy.target_layer_findings("arm64-a53", "Cortex-A53", checks)
    assert t.layer == "bad" and "on arm64-a53 (Cortex-A53)" in t.message
    approx = _check("fp16", 0.9995, 0.08, runtime_approximation=True)
    (a,) = policy.approximation_notes("arm64-a76", [approx, checks[0]])
    assert (a.severity, a.code, a.layer) == ("note", "layer_runtime_approximation", "fp16") and "8.0%" in a.message


def test_onnx_check_bar_scales_with_the_output() -> None:
    assert policy.judge_onnx("onnxruntime", 5e-4, 0.1) == []  # within 1e-3 of 1
    (w,) = policy.judge_onnx("onnxruntime", 5e-3, 2.0)  # beyond 1e-3 of 2
    assert (w.code, w.value, w.bar) == ("onnx_differs", 5e-3, MAX_ONNX_REL_ERR * 2.0)
    assert policy.judge_onnx("onnxruntime", 5e-3, 10.0) == []


def test_a_finding_is_frozen_and_checked() -> None:
    f = note("x", "a fact")
    with pytest.raises(FrozenInstanceError):
        f.message = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="severity"):
        Finding(severity="error", code="x", message="m")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="code"):
        Finding(severity="note", code="", message="m")


# ---- rendering: the one place findings reach report.json and the summary -----------------------


def test_rendering_files_notes_and_warnings_in_order_and_once_where_asked(tmp_path: Path) -> None:
    report = ExportReport(str(tmp_path))
    w = policy.judge_output(0.5, None).findings[0]
    n = policy.floor_not_measured("RuntimeError: no float64 kernel")
    render(report, [n, w, n])  # the floor note is said once however often its rule fires
    assert report.warnings == [w.message] and report.notes == [n.message] and report.findings == [n, w]
    d = report.to_dict()
    assert d["warnings"] == [w.message] and d["notes"] == [n.message] and "findings" not in d
    summary = report.summary()
    assert f"  WARNING: {w.message}" in summary and f"  note: {n.message}" in summary
    assert json.loads(json.dumps(d))["warnings"] == [w.message]


# ---- a measured figure judged: a damaged int8 model ------------------------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, torch.Tensor, Path, ExportReport]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    model = _Net()
    prepare_qat(model, x[:1])
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    model.eval()
    out = tmp_path_factory.mktemp("findings")
    report = export(model, out, x[:1], x, verbose=False, targets="x86", timing_runs=0, check_onnx=False)
    return model, x, out, report


def test_a_right_export_renders_every_finding_it_made(exported) -> None:  # noqa: ANN001
    _, _, out, report = exported
    saved = json.loads((out / "report.json").read_text())
    assert [f.message for f in report.findings if f.severity == "warning"] == [
        w for w in saved["warnings"] if w in {f.message for f in report.findings}
    ]
    assert not [f for f in report.findings if f.code in ("output_below_bar", "layer_wrong")], report.findings


@pytest.mark.parametrize("factor", [1.5, 0.25])
def test_a_damaged_int8_output_is_a_finding_rendered_into_report_and_summary(exported, tmp_path: Path, factor: float) -> None:  # noqa: ANN001
    model, x, out, _ = exported
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    param = NcnnParam.parse((tmp_path / "model.int8.param").read_text())
    data = bytearray((tmp_path / "model.int8.bin").read_bytes())
    layer = next(lay.name for lay in param.layers if lay.type == "Convolution")
    scales = next(e for e in dict(zip((lay.name for lay in param.layers), locate(param.layers, bytes(data))))[layer]
                  if e.role == "weight_scales")
    for k in range(scales.count):  # every output channel's weight scale off by `factor`
        (v,) = struct.unpack_from("<f", data, scales.offset + 4 * k)
        struct.pack_into("<f", data, scales.offset + 4 * k, v * factor)
    (tmp_path / "model.int8.bin").write_bytes(bytes(data))
    io = model_io(model, x[:1])
    files = ModelFiles(tmp_path, param, *blob_names(param, io))
    report = ExportReport(str(tmp_path))
    measure(report, files, model, folded_float_model(model), io, [x], [], {}, 1, 0, None)
    cos = report.int8_vs_qat.cosine
    assert cos < MIN_OUTPUT_COSINE  # a wrong scale moves the output
    (f,) = [f for f in report.findings if f.code == "output_below_bar"]
    assert f.severity == "warning" and f.value == cos and f.bar == MIN_OUTPUT_COSINE and f.layer is None
    assert f.message in report.to_dict()["warnings"] and f"WARNING: {f.message}" in report.summary()
    assert f"{cos:.6f}" in f.message and report.float32_floor is not None  # judged against the measured floor
