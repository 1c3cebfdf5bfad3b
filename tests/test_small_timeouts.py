"""Child ncnn runs get a time limit sized to the model (``ncnn/isolated.py``: ``sized_timeout``):
a hang inside ncnn costs about a minute at QAT start instead of 900 s, and says so."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from lightning_ncnnqat.ncnn import isolated, timing
from lightning_ncnnqat.ncnn.isolated import EMULATED_SLOWDOWN, NcnnRuntimeError, run_ncnn, sized_timeout

pytest.importorskip("ncnn")

PARAM = "7767517\n2 2\nInput data 0 1 data 0=4 1=4 2=2\nReLU relu 1 1 data out\n"


def _model(tmp: Path, weight_bytes: int = 0) -> tuple[Path, Path]:
    (tmp / "m.param").write_text(PARAM)
    (tmp / "m.bin").write_bytes(b"\0" * weight_bytes)  # ReLU reads no weights: the size is what counts
    return tmp / "m.param", tmp / "m.bin"


def _sleeper(tmp: Path) -> Path:
    script = tmp / "sleeper.py"
    script.write_text("import time\ntime.sleep(120)\n")
    return script


def test_the_limit_grows_with_weights_samples_inputs_and_emulation(tmp_path) -> None:
    _, small = _model(tmp_path)
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (200 * 2**20))
    base = sized_timeout(small, 4)
    assert isolated.TIMEOUT_FLOOR_S < base < 90  # a small model: about a minute, not 900 s
    assert sized_timeout(small, 40) > base and sized_timeout(big, 4) > base + 30
    assert sized_timeout(small, 4, input_values=3 * 1024 * 1024) > base + 10  # a large image
    assert sized_timeout(small, 4, target="arm64-a53") == pytest.approx(base * EMULATED_SLOWDOWN)
    assert sized_timeout(tmp_path / "missing.bin", 1) > isolated.TIMEOUT_FLOOR_S


def test_a_real_run_finishes_well_within_its_sized_limit(tmp_path) -> None:
    param, bin_path = _model(tmp_path)
    x = np.random.default_rng(0).standard_normal((3, 2, 4, 4)).astype(np.float32)
    t0 = time.monotonic()
    out = run_ncnn(param, bin_path, {"data": x}, ["out"]).outputs["out"]
    assert np.array_equal(out, np.maximum(x, 0))
    assert time.monotonic() - t0 < sized_timeout(bin_path, 3) / 4


def test_a_hanging_child_costs_the_sized_limit_and_says_so(tmp_path, monkeypatch) -> None:
    param, bin_path = _model(tmp_path, 4096)
    monkeypatch.setattr(isolated, "WORKER", _sleeper(tmp_path))
    monkeypatch.setattr(isolated, "TIMEOUT_FLOOR_S", 1.0)
    x = np.ones((2, 2, 4, 4), np.float32)
    t0 = time.monotonic()
    with pytest.raises(NcnnRuntimeError) as info:
        run_ncnn(param, bin_path, {"data": x}, ["out"])
    took = time.monotonic() - t0
    limit = sized_timeout(bin_path, 2)
    assert limit - 0.5 < took < limit + 10
    msg = str(info.value)
    assert "m.param on 2 sample(s)" in msg and f"within {limit:.0f} s" in msg and "loops in one of its layers" in msg


def test_an_explicit_limit_is_kept(tmp_path, monkeypatch) -> None:
    param, bin_path = _model(tmp_path)
    monkeypatch.setattr(isolated, "WORKER", _sleeper(tmp_path))
    t0 = time.monotonic()
    with pytest.raises(NcnnRuntimeError, match="within 2 s"):
        run_ncnn(param, bin_path, {"data": np.ones((1, 2, 4, 4), np.float32)}, ["out"], timeout_s=2.0)
    assert time.monotonic() - t0 < 12


def test_a_hanging_timing_child_is_stopped_by_its_sized_limit(tmp_path, monkeypatch) -> None:
    param, bin_path = _model(tmp_path)
    monkeypatch.setattr(timing, "WORKER", _sleeper(tmp_path))
    monkeypatch.setattr(timing, "TIMEOUT_FLOOR_S", 1.0)
    model = timing.ModelToTime("m", str(param), str(bin_path), {"data": [2, 4, 4]}, ["out"])
    t0 = time.monotonic()
    with pytest.raises(NcnnRuntimeError, match="did not finish"):
        timing.time_models([model], runs=2, warmup=0)
    assert time.monotonic() - t0 < 15  # 1 s floor + 2 runs at 0.5 s: seconds, not 900


PARAM3 = ("7767517\n3 3\nInput data 0 1 data 0=4 1=4 2=2\nReLU first 1 1 data mid\n"
          "Clip second 1 1 mid out 0=-0.5 1=0.5\n")


def test_sample_zero_runs_layer_by_layer_with_the_same_outputs(tmp_path) -> None:
    (tmp_path / "m.param").write_text(PARAM3)
    (tmp_path / "m.bin").write_bytes(b"")
    x = np.random.default_rng(1).standard_normal((2, 2, 4, 4)).astype(np.float32)
    out = run_ncnn(tmp_path / "m.param", tmp_path / "m.bin", {"data": x}, ["mid", "out"]).outputs
    assert np.array_equal(out["mid"], np.maximum(x, 0)) and np.array_equal(out["out"], np.clip(np.maximum(x, 0), -0.5, 0.5))


def test_a_child_hanging_in_a_layer_is_named(tmp_path, monkeypatch) -> None:
    """The real worker, with ncnn's computation of layer 'first' replaced by a sleep."""
    (tmp_path / "m.param").write_text(PARAM3)
    (tmp_path / "m.bin").write_bytes(b"")
    hang = tmp_path / "hang_worker.py"
    hang.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(isolated.WORKER.parent)!r})\n"
        "import worker\n"
        "real = worker.extract\n"
        "def extract(ex, blob):\n"
        "    if blob == 'mid':\n"
        "        time.sleep(120)\n"
        "    return real(ex, blob)\n"
        "worker.extract = extract\n"
        "sys.exit(worker.main(sys.argv))\n")
    monkeypatch.setattr(isolated, "WORKER", hang)
    monkeypatch.setattr(isolated, "TIMEOUT_FLOOR_S", 3.0)
    with pytest.raises(NcnnRuntimeError, match=r"computing layer 'first' \(ReLU\) of sample 0"):
        run_ncnn(tmp_path / "m.param", tmp_path / "m.bin", {"data": np.ones((1, 2, 4, 4), np.float32)}, ["out"])
