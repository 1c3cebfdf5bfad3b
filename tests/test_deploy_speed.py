"""Speed measurement mechanics (lightning_ncnnqat.speed.plan, benchmarks/deploy_speed.py) with real
ncnn on tiny exports: interleaved timing, chain counts, single-layer cut-outs, verdicts. No speed
thresholds: the figures are judged, not required to be fast."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lightning_ncnnqat import export, prepare_qat
from lightning_ncnnqat.ncnn.isolated import NcnnRuntimeError, run_ncnn
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.ncnn.timing import paired_speedup
from lightning_ncnnqat.speed.plan import (
    ModelToTime,
    SpeedPlan,
    Timing,
    count_chains,
    judge,
    measure_layers,
    plan_speed,
    single_layer_model,
    time_models,
    whole_models,
)

ROOT = Path(__file__).resolve().parents[1]


def _net(act: type[nn.Module], in_ch: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_ch, 16, 3, padding=1), nn.BatchNorm2d(16), act(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), act(),
        nn.Conv2d(16, 24, 1), act(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5),
    )


def _export(tmp_path: Path, act: type[nn.Module], size: int = 8, in_ch: int = 3) -> Path:
    torch.manual_seed(0)
    m = _net(act, in_ch)
    x = torch.randn(4, in_ch, size, size)
    prepare_qat(m, x[:1])
    m.train()
    m(x)  # one forward sets the input ranges
    m.eval()
    d = tmp_path / act.__name__
    rep = export(m, d, x[:1], x, verbose=False, targets=["x86"], timing_runs=0, check_onnx=False, layer_check_samples=1)
    assert not rep.failures
    return d


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("speed")
    return {"relu": _export(tmp, nn.ReLU), "silu": _export(tmp, nn.SiLU), "relu6_1ch": _export(tmp, nn.ReLU6, 12, 1)}


def test_count_chains_relu_chains_silu_breaks(exports: dict[str, Path]) -> None:
    relu = count_chains((exports["relu"] / "model.int8.param").read_text())
    silu = count_chains((exports["silu"] / "model.int8.param").read_text())
    relu6 = count_chains((exports["relu6_1ch"] / "model.int8.param").read_text())
    assert (relu.int8_layers, relu.int8_convs, relu.requantized, relu.breakers) == (4, 3, 2, {})
    assert (relu6.int8_convs, relu6.requantized, relu6.breakers) == (3, 2, {})  # ReLU6 -> Clip, folded by pnnx
    assert (silu.int8_convs, silu.requantized) == (3, 0)
    assert silu.breakers == {"Swish": 2}  # conv -> Swish -> conv, twice


def test_time_models_interleaved_stats(exports: dict[str, Path]) -> None:
    f, q = whole_models(exports["silu"], threads=1)
    t = time_models([f, q], runs=7, warmup=1)
    assert set(t) == {"float", "int8"}
    for v in t.values():
        assert v.runs == 7
        assert 0 < v.min_ms <= v.median_ms <= v.max_ms
        assert 0 <= v.cpu_min_ms <= v.cpu_median_ms <= v.cpu_max_ms
    assert judge(t["int8"], t["float"]) in ("faster", "slower", "tie")


def test_time_models_three_or_more_return_only_the_models_timed(exports: dict[str, Path]) -> None:
    """With three or more models the child also runs a copy of the first and the last (so no
    timed model gets a warm second run in a row); only the models given come back, each with
    every run, and per-round ratios pair up."""
    import dataclasses

    f, q = whole_models(exports["silu"], threads=1)
    f2, r = whole_models(exports["relu"], threads=1)
    models = [f, q, dataclasses.replace(r, name="relu-int8"), dataclasses.replace(f2, name="relu-float")]
    t = time_models(models, runs=5, warmup=1)
    assert list(t) == ["float", "int8", "relu-int8", "relu-float"]
    assert all(v.runs == 5 and len(v.cpu_runs or []) == 5 for v in t.values())
    assert paired_speedup(t["float"], t["int8"], "cpu") > 0


def test_time_models_with_paths_relative_to_the_callers_folder(exports: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """An export folder given relative (``ExportConfig(dir="out")``) is timed: the child runs
    elsewhere, so the model's paths are resolved against the caller's folder."""
    d = exports["relu"]
    monkeypatch.chdir(d.parent)
    f, q = whole_models(Path(d.name), threads=1)
    rel = ModelToTime("rel", str(Path(d.name) / "model.int8.param"), str(Path(d.name) / "model.int8.bin"), q.inputs, q.extract)
    assert Path(rel.param).is_absolute() and Path(rel.param).exists()
    assert time_models([f, rel], runs=2, warmup=0)["rel"].runs == 2


def test_time_models_threads_and_errors(exports: dict[str, Path], tmp_path: Path) -> None:
    f, q = whole_models(exports["relu6_1ch"], threads=2)
    assert f.inputs == {"in0": [1, 12, 12]} and q.options == {"num_threads": 2}
    assert time_models([q], runs=2, warmup=0)["int8"].runs == 2
    with pytest.raises(ValueError, match="runs"):
        time_models([q], runs=0)
    with pytest.raises(ValueError, match="unique"):
        time_models([q, q], runs=1)
    bad = ModelToTime("bad", str(tmp_path / "nope.param"), str(tmp_path / "nope.bin"), {"in0": [3, 8, 8]}, ["out0"])
    with pytest.raises(NcnnRuntimeError, match="could not load"):
        time_models([bad], runs=1)
    with pytest.raises(FileNotFoundError, match="no model.ncnn.param"):
        whole_models(tmp_path)
    (tmp_path / "model.ncnn.param").write_text("7767517\n")
    with pytest.raises(FileNotFoundError, match="no model.ncnn.bin"):
        whole_models(tmp_path)


def test_judge_verdicts() -> None:
    t = lambda ms, cpu=None: Timing(ms, ms, ms, 1, cpu, cpu, cpu)  # noqa: E731
    assert judge(t(1.0), t(2.0)) == "faster"
    assert judge(t(2.0), t(1.0)) == "slower"
    assert judge(t(1.0), t(1.02)) == "tie"
    assert judge(t(1.0, 3.0), t(2.0, 1.0), on="cpu") == "slower"  # CPU time decides, not wall
    with pytest.raises(ValueError, match="tolerance"):
        judge(t(1.0), t(1.0), tolerance=1.5)
    with pytest.raises(ValueError, match="on"):
        judge(t(1.0), t(1.0), on="gpu")


@pytest.mark.parametrize("which", ["relu", "silu"])
def test_single_layer_model_matches_full_model(exports: dict[str, Path], which: str, tmp_path: Path) -> None:
    """A layer cut out of the int8 model computes what it computes inside the full model (float
    in, float out: a fused requantize is undone), so its timing times the real layer."""
    d = exports[which]
    param = NcnnParam.parse((d / "model.int8.param").read_text())
    data = (d / "model.int8.bin").read_bytes()
    idx = next(i for i, lay in enumerate(param.layers) if lay.type == "ConvolutionDepthWise")
    lay = param.layers[idx]
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    full = run_ncnn(d / "model.int8.param", d / "model.int8.bin", {"in0": x}, [lay.bottoms[0], lay.tops[0]],
                    light_mode=False)
    inp = _as_float(param, data, lay.bottoms[0], full.outputs[lay.bottoms[0]])
    text, blob = single_layer_model(param, data, idx, {lay.bottoms[0]: list(inp.shape[1:])})
    (tmp_path / "one.param").write_text(text)
    (tmp_path / "one.bin").write_bytes(blob)
    one = run_ncnn(tmp_path / "one.param", tmp_path / "one.bin", {lay.bottoms[0]: inp}, [lay.tops[0]])
    assert NcnnParam.parse(text).layers[1].get_int(8, 0) == 1  # depthwise int8, no requantize
    got, want = one.outputs[lay.tops[0]], _as_float(param, data, lay.tops[0], full.outputs[lay.tops[0]])
    if lay.get_int(8, 0) < 100:  # unfused in the model too: the same layer on the same input
        assert np.allclose(got, want, rtol=1e-4, atol=1e-4)
    else:  # requantized in the model (int8 out): equal up to that rounding, and its clamp at 127
        scale = _output_scale(param, data, idx)
        inside = np.abs(got) < 127 / scale
        assert inside.mean() > 0.9 and np.abs(got - want)[inside].max() <= 0.5 / scale + 1e-3
    assert got.shape == want.shape and np.isfinite(got).all() and np.abs(got).max() > 0


def _output_scale(param: NcnnParam, data: bytes, idx: int) -> float:
    from lightning_ncnnqat.ncnn.bin_layout import locate

    off = next(e.offset for e in locate(param.layers, data)[idx] if e.role == "output_scale")
    return float(np.frombuffer(data, "<f4", 1, off)[0])


def _as_float(param: NcnnParam, data: bytes, blob: str, values: np.ndarray) -> np.ndarray:
    """A blob extracted from the int8 model, in float: a requantizing producer hands on int8."""
    prod = param.producer(blob)
    if prod is None or prod.get_int(8, 0) <= 100:
        return values
    return values / _output_scale(param, data, param.index(prod.name))


def test_measure_layers_one_row_per_int8_layer(exports: dict[str, Path]) -> None:
    rows = measure_layers(exports["relu"], runs=3, warmup=1)
    assert [r.type for r in rows] == ["Convolution", "ConvolutionDepthWise", "Convolution", "InnerProduct"]
    assert [r.requantized for r in rows] == [True, True, False, False]
    assert [r.kernel for r in rows] == [3, 3, 1, 0]
    assert all(r.quantize is not None and 0 < r.quantize.median_ms for r in rows)
    assert all(r.int8.median_ms > 0 and r.float.median_ms > 0 and r.speedup > 0 for r in rows)


def test_plan_speed_names_torch_layers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = _net(nn.ReLU)
    x = torch.randn(2, 3, 8, 8)
    prepare_qat(m, x[:1])
    m.train()
    m(x)
    m.eval()
    plan = plan_speed(m, x[:1], runs=3, export_dir=tmp_path / "e")
    assert set(plan.layers) == {"0", "3", "6", "10"}  # torch names of the int8 layers
    assert set(plan.keep_float) <= set(plan.layers)
    assert plan.int8_pays == (len(plan.keep_float) < 4)
    assert {"float", "int8"} == set(plan.model_ms) and "whole model" in plan.summary()
    assert plan_speed(m, x[:1], prefer="int8", runs=2).keep_float == []
    with pytest.raises(ValueError, match="prefer"):
        plan_speed(m, x[:1], prefer="size")


def test_speed_plan_summary_says_when_int8_does_not_pay() -> None:
    t = Timing(1.0, 0.9, 1.1, 3, 1.0, 0.9, 1.1)
    some = SpeedPlan("speed", {"a": (2.0, 1.0), "b": (0.5, 1.0)}, ["a"], {"float": t, "int8": t}, 1)
    assert some.int8_pays and "keep float: a (alone: int8 2.000 ms vs float 1.000 ms)" in some.summary()
    every = SpeedPlan("speed", {"a": (2.0, 1.0)}, ["a"], {"float": t, "int8": t}, 1)
    assert not every.int8_pays and "int8 does not pay here" in every.summary()


def test_deploy_speed_cli_times_an_export(exports: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import deploy_speed

    out = tmp_path / "r.json"
    assert deploy_speed.main(["--export-dir", str(exports["silu"]), "--threads", "1", "--runs", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "machine:" in text and "ncnn" in text and "| 1 |" in text and "Swish 2" in text
    import json

    res = json.loads(out.read_text())
    row = res["results"][0]["rows"][0]
    assert row["verdict"].split()[0] in ("faster", "slower", "tie") and row["speedup"] > 0
    assert res["machine"]["cpus"] >= 1 and res["machine"]["ncnn"]
