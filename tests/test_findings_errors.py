"""Errors keep what they carry, and only runtime failures become report entries.

A step failure names the layer the exception carries (never one guessed from its text); the
export's checks are chosen by :class:`Checks`, not by a key in a dict; an emulated or host ncnn
run that crashes or fails is a finding, while a fault in our own code propagates.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_ncnnqat import prepare_qat
from lightning_ncnnqat.conversion.model_io import model_io, torch_outputs
from lightning_ncnnqat.errors import DivergedError, ExportError, LayerError
from lightning_ncnnqat.export.api import preflight_export
from lightning_ncnnqat.export.steps import Checks, step
from lightning_ncnnqat.export import export
from lightning_ncnnqat.ncnn.bin_layout import NcnnFormatError
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.verification.output_floor import Float32Floor
from lightning_ncnnqat.verification.report import ExportReport
from lightning_ncnnqat.verification.runtime_checks import ModelFiles, blob_names
from lightning_ncnnqat.verification.targets import target_parity


def _raised_in_step(exc: BaseException) -> ExportError:
    with pytest.raises(ExportError) as info:
        with step("int8"):
            raise exc
    assert info.value.step == "int8" and info.value.__cause__ is exc
    return info.value


def test_a_malformed_ncnn_layer_is_named_from_the_error_it_raises() -> None:
    with pytest.raises(ExportError) as info:
        with step("pnnx"):
            NcnnParam.parse("7767517\n2 2\nInput in 0 1 x\nConvolution c1 1 1 x\n")  # lists one blob of two
    assert info.value.layer == "c1" and isinstance(info.value.__cause__, NcnnFormatError)
    assert "NcnnFormatError" in info.value.message and "declares 1 inputs and 1 outputs" in info.value.message


@pytest.mark.parametrize(
    "exc, layer",
    [
        (LayerError("block.conv", "layer 'block.conv': its folded weight contains NaN"), "block.conv"),
        (DivergedError("its input range became nan", layer="stem.0"), "stem.0"),  # the text names no layer
        (NcnnFormatError("param 3 is an array", layer="conv_7"), "conv_7"),
    ],
)
def test_an_exception_carrying_a_layer_keeps_it(exc: Exception, layer: str) -> None:
    assert _raised_in_step(exc).layer == layer


def test_a_layer_is_not_guessed_from_an_exception_text() -> None:
    e = _raised_in_step(ValueError("layer 'not.this' is only mentioned"))
    assert e.layer is None and e.message == "ValueError: layer 'not.this' is only mentioned"


def test_checks_name_their_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        Checks("layers_only")  # type: ignore[arg-type]
    assert Checks().full and not Checks("layers").full and Checks(timing_runs=5).without_timing().timing_runs == 0


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def qat_net() -> tuple[nn.Module, torch.Tensor]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    model = _Net()
    prepare_qat(model, x[:1])
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval(), x


def test_the_preflight_modes_run_what_they_say(qat_net) -> None:  # noqa: ANN001
    model, x = qat_net
    files_only = preflight_export(model, x[:1])
    assert files_only.runtime == {} and files_only.conversion.get("faithful") is True and not files_only.files
    layers = preflight_export(model, x[:1], targets=["x86"])
    assert layers.runtime == {"wrong_layers": {"x86": {}}} and not layers.files  # every layer right, no report.json


@pytest.fixture(scope="module")
def exported(qat_net, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    model, x = qat_net
    out = tmp_path_factory.mktemp("narrow")
    export(model, out, x[:1], x, verbose=False, targets="x86", timing_runs=0, check_onnx=False)
    return out


def _target_run(model: nn.Module, x: torch.Tensor, d: Path, q_ref: list) -> ExportReport:  # noqa: ANN001
    io = model_io(model, x[:1])
    param = NcnnParam.parse((d / "model.int8.param").read_text())
    files = ModelFiles(d, param, *blob_names(param, io))
    report = ExportReport(str(d))
    target_parity(report, files, "x86", {b: t.numpy() for b, t in zip(files.input_blobs, [x])}, q_ref, [x], [], None, {},
                   Float32Floor(model, io, [x], q_ref))
    return report


def test_a_failing_ncnn_run_is_a_warning_with_the_error(qat_net, exported, tmp_path: Path) -> None:  # noqa: ANN001
    model, x = qat_net
    shutil.copytree(exported, tmp_path, dirs_exist_ok=True)
    (tmp_path / "model.int8.bin").write_bytes(b"\0" * 8)  # truncated: ncnn cannot load it
    q_ref = torch_outputs(model, model_io(model, x[:1]), [x])
    report = _target_run(model, x, tmp_path, q_ref)
    (f,) = [f for f in report.findings if f.code == "target_run_failed"]
    assert f.severity == "warning" and f.message in report.warnings and report.runtime["x86"]["error"]


def test_a_fault_of_ours_on_a_target_propagates(qat_net, exported) -> None:  # noqa: ANN001
    model, x = qat_net
    q_ref = [r[:, :2] for r in torch_outputs(model, model_io(model, x[:1]), [x])]  # a reference of the wrong size
    with pytest.raises(ValueError, match="shapes differ"):
        _target_run(model, x, exported, q_ref)
