"""benchmarks/benchncnn_ref.py: .bin files of the exact layout for benchncnn-style params (float and
int8, requantized or not), loaded and timed by real ncnn. No speed thresholds: mechanics only."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_ncnnqat.ncnn.bin_layout import TAG_FP32, TAG_INT8, locate
from lightning_ncnnqat.ncnn.isolated import run_ncnn
from lightning_ncnnqat.ncnn.param import NcnnParam

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import benchncnn_ref  # noqa: E402

# A benchncnn-style pair (same layer kinds as mobilenet / mobilenet_int8: conv, depthwise with a
# fused ReLU, requantized chains 8=102 / 101, a pooled InnerProduct 8=2; resnet18_int8's Split +
# Eltwise), 3x16x16 input.
_FLOAT = """7767517
8 9
Input            data   0 1 data 0=16 1=16 2=3
Convolution      conv1  1 1 data c1 0=8 1=3 3=2 4=1 5=1 6=216 9=1
ConvolutionDepthWise dw 1 1 c1 d1 0=8 1=3 4=1 5=1 6=72 7=8 9=1
Split            sp     1 2 d1 s1 s2
Convolution      pw     1 1 s1 p1 0=8 1=1 5=1 6=64
Eltwise          add    2 1 p1 s2 e1 0=1
Pooling          pool   1 1 e1 g1 0=1 4=1
InnerProduct     fc     1 1 g1 output 0=10 1=1 2=80
"""
_INT8 = (_FLOAT.replace("6=216 9=1", "6=216 8=102 9=1").replace("7=8 9=1", "7=8 8=1 9=1")
         .replace("6=64", "6=64 8=2").replace("2=80", "2=80 8=2"))


@pytest.mark.parametrize("text,int8_layers,requant", [(_FLOAT, 0, 0), (_INT8, 4, 1)])
def test_random_bin_has_the_layout_ncnn_reads(text: str, int8_layers: int, requant: int) -> None:
    param = NcnnParam.parse(text)
    data = benchncnn_ref.random_bin(param)
    entries = locate(param.layers, data)  # raises unless the walk consumes the .bin exactly
    weights = [e for es in entries for e in es if e.role == "weight"]
    assert sum(e.tag == TAG_INT8 for e in weights) == int8_layers
    assert sum(e.tag == TAG_FP32 for e in weights) == 4 - int8_layers
    assert all(np.any(e.values(data) != 0) for e in weights)  # random, not empty weights
    scales = [e.values(data) for es in entries for e in es if e.role.endswith("scale") or e.role == "weight_scales"]
    assert all((s > 0).all() for s in scales)
    assert benchncnn_ref.requantized(param)[0] == requant


def test_pair_loads_runs_and_times_in_ncnn(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.param").write_text(_FLOAT)
    (models / "tiny_int8.param").write_text(_INT8)
    pair = benchncnn_ref.prepare_pair(models, "tiny", tmp_path)
    assert pair["float"]["in"] == "data" and pair["int8"]["out"] == "output"
    assert pair["int8"]["int8_layers"] == 4 and pair["int8"]["requantized"] == (1, 3)
    x = np.random.default_rng(0).standard_normal((3, 16, 16)).astype(np.float32)
    outs = {tag: run_ncnn(p["param"], p["bin"], {"data": x[None]}, ["output"]).outputs["output"] for tag, p in pair.items()}
    for out in outs.values():  # both models run end to end on the generated weights
        assert out.shape[-1] == 10 and np.isfinite(out).all() and np.abs(out).max() > 0
    row = benchncnn_ref.time_pair(pair, [3, 16, 16], threads=1, runs=3, warmup=1)
    assert row["on"] == "cpu" and row["float"]["runs"] == 3 and row["int8"]["runs"] == 3
    assert row["speedup_paired"] > 0 and row["verdict"] in ("faster", "slower", "tie")
    assert "| tiny (3x16x16) | 1 |" in benchncnn_ref.table([{"name": "tiny", "shape": [3, 16, 16], "pair": pair,
                                                               "rows": [row]}])


def test_missing_param_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="resnet18_int8.param"):
        (tmp_path / "resnet18.param").write_text(_FLOAT)
        benchncnn_ref.prepare_pair(tmp_path, "resnet18", tmp_path)
