"""The QAT start's speed decision on given figures and given ncnn files (issue 20, item 2): int8
chains found as ncnn2int8 fuses them, candidate plans from chain figures, ``choose``'s rules and
its safety step, and candidate int8 models written exactly as the export writes them. No timing
noise here: the figures are constructed; the files are real exports and real .param text."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_ncnnqat import QATConfig, prepare_qat
from lightning_ncnnqat.export.api import preflight_export
from lightning_ncnnqat.ncnn.bin_layout import TAG_FP32, layer_entries, tagged
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.policy import speed as policy
from lightning_ncnnqat.speed.candidates import UnitSpeed, candidate_plans
from lightning_ncnnqat.speed.decide import ModelSpeed, SpeedDecision, SpeedMeasurement, choose
from lightning_ncnnqat.speed.plan import count_chains
from lightning_ncnnqat.speed.segments import chain_units, unit_model
from lightning_ncnnqat.speed.plan import whole_models
from lightning_ncnnqat.speed.unit_timing import split_rounds, time_chains
from lightning_ncnnqat.speed.variants import write_variant
from lightning_ncnnqat.ncnn.timing import Timing

# ------------------------------------------------------------------------- chains, from .param text

RESIDUAL = """7767517
8 9
Input in0 0 1 in0
Convolution c0 1 1 in0 a 0=8 1=1 6=64 8=102 9=1
Split s0 1 2 a a0 a1
Convolution c1 1 1 a0 b 0=8 1=3 6=576 8=102
ConvolutionDepthWise d1 1 1 b c 0=8 1=3 6=72 7=8 8=1
Convolution c2 1 1 a1 e 0=8 1=1 6=64 8=2
BinaryOp add 2 1 c e f 0=0
InnerProduct fc 1 1 f out0 0=10 1=1 2=80 8=2
"""


def test_chain_units_follow_the_fused_requantize() -> None:
    """A conv with 8 > 100 chains into the int8 convs reading it, directly or through a Split;
    every other int8 layer (dequantized output, an InnerProduct) is a unit of its own."""
    units = chain_units(NcnnParam.parse(RESIDUAL))
    assert [u.int8 for u in units] == [("c0", "c1", "c2", "d1"), ("fc",)] or \
        [sorted(u.int8) for u in units] == [["c0", "c1", "c2", "d1"], ["fc"]]
    assert units[0].splits == ("s0",)
    # the same layers without the fused requantize: every int8 layer is alone
    plain = RESIDUAL.replace("8=102 9=1", "8=2 9=1").replace("8=102", "8=2")
    assert sorted(len(u.int8) for u in chain_units(NcnnParam.parse(plain))) == [1, 1, 1, 1, 1]


def test_unit_model_is_fed_by_inputs_and_gives_its_ends() -> None:
    """A chain cut out: Input layers of the shapes given for the blobs it reads from outside,
    its outputs the blobs nothing inside reads; the params (fused requantize inside) unchanged."""
    param = NcnnParam.parse(RESIDUAL)
    (chain, fc) = chain_units(param)
    bin_bytes = _bin_for(param)
    text, data, ins, outs = unit_model(param, bin_bytes, chain.layers, {"in0": [4, 6, 6]})
    cut = NcnnParam.parse(text)
    assert ins == {"in0": [4, 6, 6]} and sorted(outs) == ["c", "e"]
    assert cut.layers[0].type == "Input" and cut.layers[0].params == [("0", "6"), ("1", "6"), ("2", "4")]
    assert cut.layers[cut.index("c1")].get_int(8, 0) == 102 and len(data) > 0
    text, _, ins, outs = unit_model(param, bin_bytes, fc.layers, {"f": [8, 1, 1]})
    assert ins == {"f": [8, 1, 1]} and outs == ["out0"]


def _bin_for(param: NcnnParam) -> bytes:
    """A .bin of the layout ncnn reads for ``param`` (zero float32 arrays)."""
    out = b""
    for lay in param.layers:
        for e in layer_entries(lay):
            out += tagged(TAG_FP32, bytes(4 * e.count)) if e.tagged else bytes(4 * e.count)
    return out


# ---------------------------------------------------------------- plans from constructed unit figures


def _u(layers: str, kinds: str, int8: float, flt: float, pieces: list[UnitSpeed] | None = None) -> UnitSpeed:
    return UnitSpeed(tuple(layers.split()), tuple(kinds.split()), int8, flt, pieces=pieces or [])


def _chain(dw_ratio_int8: float, conv_ratio: float) -> UnitSpeed:
    """conv -> dw -> conv as one chain (int8 ms given), its pieces with dw float: two convs."""
    p1 = _u("a", "Convolution", 1.0, conv_ratio)
    p2 = _u("c", "Convolution", 1.0, conv_ratio)
    return _u("a b c", "Convolution ConvolutionDepthWise Convolution", dw_ratio_int8, 3.0, [p1, p2])


def test_plans_from_chain_figures() -> None:
    """split: the depthwise float, the pieces int8 unless they clearly lose; floor: int8 only
    where it clearly wins; minimal: one best unit int8; no plan keeps every layer float."""
    head = _u("fc", "InnerProduct", 1.0, 0.5)  # loses clearly alone
    plans = {p.name: p for p in candidate_plans([_chain(3.2, 1.3), head])}
    assert plans["split"].float_layers == ["b", "fc"]
    assert "ConvolutionDepthWise in an int8 chain of 3 layers" in plans["split"].why["b"]
    assert "alone" in plans["split"].why["fc"] and "0.50x" in plans["split"].why["fc"]
    # the pieces win clearly: the floor plan is the split plan, so it is not proposed twice
    assert "floor" not in plans and plans["minimal"].float_layers == ["b", "c", "fc"]
    # pieces that do not clearly win: the floor keeps the chain float but its best piece (its
    # plan would keep every layer float otherwise), and minimal is that same plan
    plans = {p.name: p for p in candidate_plans([_chain(3.2, 1.05), head])}
    assert plans["split"].float_layers == ["b", "fc"] and "loose" not in plans  # loose = split here
    assert plans["floor"].float_layers == ["b", "c", "fc"] and "minimal" not in plans
    assert all(len(p.float_layers) < 4 for p in plans.values())


def test_a_chain_that_wins_whole_is_proposed_int8_by_the_floor() -> None:
    """A chain that clearly wins in int8 stays int8 in the floor (a CPU with fast int8 depthwise);
    the split plan still proposes its depthwise float: the whole model decides, not the kind."""
    plans = {p.name: p for p in candidate_plans([_chain(2.0, 1.3), _u("x", "Convolution", 1.0, 0.5)])}
    assert plans["split"].float_layers == ["b", "x"]
    assert plans["loose"].float_layers == ["x"] and set(plans) == {"split", "loose"}  # floor, minimal: the same


# --------------------------------------------------------------------- choose, on constructed rounds


def _m(fig: dict[str, tuple[list[float], list[str]]], check: dict[str, tuple[list[float], list[str]]] | None = None
       ) -> SpeedMeasurement:
    def speeds(d: dict[str, tuple[list[float], list[str]]]) -> dict[str, ModelSpeed]:
        fr = d["float"][0]
        return {k: ModelSpeed(statistics.median(r), min(r), max(r), fl,
                              statistics.median(a / b for a, b in zip(fr, r)), list(r)) for k, (r, fl) in d.items()}
    return SpeedMeasurement("x86", "test", 1, "cpu", {}, speeds(fig), 0.0, speeds(check) if check else {})


def _flat(ms: float, n: int = 10) -> list[float]:
    return [ms * (1 + 0.001 * (i % 3)) for i in range(n)]


SPLIT, FLOOR = ["b"], ["a", "b", "c"]


@pytest.mark.parametrize(("figs", "check", "want"), [
    # int8 faster than float; the split plan gains 15% on both halves: taken
    ({"float": 1.3, "int8": 1.0, "split": 0.85, "floor": 0.84}, None, "split"),
    # the same, but the split plan's gain is within the noise (3%): every layer stays int8
    ({"float": 1.3, "int8": 1.0, "split": 0.97, "floor": 0.96}, None, "int8"),
    # the split plan gains on one half only: one half's noise does not move the plan
    ({"float": 1.3, "int8": 1.0, "split": 0.85, "floor": 0.84}, {"float": 1.3, "int8": 1.0, "split": 1.0, "floor": 0.99}, "int8"),
    # the floor passed on both halves, the split plan (as fast) on one: the smaller plan is taken
    ({"float": 1.6, "int8": 1.0, "split": 0.96, "floor": 0.94}, {"float": 1.6, "int8": 1.0, "split": 0.93, "floor": 0.93},
     "split"),
    # int8 slower than float: a 4% gain is taken (int8 must not lose to float)
    ({"float": 0.9, "int8": 1.0, "split": 0.96, "floor": 0.99}, None, "split"),
    # the plan taken is still slower than float: the safety step goes on to the floor
    ({"float": 0.8, "int8": 1.0, "split": 0.9, "floor": 0.79}, None, "floor"),
    # every plan slower than float: the one whose worse half is fastest, said plainly
    ({"float": 0.7, "int8": 1.0, "split": 0.9, "floor": 0.8}, {"float": 0.7, "int8": 1.0, "split": 0.95, "floor": 0.78}, "floor"),
    # a toy model: twice as fast, but 5 us a run is within one Extractor's fixed cost: int8
    ({"float": 0.009, "int8": 0.010, "split": 0.005, "floor": 0.006}, None, "int8"),
])
def test_choose_on_given_figures(figs: dict[str, float], check: dict[str, float] | None, want: str) -> None:
    fl = {"float": [], "int8": [], "split": SPLIT, "floor": FLOOR}
    fig = {k: (_flat(v), fl[k]) for k, v in figs.items()}
    chk = {k: (_flat(v), fl[k]) for k, v in (check or figs).items()}
    m = _m(fig, chk)
    assert choose(m) == want
    d = SpeedDecision("speed", m, want)
    if d.verdict == "slower":  # said plainly
        assert any("int8 does NOT pay on x86" in ln for ln in d.lines()), d.lines()
    assert d.keep_float == fl[want]


def test_the_safety_step_never_takes_a_plan_slower_than_a_safer_one_that_is_not() -> None:
    """Monotone in safety: on every constructed set of figures, the chosen plan is slower than
    float on a half only when every plan with more layers float is too."""
    fl = {"float": [], "int8": [], "split": SPLIT, "floor": FLOOR}
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        v = (torch.rand(4, generator=gen) * 0.8 + 0.6).tolist()
        w = [x * (1 + 0.1 * (float(torch.rand(1, generator=gen)) - 0.5)) for x in v]
        m = _m({k: (_flat(x), fl[k]) for k, x in zip(fl, v)}, {k: (_flat(x), fl[k]) for k, x in zip(fl, w)})
        got = choose(m)

        def slower(k: str) -> bool:
            return any(policy.speed_verdict(h[k].speedup, h["float"].median_ms - h[k].median_ms) == "slower"
                       for h in (m.models, m.check))
        if slower(got):
            safer = [k for k in ("split", "floor") if len(fl[k]) > len(fl[got])]
            assert all(slower(k) for k in safer), (v, w, got)


def test_split_rounds_takes_pairs_alternately() -> None:
    t = Timing.of([float(i) for i in range(8)], [10.0 + i for i in range(8)])
    a, b = split_rounds(t)
    assert a.wall_runs == [0.0, 1.0, 4.0, 5.0] and b.wall_runs == [2.0, 3.0, 6.0, 7.0]
    assert a.cpu_runs == [10.0, 11.0, 14.0, 15.0] and b.cpu_median_ms == 14.5


# --------------------------------------------------------- candidate models written as the export writes


class Mixed(nn.Module):
    """conv -> depthwise -> conv (a chain), pooling, a Linear head (a float InnerProduct when kept)."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                               nn.ReLU6(), nn.Conv2d(16, 24, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.f(x))


class Tokens(nn.Module):
    """A conv stem, then a Linear over the tokens (ncnn runs it as an int8 Gemm the export writes)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU())
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.mix(t).mean(1))


def _export(tmp: Path, model: nn.Module, x: torch.Tensor) -> tuple[Path, str]:
    prepare_qat(model, x, QATConfig(prefer="int8"))
    model.eval()
    rep = preflight_export(model, x, export_dir=tmp)
    assert not rep.failures, rep.failures
    return tmp, rep.float_weights or "fp32"


@pytest.mark.parametrize("net", [Mixed, Tokens])
def test_a_variant_with_nothing_float_is_the_exports_int8_model(tmp_path: Path, net: type[nn.Module]) -> None:
    """write_variant with no layer float gives model.int8.* byte for byte (feature masks, and
    the Gemm the export writes itself, included), so a candidate differs from what the export
    writes only in its float layers."""
    torch.manual_seed(0)
    d, fw = _export(tmp_path, net(), torch.randn(1, 3, 16, 16))
    text, data = write_variant(d, set(), fw)
    assert text == (d / "model.int8.param").read_text() and data == (d / "model.int8.bin").read_bytes()
    # one conv float: every layer still masked as the export masks, the chain into it broken
    q = NcnnParam.parse((d / "model.int8.param").read_text())
    conv = next(lay.name for lay in q.layers if lay.type in ("Convolution", "ConvolutionDepthWise") and lay.get_int(8, 0) < 100)
    text, _ = write_variant(d, {conv}, fw)
    v = NcnnParam.parse(text)
    assert all(lay.get_int(31, 0) == 3 for lay in v.layers if lay.type != "Input")
    assert v.layers[v.index(conv)].get_int(8, 0) == 0
    assert count_chains(text).requantized < count_chains((d / "model.int8.param").read_text()).requantized


def test_chain_units_of_a_real_export_match_its_requantized_convs(tmp_path: Path) -> None:
    """On an exported model: every requantized conv shares a unit with the conv it feeds."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    d, _ = _export(tmp_path, Mixed(), x)
    text = (d / "model.int8.param").read_text()
    units = chain_units(NcnnParam.parse(text))
    n_int8 = count_chains(text).int8_layers
    assert sum(len(u.int8) for u in units) == n_int8
    assert sum(len(u.int8) - 1 for u in units) == count_chains(text).requantized


def test_time_chains_times_a_depthwise_chain_whole_and_in_pieces(tmp_path: Path) -> None:
    """conv -> depthwise -> conv is one unit, timed whole and in its two pieces with the
    depthwise float (each piece's int8 alone, its ends dequantized); the Linear a unit alone.
    Torch names throughout, every figure positive."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    d, fw = _export(tmp_path, Mixed(), x)
    q = NcnnParam.parse((d / "model.int8.param").read_text())
    names = {lay.name: f"t.{lay.name}" for lay in q.layers}
    fp, _ = whole_models(d, 1, {"inputs": [{"blob": "in0", "shape": [3, 16, 16]}],
                                "outputs": [{"blob": "out0", "shape": [10]}]})
    units = time_chains(d, fp, names, 1, "cpu", fw)
    chain, head = units
    assert chain.kinds == ("Convolution", "ConvolutionDepthWise", "Convolution") and head.kinds == ("InnerProduct",)
    assert [p.kinds for p in chain.pieces] == [("Convolution",), ("Convolution",)] and not head.pieces
    assert chain.split_layers == (chain.layers[1],) and all(n.startswith("t.") for n in chain.layers)
    assert all(v.int8_ms > 0 and v.float_ms > 0 and v.ratio > 0 for v in [chain, head, *chain.pieces])
