"""The QAT start's and the export's speed summaries read right (a new user's trial, H-SUMMARY):
each plan tried says why it was or was not taken and what its label means; every speed-up shown
next to medians is labelled as the per-round median it is; a tie whose .bin is barely smaller
says to deploy float; a board estimate carries its verdict word; a "does NOT pay" line shows
once (as the warning). Figures are constructed here (no timing noise); the real-timing path
of the chain note is ``tests/test_speed_summary_chains.py``."""

from __future__ import annotations

import statistics

import pytest

from lightning_ncnnqat.policy import speed as policy
from lightning_ncnnqat.speed.choice import PLAN_LABELS, ModelSpeed, SpeedMeasurement, choose, explain
from lightning_ncnnqat.speed.decide import SpeedDecision
from lightning_ncnnqat.verification.speed import speed_lines

FLOATS = {"float": [], "int8": [], "split": ["a"], "loose": ["a", "b"], "floor": ["a", "b", "c"]}


def _rounds(ms: float, n: int = 10, wobble: float = 0.001) -> list[float]:
    return [ms * (1 + wobble * (i % 3)) for i in range(n)]


def _speeds(figs: dict[str, list[float]]) -> dict[str, ModelSpeed]:
    fr = figs["float"]
    return {k: ModelSpeed(statistics.median(r), min(r), max(r), FLOATS[k], statistics.median(a / b for a, b in zip(fr, r)),
                          list(r)) for k, r in figs.items()}


def _m(first: dict[str, float], second: dict[str, float] | None = None) -> SpeedMeasurement:
    a = _speeds({k: _rounds(v) for k, v in first.items()})
    b = _speeds({k: _rounds(v) for k, v in (second or first).items()})
    return SpeedMeasurement("x86", "test cpu", 1, "cpu", {n: None for n in "abcd"}, a, 0.0, b)  # type: ignore[misc]


@pytest.mark.parametrize(("first", "second", "taken", "words"), [
    # the main job's case: 'loose' faster on one half only; 'split' taken; 'floor' not clearly faster than it
    ({"float": 1.6, "int8": 1.15, "split": 1.0, "loose": 0.85, "floor": 0.98},
     {"float": 1.6, "int8": 1.15, "split": 1.0, "loose": 0.99, "floor": 0.98}, "split",
     {"int8": "'split' ran clearly faster", "loose": "faster than 'split' on one half of the rounds only",
      "floor": "not clearly faster than 'split', which keeps fewer layers float"}),
    # int8 slower than float; 'split' still slower on one half, 'loose' on neither: 'loose' taken
    ({"float": 0.8, "int8": 1.0, "split": 0.78, "loose": 0.7, "floor": 0.69},
     {"float": 0.8, "int8": 1.0, "split": 0.9, "loose": 0.7, "floor": 0.69}, "loose",
     {"int8": "slower than float", "split": "slower than float on one half of the rounds",
      "floor": "not clearly faster than 'loose'"}),
    # every plan within the noise of all-int8: all-int8 taken, each plan says why not
    ({"float": 1.3, "int8": 1.0, "split": 0.98, "loose": 0.99, "floor": 0.97}, None, "int8",
     {"split": "not clearly faster than all-int8", "loose": "not clearly faster than all-int8"}),
])
def test_each_plan_says_why_it_was_or_was_not_taken(first, second, taken: str, words: dict[str, str]) -> None:
    m = _m(first, second)
    assert choose(m) == taken
    why = explain(m, taken)
    assert why[taken].startswith("taken") and set(why) == {"int8", "split", "loose", "floor"}
    for key, text in words.items():
        assert text in why[key], (key, why)
    lines = SpeedDecision("speed", m, taken).lines()
    # the labels are said once, each with its meaning; each plan's line carries its reason
    legend = [ln for ln in lines if "plans tried" in ln]
    assert len(legend) == 1 and all(f"{k} = {PLAN_LABELS[k]}" in legend[0] for k in ("split", "loose", "floor"))
    for key in ("split", "loose", "floor"):
        line = next(ln for ln in lines if ln.startswith(f"  {key}, "))
        assert line.endswith(why[key]), line
    assert lines[0].endswith(why["int8"])


def test_the_confirming_timing_is_named_when_it_changed_the_plan() -> None:
    m = _m({"float": 1.0, "int8": 1.2, "split": 1.0, "loose": 0.98, "floor": 0.97})
    walked = choose(m)
    assert walked == "split"  # 20% over all-int8; the others within 5% of it
    safer = next(k for k in ("loose", "floor") if len(FLOATS[k]) > len(FLOATS[walked]))
    why = explain(m, safer)
    assert why[safer] == "taken" and "slower than float in the confirming timing" in why[walked], why


def test_every_speed_up_next_to_medians_is_labelled_per_round() -> None:
    """Medians that say int8 is slower (0.062 > 0.059 ms) next to a per-round ratio of 0.69x
    faster-looking... the ratio must read as what it is: every 'x' figure says 'per round'."""
    fr = [0.059] * 6 + [0.2] * 4
    q = [0.062, 0.062, 0.062, 0.062, 0.062, 0.062, 0.054, 0.26, 0.26, 0.26]
    speeds = _speeds({"float": fr, "int8": q})
    m = SpeedMeasurement("x86", "test cpu", 1, "cpu", {}, speeds)
    for prefer in ("speed", "int8"):
        d = SpeedDecision(prefer, m, "int8")
        for ln in [*d.lines(), d.note() or ""]:
            for i in range(len(ln)):
                if ln[i] == "x" and ln[i - 1].isdigit() and ln[i + 1:i + 2] in (" ", ",", ")"):
                    assert ln[i + 1:].startswith(f" {policy.PER_ROUND}") or "float" in ln[i + 1:i + 8], ln
    assert "differ from the ratio of the medians" in SpeedDecision("speed", m, "int8").lines()[0]


@pytest.mark.parametrize(("float_b", "int8_b", "pays"), [(34608, 33380, False), (40000, 11000, True), (2000, 1400, False)])
def test_a_tie_says_plainly_whether_the_size_pays(float_b: int, int8_b: int, pays: bool) -> None:
    m = _m({"float": 1.0, "int8": 1.0, "split": 1.01, "loose": 1.02, "floor": 1.0})
    m.sizes = {"float": float_b, "int8": int8_b}
    d = SpeedDecision("int8", m, "int8")
    assert d.verdict == "tie"
    last = d.lines()[-1]
    assert f"float {float_b} B, int8 {int8_b} B" in last
    if pays:
        assert "pays in size only" in last and "deploy the float" not in last
    else:
        assert "pays neither in speed nor much in size" in last and "model.ncnn.*" in last
    # the export's finding and DEPLOY.md's line say the same
    (f,) = policy.judge_speed("x86", 1.0, "figures", 30, 0.0, (float_b, int8_b))
    assert f.code == ("int8_ties_float" if pays else "int8_pays_nothing") and ("pays neither" in f.message) != pays
    rep = {"timing": {"float32_ms": 0.059, "int8_ms": 0.062, "speedup": 0.99, "verdict": "tie", "target": "x86",
                      "float32_bin_bytes": float_b, "int8_bin_bytes": int8_b}}
    line = next(ln for ln in speed_lines(rep) if ln.startswith("- **x86**"))
    assert "per round" in line and ("pays neither" in line) != pays and f"{int8_b} B" in line


def test_a_slower_or_faster_export_line_is_labelled_and_sizes_do_not_change_its_verdict() -> None:
    for verdict, speedup, word in (("slower", 0.7, "does not pay"), ("faster", 1.4, "")):
        rep = {"timing": {"float32_ms": 1.0, "int8_ms": 1.0 / speedup, "speedup": speedup, "verdict": verdict,
                          "float32_bin_bytes": 34608, "int8_bin_bytes": 33380}}
        line = next(ln for ln in speed_lines(rep) if ln.startswith("- **"))
        assert f"{speedup:.2f}x float's speed per round" in line and word in line and "pays neither" not in line


@pytest.mark.parametrize(("float_ms", "int8_ms", "keep", "est", "first", "last"), [
    # the new user's board run: int8 0.72x as profiled; 7 kept float, estimated 0.065 ms: within 10 us, a tie
    (0.058, 0.081, ["a"], 0.065, "0.72x float, slower", "int8 ties with float on the board"),
    # kept float, still estimated slower: said plainly
    (1.0, 2.0, ["a"], 1.5, "0.50x float, slower", "int8 does NOT pay on the board"),
    # faster as profiled, nothing kept: the verdict word, no verdict line
    (2.0, 1.0, [], None, "2.00x float, faster", None),
])
def test_board_lines_carry_the_verdict_word(tmp_path, float_ms: float, int8_ms: float, keep: list[str],
                                            est: float | None, first: str, last: str | None) -> None:
    from lightning_ncnnqat.ncnn.targets.profile import BoardProfile
    from lightning_ncnnqat.speed.board_decision import BoardDecision
    from lightning_ncnnqat.speed.choice import LayerSpeed

    prof = BoardProfile(tmp_path / "b.json", "RK3588", False, (), {"machine": "aarch64", "cpu_count": 8}, (1,),
                        {1: {"float": (float_ms, {}), "int8": (int8_ms, {})}})
    d = BoardDecision("speed", prof, 1, {"a": LayerSpeed("a", 0.02, 0.01), "b": LayerSpeed("b", 0.01, 0.02)},
                      keep=keep, estimated_ms=est)
    lines = d.lines()
    assert first in lines[0], lines
    if est is not None:
        assert f"x float, {d.verdict})" in next(ln for ln in lines if "estimated at" in ln)
    if last is None:
        assert d.verdict_line() is None and not any("does NOT pay" in ln or "ties" in ln for ln in lines)
    else:
        assert lines[-1].startswith(last) and lines[-1] == d.verdict_line(), lines
