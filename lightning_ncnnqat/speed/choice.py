"""What the QAT start timed, and which int8 model it deploys from that (issue 20).

Plain data of one measurement (:class:`LayerSpeed`, :class:`ModelSpeed`,
:class:`SpeedMeasurement`) and the rule on it: :func:`choose` (a plan with more layers float only
where it pays on both halves of the rounds, then a safety step while the chosen plan is slower
than float) and :func:`confirm` (the chosen plan, and the next safer one, timed again against
float in a timing of their own: the figure reported is not the best of several noisy readings,
and a plan the confirmation finds slower than float gives way to the safer one). The thresholds
are :mod:`lightning_ncnnqat.policy.speed`'s.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from lightning_ncnnqat.ncnn.timing import ModelToTime, Timing, paired_speedup
from lightning_ncnnqat.policy import speed as policy
from lightning_ncnnqat.speed.candidates import UnitSpeed
from lightning_ncnnqat.speed.segments import time_side_by_side

__all__ = ["LayerSpeed", "ModelSpeed", "SpeedMeasurement", "choose", "confirm", "explain", "PLAN_LABELS"]


@dataclass
class LayerSpeed:
    """One int8 layer timed on one target: median ms of its int8 and its float form (and their
    fastest runs, where timed: the figure least disturbed by other work on the machine).
    ``unit``: the torch layers timed together with it (its int8 chain); empty when alone."""

    name: str  # torch module name
    int8_ms: float
    float_ms: float
    kind: str = ""  # ncnn layer type
    int8_min_ms: float | None = None
    float_min_ms: float | None = None
    unit: tuple[str, ...] = ()

    @property
    def ratio(self) -> float:
        """float / int8 of the medians: above 1 int8 is faster."""
        return self.float_ms / self.int8_ms

    @property
    def loses(self) -> bool:
        """Whether int8 loses clearly (:func:`policy.int8_layer_loses`) by the medians AND by the
        fastest runs, where timed: a layer near the margin is not flipped by one noisy run."""
        by_min = self.int8_min_ms is None or self.float_min_ms is None or policy.int8_layer_loses(
            self.float_min_ms, self.int8_min_ms)
        return policy.int8_layer_loses(self.float_ms, self.int8_ms) and by_min


@dataclass
class ModelSpeed:
    """One whole model timed: median [min-max] ms; ``float_layers``: int8 layers left float in it;
    ``speedup``: float / this, the median of per-round ratios (:func:`ncnn.timing.paired_speedup`);
    ``rounds``: its ms per round, in the order of the interleaved timing (empty from a profile);
    ``why``: per float layer, the figures that proposed it."""

    median_ms: float
    min_ms: float
    max_ms: float
    float_layers: list[str] = field(default_factory=list)
    speedup: float = 1.0
    rounds: list[float] = field(default_factory=list, repr=False)
    why: dict[str, str] = field(default_factory=dict, repr=False)


def _faster(base: ModelSpeed, other: ModelSpeed) -> float:
    """How much faster ``other`` runs than ``base``: paired per round where both kept their rounds."""
    if base.rounds and len(base.rounds) == len(other.rounds):
        return statistics.median(a / b for a, b in zip(base.rounds, other.rounds) if b > 0)
    return base.median_ms / other.median_ms


@dataclass
class SpeedMeasurement:
    """What was timed on one target (``clock``: "cpu" = process CPU time, "wall" = wall time).

    ``models``: "float", "int8" (every layer int8) and candidate plans, from the first half of
    the rounds; ``check``: the same models from the second half (empty: one half only);
    ``units``: the chains timed whole."""

    target: str
    machine: str
    threads: int
    clock: str
    layers: dict[str, LayerSpeed]
    models: dict[str, ModelSpeed]
    seconds: float = 0.0  # what measuring cost
    check: dict[str, ModelSpeed] = field(default_factory=dict)
    units: list[UnitSpeed] = field(default_factory=list)
    chosen: str | None = None  # the plan chosen and confirmed (prefer="speed"), else None
    confirmed: dict[str, ModelSpeed] = field(default_factory=dict)  # its confirming timing (and the next safer plan's)
    sizes: dict[str, int] = field(default_factory=dict)  # per model key: its .bin bytes (float, int8, the plans)

    def reported(self, key: str) -> ModelSpeed:
        """The figure of ``key`` to report: the confirming timing's, else the second half's."""
        return self.confirmed.get(key) or self.check.get(key) or self.models[key]


def _model_speed(t: Timing, fp: Timing, clock: str, float_layers: list[str], why: dict[str, str] | None = None
                 ) -> ModelSpeed:
    speedup = paired_speedup(fp, t, clock)
    if clock == "cpu" and t.cpu_median_ms is not None:
        return ModelSpeed(t.cpu_median_ms, t.cpu_min_ms or 0.0, t.cpu_max_ms or 0.0, float_layers, speedup,
                          list(t.cpu_runs or []), dict(why or {}))
    return ModelSpeed(t.median_ms, t.min_ms, t.max_ms, float_layers, speedup, list(t.wall_runs or []), dict(why or {}))


def _slower(models: dict[str, ModelSpeed], key: str) -> bool:
    f, s = models["float"], models[key]
    return policy.speed_verdict(s.speedup, f.median_ms - s.median_ms) == "slower"


def _pays(models: dict[str, ModelSpeed], cur_key: str, key: str) -> bool:
    cur, cand = models[cur_key], models[key]
    return policy.keep_float_pays(_faster(cur, cand), cur.speedup, cur.median_ms - cand.median_ms,
                                  models["float"].median_ms - cur.median_ms)


def choose(m: SpeedMeasurement) -> str:
    """The int8 model to deploy: all-int8 unless a plan with more layers float beats the current
    one clearly (:func:`policy.keep_float_pays`) on BOTH halves of the rounds (``m.models`` and
    ``m.check``: one half's noise does not move the plan, so two measurements decide alike; fewer
    float layers first: on a tie the smaller model, also when the walk stepped past it). Then the
    safety step: while the chosen model is slower than float on either half, the next plan with
    more layers float that is slower on neither is taken; where none is, the one whose worse half
    is fastest (int8 does not pay there: the summary says so)."""
    keys = sorted((k for k in m.models if k not in ("float", "int8")), key=lambda k: len(m.models[k].float_layers))
    halves = [h for h in (m.models, m.check) if h]
    chosen = "int8"
    for key in keys:
        if all(_pays(h, chosen, key) for h in halves):
            chosen = key
    # then the plan with the fewest layers float that the chosen one does not clearly beat (one
    # half's noise let it past a smaller plan of the same speed): float layers only where they pay
    for key in ["int8", *keys]:
        if key == chosen or len(m.models[key].float_layers) >= len(m.models[chosen].float_layers):
            break
        if not all(_pays(h, key, chosen) for h in halves) and not any(_slower(h, key) for h in halves):
            chosen = key
            break
    if any(_slower(h, chosen) for h in halves):
        n = len(m.models[chosen].float_layers)
        safer = [k for k in keys if len(m.models[k].float_layers) > n]
        ok = [k for k in safer if not any(_slower(h, k) for h in halves)]
        if ok:
            chosen = ok[0]
        elif safer:
            chosen = max([chosen, *safer], key=lambda k: min(h[k].speedup for h in halves))
    return chosen


def confirm(m: SpeedMeasurement, chosen: str, files: dict[str, ModelToTime], runs: int = policy.SPEED_CONFIRM_RUNS) -> str:
    """Time the ``chosen`` plan, float and the next plan with more layers float that was slower
    than float on neither half (``files``: each key's model) side by side, put those figures in
    ``m.confirmed`` (the ones reported), and return the plan to deploy: the safer one where this
    timing finds the chosen one slower than float and the safer one not. Raises NcnnRuntimeError
    when the timing fails."""
    n = len(m.models[chosen].float_layers)
    halves = [h for h in (m.models, m.check) if h]
    keys = sorted((k for k in m.models if k not in ("float", "int8")), key=lambda k: len(m.models[k].float_layers))
    safer = next((k for k in keys if len(m.models[k].float_layers) > n and not any(_slower(h, k) for h in halves)), None)
    names = ["float", chosen] + ([safer] if safer else [])
    t = time_side_by_side([files[k] for k in names], runs=runs)
    clock = m.clock
    m.confirmed = {k: _model_speed(t[k], t["float"], clock, m.models[k].float_layers, m.models[k].why) for k in names}
    if safer is not None and _slower(m.confirmed, chosen) and not _slower(m.confirmed, safer):
        return safer
    return chosen


#: What each candidate plan is (``speed.candidates``), said once in the summary.
PLAN_LABELS = {
    "split": "depthwise convs of int8 chains float, other layers float where they lose clearly",
    "loose": "per int8 chain whichever form timed cheapest",
    "floor": "int8 only where a chain clearly wins",
    "minimal": "every layer float but the best chain",
}


def _label(key: str) -> str:
    return "all-int8" if key == "int8" else f"'{key}'"


def explain(m: SpeedMeasurement, chosen: str) -> dict[str, str]:
    """Per model key ("int8" and each plan): in a few words why it was or was not deployed, by the
    rules :func:`choose` and :func:`confirm` applied (``chosen``: what they returned)."""
    halves = [h for h in (m.models, m.check) if h]
    walked = choose(m)  # before the confirming timing: a plan it found slower than float gave way
    keys = ["int8", *sorted((k for k in m.models if k not in ("float", "int8")),
                            key=lambda k: len(m.models[k].float_layers))]
    nc = len(m.models[chosen].float_layers)
    out: dict[str, str] = {}
    for k in keys:
        slow = [_slower(h, k) for h in halves]
        if k == chosen:
            out[k] = "taken" + (" (int8 does not pay: the least slow)" if any(slow) else "")
        elif k == walked:
            out[k] = f"slower than float in the confirming timing: {_label(chosen)} taken instead"
        elif all(slow):
            out[k] = "slower than float"
        elif any(slow):
            out[k] = "slower than float on one half of the rounds"
        elif len(m.models[k].float_layers) >= nc:
            pays = [_pays(h, chosen, k) for h in halves]
            out[k] = (f"faster than {_label(chosen)} on one half of the rounds only" if any(pays) else
                      f"not clearly faster than {_label(chosen)}, which keeps "
                      f"{'fewer' if len(m.models[k].float_layers) > nc else 'as many'} layers float "
                      f"(needs {policy.SPEED_KEEP_FLOAT_GAIN:.0%} and {policy.SPEED_MIN_DIFF_MS * 1000:.0f} us on both halves)")
        else:
            out[k] = f"{_label(chosen)} ran clearly faster on both halves of the rounds"
    return out
