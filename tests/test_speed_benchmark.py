"""benchmarks/deploy_speed.py on models whose train-mode output is not a tensor (torchvision's
GoogLeNet / Inception return a namedtuple with their auxiliary heads, segmentation models a
dict), and the side-by-side timing of more than two models (issue 20)."""

from __future__ import annotations

import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.speed.plan import count_chains, whole_models
from lightning_ncnnqat.speed.segments import UnitToTime, chain_units, time_side_by_side, time_units

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import deploy_speed  # noqa: E402

Outputs = namedtuple("Outputs", ["logits", "aux"])


class AuxNet(nn.Module):
    """A small CNN with an auxiliary head in training mode, returned as ``kind``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, 4)
        self.aux = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor):  # noqa: ANN201 - what the kind says
        f = self.body(x)
        y = self.fc(f)
        if not self.training:
            return y
        aux = self.aux(f)
        return {"namedtuple": lambda: Outputs(y, aux), "tuple": lambda: (y, aux), "dict": lambda: {"aux": aux, "out": y},
                "nested": lambda: [(y, aux)]}[self.kind]()


@pytest.mark.parametrize("kind", ["namedtuple", "tuple", "dict", "nested"])
def test_logits_finds_the_class_scores(kind: str) -> None:
    torch.manual_seed(0)
    m = AuxNet(kind).train()
    x = torch.randn(2, 3, 8, 8)
    got = deploy_speed.logits(m(x))
    assert got.shape == (2, 4)
    assert torch.allclose(got, m.fc(m.body(x)))  # the main head, not the auxiliary one
    assert not torch.allclose(got, m.aux(m.body(x)))


def test_logits_names_an_output_without_a_tensor() -> None:
    with pytest.raises(TypeError, match=r"\(str\) holds no tensor"):
        deploy_speed.logits("not a tensor")
    with pytest.raises(TypeError, match=r"\(dict\) holds no tensor"):
        deploy_speed.logits({"a": 1})


@pytest.mark.parametrize("kind", ["namedtuple", "dict"])
def test_the_benchmark_trains_and_exports_a_model_with_aux_outputs(kind: str, tmp_path: Path) -> None:
    """prepare, QAT steps on the train-mode output (a namedtuple / dict: it crashed with
    AttributeError on .shape before), export: the deployed model gives the eval logits."""
    torch.manual_seed(0)
    info = deploy_speed.prepare_and_export(AuxNet(kind), 8, tmp_path, 2, False)
    assert info["int8_vs_qat_cosine"] is not None and info["int8_vs_qat_cosine"] > 0.9
    assert (tmp_path / "model.int8.param").is_file()


def test_side_by_side_times_only_the_models_named(tmp_path: Path) -> None:
    """Three models: a copy of the first and of the last run around them, their times dropped;
    every model keeps its runs for per-round ratios. Chain units time through the same path."""
    torch.manual_seed(0)
    info = deploy_speed.prepare_and_export(AuxNet("tuple"), 8, tmp_path, 1, False)
    assert info
    fp, q = whole_models(tmp_path, 1)
    import dataclasses  # noqa: PLC0415

    third = dataclasses.replace(q, name="int8-again")
    t = time_side_by_side([fp, q, third], runs=4, warmup=1)
    assert set(t) == {"float", "int8", "int8-again"} and all(len(v.cpu_runs) == 4 for v in t.values())
    qparam = NcnnParam.parse((tmp_path / "model.int8.param").read_text())
    fparam = NcnnParam.parse((tmp_path / "model.ncnn.param").read_text())
    units = chain_units(qparam)
    assert sum(len(u.int8) for u in units) == count_chains(qparam.to_text()).int8_layers == 3  # aux head: not deployed
    assert sorted(len(u.int8) for u in units) == [1, 2]  # conv -> ReLU -> conv chained, the Linear alone
    qb, fb = (tmp_path / "model.int8.bin").read_bytes(), (tmp_path / "model.ncnn.bin").read_bytes()
    timed = time_units(fparam, fb, fp, [UnitToTime(f"u{i}", u, qparam, qb) for i, u in enumerate(units)], runs=3)
    assert set(timed) == {f"u{i}" for i in range(len(units))}
    assert all(a.cpu_median_ms > 0 and b.cpu_median_ms > 0 for a, b in timed.values())
