"""The board profile (issue 20, item 3): time an export's models and layers on the board, read it back.

``python -m lightning_ncnnqat.ncnn.targets profile`` runs where the model deploys (ncnn wheel and
numpy, no torch); ``board_profile.py`` also runs copied alone. Here it runs on this machine and,
for its mechanics only, under the emulated Cortex-A53 / A76 (whose times the reader refuses to
call speeds). The emulated tests skip without ``bash scripts/setup_arm.sh``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_ncnnqat import QATConfig, export, prepare_qat
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.ncnn.targets import SETUP_COMMAND, environment_problem, worker_command
from lightning_ncnnqat.ncnn.targets import board_profile
from lightning_ncnnqat.ncnn.targets import profile as reader
from lightning_ncnnqat.ncnn.targets.profile import EmulatedProfileError, ProfileError, attach_profile, load_profile

_problem = environment_problem()
if _problem is not None and os.environ.get("LIGHTNING_NCNNQAT_REQUIRE_ARM") == "1":
    raise RuntimeError(f"LIGHTNING_NCNNQAT_REQUIRE_ARM=1 but {_problem}")
needs_arm = pytest.mark.skipif(_problem is not None, reason=f"{_problem}; run `{SETUP_COMMAND}`")


def _plain() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 5))  # fmt: skip


class _Grouped(nn.Module):
    """A grouped conv kept float and a residual add: float layers between int8 ones."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 16, 3, padding=1)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        y = torch.relu(self.g(y)) + y
        return self.fc(y.mean((2, 3)))


MODELS = {"plain": (_plain, (3, 8, 8), None), "grouped": (_Grouped, (1, 16, 16), QATConfig(quantize_grouped_convs=False))}


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    make, shape, cfg = MODELS[request.param]
    model = make().train()
    x = torch.randn(16, *shape)
    prepare_qat(model, x[:1], cfg)
    with torch.no_grad():
        for _ in range(3):
            model(x)
    model.eval()
    out = tmp_path_factory.mktemp(f"profile_{request.param}")
    export(model, out, x[:1], x, verbose=False, timing_runs=0, layer_check_samples=1, targets="x86", check_onnx=False)
    return out


def _layer_names(d: Path) -> set[str]:
    return {lay.name for lay in NcnnParam.parse((d / "model.int8.param").read_text()).layers if lay.type != "Input"}


def test_writer_and_reader_agree_on_the_format() -> None:
    assert (board_profile.FORMAT, board_profile.VERSION) == (reader.FORMAT, reader.VERSION)
    assert board_profile._FP32_BLOBS == 3  # ncnn/fp32_blobs.FP32_BLOBS, repeated: the script runs alone


def test_profile_here_imports_no_torch_and_reads_back(exported: Path, tmp_path: Path) -> None:
    out = tmp_path / "here.json"
    code = ("import sys; from lightning_ncnnqat.ncnn.targets.cli import main; "
            f"rc = main(['profile', {str(exported)!r}, '-o', {str(out)!r}, '--runs', '2', '--warmup', '0']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[EMULATED" not in proc.stdout and "int8 with fp16 blobs" in proc.stdout
    prof = load_profile(out)
    assert not prof.emulated and prof.evidence == ()
    assert prof.threads[0] == 1 and prof.device["machine"] == "x86_64"
    layers = prof.layer_ms(1)
    assert set(layers) == _layer_names(exported)
    assert all(q >= 0 and f >= 0 for q, f in layers.values()) and any(q > 0 for q, _ in layers.values())
    m = prof.model_ms(prof.threads[-1])
    assert set(m) == {"float", "int8", "int8_fp16_blobs"} and all(v > 0 for v in m.values())
    rows = prof.speed_summary()["threads"]
    assert set(rows) == {str(n) for n in prof.threads}
    assert rows["1"]["speedup"] == pytest.approx(rows["1"]["float_ms"] / rows["1"]["int8_ms"])


@needs_arm
@pytest.mark.parametrize("target", ["arm64-a53", "arm64-a76"])
def test_profile_copied_alone_runs_emulated_and_is_never_a_speed(exported: Path, tmp_path: Path, target: str) -> None:
    script = tmp_path / "board_profile.py"
    shutil.copy(board_profile.__file__, script)  # alone: no package on the guest's path
    argv, env = worker_command(target)
    out = tmp_path / f"{target}.json"
    proc = subprocess.run([*argv, str(script), str(exported), "-o", str(out), "--runs", "1", "--warmup", "0", "--threads", "1"],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[EMULATED: not a speed]" in proc.stdout
    prof = load_profile(out)
    assert prof.emulated and any("QEMU_CPU" in e for e in prof.evidence)
    assert prof.device["machine"] == "aarch64"
    assert prof.device["cpu_features"]["arm_asimdhp"] == (1 if target == "arm64-a76" else 0)
    with pytest.raises(EmulatedProfileError, match="emulation.*not\n?.*speed"):
        prof.layer_ms(1)
    with pytest.raises(EmulatedProfileError):
        prof.model_ms(1)
    assert set(prof.layer_ms(1, allow_emulated=True)) == _layer_names(exported)  # the mechanics work
    summary = prof.speed_summary()
    assert summary["emulated"] and "threads" not in summary
    attach_profile(exported, out)
    deploy = (exported / "DEPLOY.md").read_text()
    section = deploy[deploy.index("<!-- board-profiles -->"):]
    assert "emulation" in section and " ms" not in section  # no emulated time shown
    assert any(b["emulated"] for b in json.loads((exported / "report.json").read_text())["board_profiles"])


def _valid(tmp_path: Path) -> dict:
    return {
        "format": reader.FORMAT, "version": reader.VERSION, "label": "", "emulated": False, "emulation_evidence": [],
        "device": {"machine": "aarch64", "cpu_count": 4, "ncnn_version": "1.0"}, "threads": [1],
        "results": {"1": {"float": {"model_ms": 2.0, "layers": {"conv": {"type": "Convolution", "ms": 1.5}}},
                          "int8": {"model_ms": 1.0, "layers": {"conv": {"type": "Convolution", "ms": 0.5}}}}},
    }  # fmt: skip


def _set(d: dict, path: str, value: object) -> None:
    *head, last = path.split(".")
    for k in head:
        d = d[k]
    if value is KeyError:
        del d[last]
    else:
        d[last] = value


@pytest.mark.parametrize(
    "path, value, field",
    [
        ("results.1.int8.model_ms", KeyError, "results.1.int8.model_ms"),
        ("results.1.int8.model_ms", "fast", "results.1.int8.model_ms"),
        ("results.1.float.model_ms", -1.0, "results.1.float.model_ms"),
        ("results.1.int8.layers.conv.ms", math.nan, "results.1.int8.layers.conv.ms"),
        ("results.1.int8.layers.conv.type", 3, "results.1.int8.layers.conv.type"),
        ("results.1", KeyError, "results.1"),
        ("emulated", "no", "emulated"),
        ("threads", [], "threads"),
        ("threads", [1, True], "threads"),
        ("format", "something.else", "format"),
        ("version", 2, "version"),
        ("device", KeyError, "device"),
    ],
)
def test_malformed_profile_names_the_file_and_field(tmp_path: Path, path: str, value: object, field: str) -> None:
    d = _valid(tmp_path)
    _set(d, path, value)
    f = tmp_path / "board.json"
    f.write_text(json.dumps(d))
    with pytest.raises(ProfileError) as e:
        load_profile(f)
    assert str(f) in str(e.value) and f"'{field}'" in str(e.value), str(e.value)
    assert e.value.argument == field


def test_valid_profile_gives_plain_numbers(tmp_path: Path) -> None:
    f = tmp_path / "board.json"
    f.write_text(json.dumps(_valid(tmp_path)))
    prof = load_profile(f)
    assert prof.layer_ms(1) == {"conv": (0.5, 1.5)}
    assert prof.model_ms(1) == {"float": 2.0, "int8": 1.0}
    with pytest.raises(ProfileError, match=r"no times at 4 thread\(s\) \(measured: \[1\]\)"):
        prof.layer_ms(4)


@pytest.mark.parametrize("content, what", [("{not json", "not JSON"), ("[1, 2]", "must be a JSON object")])
def test_unreadable_profile(tmp_path: Path, content: str, what: str) -> None:
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(ProfileError, match=what) as e:
        load_profile(f)
    assert str(f) in str(e.value)
    with pytest.raises(ProfileError, match="cannot be read"):
        load_profile(tmp_path / "absent.json")


def test_attach_refuses_a_profile_of_another_model(exported: Path, tmp_path: Path) -> None:
    d = _valid(tmp_path)
    d["models"] = {"int8": {"file": "model.int8.param", "sha256": "0" * 64}}
    f = tmp_path / "other.json"
    f.write_text(json.dumps(d))
    with pytest.raises(ProfileError, match="models.int8.sha256.*another int8"):
        attach_profile(exported, f)


def test_attach_shows_board_speed_and_says_when_int8_does_not_pay(exported: Path, tmp_path: Path) -> None:
    """A real-device profile of this export (int8 slower than float at 4 threads): DEPLOY.md and
    report.json show it; attaching again replaces the section instead of adding a second."""
    d = _valid(tmp_path)
    d["label"] = "RK3588 (A76 cores)"
    d["threads"] = [1, 4]
    d["results"]["4"] = {"float": {"model_ms": 0.8, "layers": {}}, "int8": {"model_ms": 1.2, "layers": {}},
                         "int8_fp16_blobs": {"model_ms": 1.1, "layers": {}}}  # fmt: skip
    d["models"] = {"int8": {"sha256": hashlib.sha256((exported / "model.int8.param").read_bytes()).hexdigest()}}
    f = tmp_path / "rk3588.json"
    f.write_text(json.dumps(d))
    for _ in range(2):
        summary = attach_profile(exported, f)
    assert summary["threads"]["4"]["speedup"] == pytest.approx(0.8 / 1.2)
    deploy = (exported / "DEPLOY.md").read_text()
    assert deploy.count("<!-- board-profiles -->") == 1
    section = deploy[deploy.index("<!-- board-profiles -->"):]
    line1 = next(ln for ln in section.splitlines() if "RK3588" in ln and "1 thread" in ln)
    line4 = next(ln for ln in section.splitlines() if "RK3588" in ln and "4 thread" in ln)
    assert "float 2.000 ms, int8 1.000 ms (2.00x)" in line1 and "does not pay" not in line1
    assert "float 0.800 ms, int8 1.200 ms (0.67x)" in line4 and "int8 does not pay on this board" in line4
    assert "fp16 blobs (feature mask removed) 1.100 ms" in line4
    boards = json.loads((exported / "report.json").read_text())["board_profiles"]
    assert any(b["device"].startswith("RK3588") and not b["emulated"] for b in boards)
    assert (exported / "profiles" / "rk3588.json").is_file()


def test_board_layer_speeds_feed_the_keep_float_rule(tmp_path: Path) -> None:
    from lightning_ncnnqat.speed.board import board_layer_speeds
    from lightning_ncnnqat.speed.decide import layers_to_keep_float

    d = _valid(tmp_path)
    d["results"]["1"]["float"]["layers"]["dw"] = {"type": "ConvolutionDepthWise", "ms": 0.2}
    d["results"]["1"]["int8"]["layers"]["dw"] = {"type": "ConvolutionDepthWise", "ms": 0.6}  # int8 3x slower
    f = tmp_path / "board.json"
    f.write_text(json.dumps(d))
    speeds = board_layer_speeds(f, {"features.0": "conv", "features.1": "dw", "head": "not_timed"})
    assert list(speeds) == ["features.0", "features.1"]
    assert (speeds["features.1"].int8_ms, speeds["features.1"].float_ms, speeds["features.1"].kind) == (0.6, 0.2, "ConvolutionDepthWise")
    assert layers_to_keep_float(speeds) == ["features.1"]
    with pytest.raises(ProfileError, match="none of the model's int8 layers") as e:
        board_layer_speeds(f, {"x": "other_conv"})
    assert str(f) in str(e.value)
    d["emulated"], d["emulation_evidence"] = True, ["environment variable QEMU_CPU is set"]
    f.write_text(json.dumps(d))
    with pytest.raises(EmulatedProfileError, match="QEMU_CPU"):
        board_layer_speeds(f, {"features.0": "conv"})
