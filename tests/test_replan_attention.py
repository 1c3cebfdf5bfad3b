"""Gemm Linears, nn.MultiheadAttention and SDPA calls kept float by the speed decision (issues 18, 20).

The QAT start times these layers as units of their own (a Gemm alone, an MHA alone, all SDPA
layers together: the export tells them apart by order only), and a unit whose int8 form loses is
re-planned float by ``replan_as_float`` with the measured reason. Here the decision is fed
constructed figures (no timing noise) on real exports: int8 losing -> those layers float in the
plan with their figures, the export writes them float and its parity holds; int8 winning -> every
unit stays int8. One real timing at the end asserts only that the deployed plan is not slower
than float beyond the tie tolerance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_ncnnqat import QATConfig, export, prepare_qat
from lightning_ncnnqat.errors import ConfigError
from lightning_ncnnqat.export.api import preflight_export
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.policy import speed as policy
from lightning_ncnnqat.qat.plan import get_plan
from lightning_ncnnqat.qat.prepare import replan_as_float
from lightning_ncnnqat.speed.candidates import UnitSpeed, candidate_plans
from lightning_ncnnqat.speed.decide import ModelSpeed, SpeedDecision, SpeedMeasurement, choose, decide_speed, speed_check
from lightning_ncnnqat.speed.segments import chain_units
from lightning_ncnnqat.speed.variants import write_variant
from test_attention_fused import Attn, Net
from test_attention_plan import SdpaAttn

DYNAMIC = ("Gemm", "MultiHeadAttention", "SDPA")


class GemmNet(nn.Module):
    """Conv stem -> tokens -> two Linears on 3-D tokens (pnnx Gemm) -> head (InnerProduct)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 2, 2)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)
        return self.head((t + self.fc2(torch.relu(self.fc1(t)))).mean(1))


class MhaSdpaNet(nn.Module):
    """Conv stem -> tokens -> nn.MultiheadAttention -> two SDPA blocks (q/k/v, proj Gemms) -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 2, 2)
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.sa1, self.sa2 = SdpaAttn(16, 2), SdpaAttn(16, 4)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)
        t = t + self.mha(t, t, t, need_weights=False)[0]
        t = t + self.sa1(t)
        return self.head((t + self.sa2(t)).mean(1))


def _prepared(cls: type[nn.Module], seed: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    m, x = cls().eval(), torch.randn(4, 3, 8, 8)
    prepare_qat(m, x[:1], QATConfig(prefer="size"), targets=["x86"])  # "size": nothing timed here
    return m, x


def _units(m: nn.Module, x: torch.Tensor, d: Path) -> tuple[list[tuple[tuple[str, ...], tuple[str, ...]]], dict[str, str]]:
    """The real export's int8 units as (torch names, ncnn kinds), and torch -> ncnn names."""
    report = preflight_export(m, x[:1], export_dir=d)
    torch_of = {r.ncnn_name: r.torch_name for r in report.layers if r.ncnn_name}
    param = NcnnParam.parse((d / "model.int8.param").read_text())
    kind = {lay.name: lay.type for lay in param.layers}
    units = [(tuple(torch_of.get(n, n) for n in u.int8), tuple(kind[n] for n in u.int8)) for u in chain_units(param)]
    return units, {t: n for n, t in torch_of.items()}


def _decision(units: list[tuple[tuple[str, ...], tuple[str, ...]]], lose: set[str]) -> SpeedDecision:
    """The decision on constructed figures: the units of the kinds ``lose`` run int8 at 0.5x
    float, every other unit at 1.5x; the whole models follow the units' sums."""
    us = [UnitSpeed(names, kinds, 2.0 if set(kinds) & lose else 1.0, 1.0 if set(kinds) & lose else 1.5)
          for names, kinds in units]
    plans = candidate_plans(us)
    fl = sum(u.float_ms for u in us) + 1.0

    def model(float_layers: list[str], why: dict[str, str] | None = None) -> ModelSpeed:
        ms = 1.0 + sum(u.float_ms if set(u.layers) <= set(float_layers) else u.int8_ms for u in us)
        return ModelSpeed(ms, ms * 0.98, ms * 1.02, list(float_layers), fl / ms, [], dict(why or {}))

    models = {"float": model([n for u in us for n in u.layers]), "int8": model([])}
    models["float"].float_layers, models["float"].speedup = [], 1.0
    models.update({p.name: model(p.float_layers, p.why) for p in plans})
    m = SpeedMeasurement("x86", "test", 1, "cpu", {}, models, check=dict(models), units=us)
    return SpeedDecision("speed", m, choose(m))


def _int8_flags(d: Path) -> dict[str, int]:
    param = NcnnParam.parse((d / "model.int8.param").read_text())
    return {lay.name: lay.get_int(18, 0) for lay in param.layers if lay.type in DYNAMIC}


def test_attention_layers_are_units_of_their_own_and_sdpa_one_unit(tmp_path: Path) -> None:
    """Each Gemm and the MHA is a unit alone (float in, float out); both SDPA layers one unit."""
    m, x = _prepared(MhaSdpaNet, 3)
    units, _ = _units(m, x, tmp_path)
    by_kind = {k: [n for n, ks in units if k in ks] for k in DYNAMIC}
    assert by_kind["MultiHeadAttention"] == [("mha",)]
    assert by_kind["SDPA"] == [("sa1:sdpa0", "sa2:sdpa0")] or by_kind["SDPA"] == [("sa1:sdpa0", "sa2:sdpa1")]
    assert sorted(n for (n,) in by_kind["Gemm"]) == ["sa1.proj", "sa1.qkv", "sa2.proj", "sa2.qkv"]


@pytest.mark.parametrize("cls,lose,seed", [(GemmNet, {"Gemm"}, 1), (MhaSdpaNet, {"MultiHeadAttention", "SDPA"}, 2)])
def test_losing_attention_units_go_float_with_reasons_and_export_float(
        tmp_path: Path, cls: type[nn.Module], lose: set[str], seed: int) -> None:
    """int8 losing: the chosen plan keeps those layers float, replan_as_float moves them out of the
    plan's int8 fields with the figures as reasons, the export writes them float (no 18=2), as the
    candidate the decision timed (``write_variant``) wrote them, and parity holds."""
    m, x = _prepared(cls, seed)
    units, ncnn_of = _units(m, x, tmp_path / "before")
    d = _decision(units, lose)
    losers = [n for names, kinds in units if set(kinds) & lose for n in names]
    assert losers and sorted(d.keep_float) == sorted(losers), (d.chosen, d.keep_float)
    variant = NcnnParam.parse(write_variant(tmp_path / "before", {ncnn_of[n] for n in losers})[0])
    reasons = d.reasons()
    plan = replan_as_float(m, x[:1], reasons)
    int8_now = {*plan.gemm_layers, *plan.attention_layers, *(f"{k}:sdpa" for k in plan.sdpa_calls)}
    for n in losers:
        key = n.split(":sdpa")[0] + ":sdpa" if ":sdpa" in n else n
        assert key not in int8_now and "int8 slower than float on x86" in plan.float_layers[key], (n, plan.float_layers)
    if "SDPA" in lose:
        assert plan.sdpa_calls == {}
    if "Gemm" not in lose:  # the Gemms that won stay int8
        assert plan.gemm_layers and all(n not in plan.float_layers for n in plan.gemm_layers)
    report = export(m, tmp_path / "after", x[:1], x, targets=["x86"], verbose=False, timing_runs=0, check_onnx=False)
    flags = _int8_flags(tmp_path / "after")
    assert all(flags[ncnn_of[n]] == 0 for n in losers), flags
    assert {lay.name: lay.get_int(18, 0) for lay in variant.layers if lay.type in DYNAMIC} == flags
    assert report.flagged_layers == [] and report.runtime["x86"]["int8_vs_qat"]["cosine"] > 0.9999


@pytest.mark.parametrize("cls,seed", [(GemmNet, 4), (MhaSdpaNet, 5)])
def test_winning_attention_units_stay_int8(tmp_path: Path, cls: type[nn.Module], seed: int) -> None:
    """int8 winning everywhere: no plan beats all-int8, nothing re-planned, all 18=2 in the export."""
    m, x = _prepared(cls, seed)
    units, _ = _units(m, x, tmp_path)
    d = _decision(units, set())
    assert d.chosen == "int8" and d.keep_float == [] and d.reasons() == {}
    before = get_plan(m)
    assert replan_as_float(m, x[:1], d.reasons()) is before
    assert all(v == 2 for v in _int8_flags(tmp_path).values()) and _int8_flags(tmp_path)


def test_a_losing_fused_unit_goes_float_with_the_reason_on_its_parts(tmp_path: Path) -> None:
    """Hand-written attention pnnx fuses into one MultiHeadAttention (QATPlan.fused_attention): the
    decision names the unit by its label; its q/k/v/out Linears go float with the figures, and the
    export writes no int8 MultiHeadAttention."""
    torch.manual_seed(8)
    m, x = Net(Attn(h=4)).eval(), torch.randn(4, 6, 8)
    plan = prepare_qat(m, x[:1], QATConfig(prefer="size"), targets=["x86"])
    (label,) = plan.fused_attention
    units, _ = _units(m, x, tmp_path / "before")
    assert ((label,), ("MultiHeadAttention",)) in units
    d = _decision(units, {"MultiHeadAttention"})
    assert d.keep_float == [label]
    plan = replan_as_float(m, x[:1], d.reasons())
    assert plan.fused_attention == {}
    for part in ("block.q_proj", "block.k_proj", "block.v_proj", "block.out_proj"):
        assert plan.float_layers[part].startswith(f"{label}: int8 slower than float on x86"), plan.float_layers[part]
    report = export(m, tmp_path / "after", x[:1], x, targets=["x86"], verbose=False, timing_runs=0, check_onnx=False)
    mha = lambda d: [lay.get_int(18, 0) for lay in NcnnParam.parse((d / "model.int8.param").read_text()).layers  # noqa: E731
                     if lay.type == "MultiHeadAttention"]
    assert mha(tmp_path / "before") == [2] and mha(tmp_path / "after") == [0]
    assert report.flagged_layers == [] and report.runtime["x86"]["int8_vs_qat"]["cosine"] > 0.9999


class RootSdpa(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2).unsqueeze(1)
        return torch.nn.functional.scaled_dot_product_attention(t, t, t).mean((1, 2))


def test_sdpa_called_by_the_model_itself_cannot_be_replanned() -> None:
    """`skip` has no module to name for SDPA the model calls itself: a clear error naming it."""
    torch.manual_seed(6)
    m, x = RootSdpa().eval(), torch.randn(2, 3, 8, 8)
    prepare_qat(m, x[:1], QATConfig(prefer="size"), targets=["x86"])
    assert get_plan(m).sdpa_calls == {"": 1}
    with pytest.raises(ConfigError, match=r"\(model\):sdpa0"):
        replan_as_float(m, x[:1], {"(model):sdpa0": "int8 slower"})


def test_real_timing_deploys_a_plan_not_slower_than_float() -> None:
    """One real timing of the attention model: whatever it keeps float, the deployed plan is not
    slower than float beyond the tie tolerance (the invariant of issue 20)."""
    torch.set_num_threads(1)
    m, x = _prepared(MhaSdpaNet, 7)
    d = decide_speed(m, x[:1], "speed", speed_check(["x86"]))
    assert d.measurement is not None, d.not_measured
    s = d.measurement.reported(d.chosen)
    assert s.speedup >= 1 - policy.SPEED_TIE_TOLERANCE or d.verdict != "slower", d.lines()
    if d.keep_float:
        replan_as_float(m, x[:1], d.reasons())
        assert all(n.split(":sdpa")[0] + (":sdpa" if ":sdpa" in n else "") in get_plan(m).float_layers
                   for n in d.keep_float)
