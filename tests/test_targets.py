"""Emulated ARM64 targets: the real aarch64 ncnn under qemu (Cortex-A53 and Cortex-A76 profiles).

With the environment present (``bash scripts/setup_arm.sh``), a small QAT model's int8 export
runs on each profile through the export's worker and agrees with x86, and ncnn sees the CPU
features of each core. Without it, asking for a target raises TargetUnavailable naming the
set-up command. Set LIGHTNING_NCNNQAT_REQUIRE_ARM=1 to fail instead of skipping when absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lightning_ncnnqat import export, prepare_qat
from lightning_ncnnqat.ncnn.isolated import run_ncnn
from lightning_ncnnqat.ncnn.targets import (
    HOME_ENV,
    PROFILES,
    SETUP_COMMAND,
    TargetUnavailable,
    available_targets,
    environment_problem,
    worker_command,
)
from lightning_ncnnqat.ncnn.targets.arm_env import host_ncnn_version
from lightning_ncnnqat.ncnn.targets.check import probe_hwcaps, run_check

ARM = sorted(PROFILES)
_problem = environment_problem()
if _problem is not None and os.environ.get("LIGHTNING_NCNNQAT_REQUIRE_ARM") == "1":
    raise RuntimeError(f"LIGHTNING_NCNNQAT_REQUIRE_ARM=1 but {_problem}")
needs_arm = pytest.mark.skipif(_problem is not None, reason=f"{_problem}; run `{SETUP_COMMAND}`")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ------------------------------------------------------------------------------ environment absent


def test_absent_environment_raises_with_the_setup_command(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "empty"))
    assert available_targets() == []
    for target in ARM:
        with pytest.raises(TargetUnavailable, match="python -m lightning_ncnnqat.ncnn.targets setup") as e:
            worker_command(target)
        assert target in str(e.value) and str(tmp_path / "empty") in str(e.value)
    # the export's runner passes it on unchanged (nothing is started)
    with pytest.raises(TargetUnavailable, match="not set up"):
        run_ncnn(tmp_path / "m.param", tmp_path / "m.bin", {"in0": np.ones((1, 3), np.float32)}, ["out0"], target=ARM[0])


def test_stale_environment_names_both_ncnn_versions(tmp_path: Path, monkeypatch) -> None:
    home = tmp_path / "arm"
    home.mkdir()
    (home / "stamp.json").write_text('{"format": 1, "ncnn": "0.0.1"}')
    monkeypatch.setenv(HOME_ENV, str(home))
    with pytest.raises(TargetUnavailable, match=r"ncnn 0\.0\.1, the host has ncnn \d") as e:
        worker_command("arm64-a76")
    assert SETUP_COMMAND in str(e.value)


def test_unknown_target_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="arm64-a53.*'arm64-a77'"):
        worker_command("arm64-a77")


# ------------------------------------------------------------------------------ environment present


@needs_arm
def test_guest_imports_only_its_own_python_and_site() -> None:
    import subprocess

    argv, env = worker_command("arm64-a53")
    code = "import sys, platform, numpy, ncnn; print(platform.machine()); print(numpy.__file__); print(ncnn.__file__); print(*sys.path, sep='\\n')"
    out = subprocess.run([*argv, "-c", code], check=False, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[0] == "aarch64"
    home = env["PYTHONPATH"].rsplit("/", 1)[0]
    assert all(p.startswith(home) for p in lines[1:]), lines  # no host site-packages


@needs_arm
def test_cpu_features_differ_per_profile() -> None:
    a53, a76 = run_check("arm64-a53"), run_check("arm64-a76")
    assert a53.ok and a76.ok, (a53.error, a76.error)
    for r in (a53, a76):
        assert r.info["machine"] == "aarch64"
        assert r.info["cpu_features"]["arm_neon"] == 1
        assert r.info["options"]["use_fp16_arithmetic"] is True  # ncnn's default on both
    assert a53.info["cpu_features"]["arm_asimdhp"] == 0
    assert a76.info["cpu_features"]["arm_asimdhp"] == 1
    # fp16 arithmetic shows in the A76 result only (the A53 one is float32-exact)
    assert a53.max_rel_err < 1e-5 < a76.max_rel_err < 1e-2
    caps53, caps76 = probe_hwcaps("arm64-a53"), probe_hwcaps("arm64-a76")
    assert caps53["asimddp"] == 0 and caps76["asimddp"] == 1 and caps76["asimdhp"] == 1


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        )  # fmt: skip
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean((2, 3)))


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    torch.manual_seed(0)
    model = SmallNet().train()
    prepare_qat(model, torch.randn(1, 3, 16, 16))
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 3, 16, 16))
    model.eval()
    held = torch.randn(8, 3, 16, 16)
    out = tmp_path_factory.mktemp("arm_export")
    export(model, out, held[:1], held, verbose=False, timing_runs=1, layer_check_samples=2, targets="x86")  # ARM runs below
    return out, held.numpy()


@needs_arm
@pytest.mark.parametrize(
    "stem, target",
    [("model.int8", "arm64-a53"), ("model.int8", "arm64-a76"), ("model.ncnn", "arm64-a76")],
)  # the float32 model on A76: ncnn's default fp16 arithmetic must stay within the bound too
def test_exported_model_on_a_profile_agrees_with_x86(small_export, stem: str, target: str) -> None:
    out, held = small_export
    param, binf = out / f"{stem}.param", out / f"{stem}.bin"
    host = run_ncnn(param, binf, {"in0": held}, ["out0"]).outputs["out0"]
    assert np.abs(host).max() > 0
    res = run_ncnn(param, binf, {"in0": held}, ["out0"], target=target)
    assert res.target == target and res.info["machine"] == "aarch64"
    got = res.outputs["out0"]
    assert got.shape == host.shape
    assert cosine(got, host) >= 0.9999, (target, stem, cosine(got, host))


@needs_arm
def test_setup_is_a_no_op_when_current(capsys) -> None:
    import time

    from lightning_ncnnqat.ncnn.targets.build import setup
    from lightning_ncnnqat.ncnn.targets.cli import main

    t0 = time.monotonic()
    stamp = setup()
    assert time.monotonic() - t0 < 5.0  # no apt, no pip: the stamp matches
    assert stamp["ncnn"] == host_ncnn_version()
    assert "up to date" in capsys.readouterr().out
    assert main(["where"]) == 0 and "ready" in capsys.readouterr().out


def test_where_fails_on_an_empty_home(tmp_path: Path, monkeypatch, capsys) -> None:
    from lightning_ncnnqat.ncnn.targets.cli import main

    monkeypatch.setenv(HOME_ENV, str(tmp_path))
    assert main(["where"]) == 1
    assert "not set up" in capsys.readouterr().out
    assert main(["check"]) == 1
    assert SETUP_COMMAND in capsys.readouterr().err


@needs_arm
def test_target_time_limit_skips_the_rest_of_that_target_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4))
    x = torch.randn(4, 3, 8, 8)
    prepare_qat(model, x[:1])
    model.train()
    model(x)
    model.eval()
    report = export(model, tmp_path / "e", example_input=x[:1], held_batch=x, verbose=False,
                    targets=["x86", "arm64-a53"], target_time_limit_s=0.001, timing_runs=0)
    assert report.int8_vs_qat is not None and report.int8_vs_qat.cosine > 0.999  # x86 has no limit
    assert "time limit of 0 s" in report.runtime["arm64-a53"]["error"]
    assert any("arm64-a53" in w and "time limit" in w for w in report.warnings)
    assert (tmp_path / "e" / "report.json").is_file() and (tmp_path / "e" / "model.int8.bin").is_file()


def test_target_time_limit_is_validated() -> None:
    with pytest.raises(ValueError, match=r"`target_time_limit_s` must be a number of seconds > 0 or None, got -5"):
        export(nn.Linear(2, 2), "unused", example_input=torch.randn(1, 2), target_time_limit_s=-5)
