"""Int8 only where it pays: the speed decision of the QAT start (issue 20).

On x86 without VNNI (and on ARMv8.2 cores, where float runs in fp16) ncnn's int8 model is often
slower than its float model: depthwise int8 has no AVX kernel here, and an int8 layer outside a
requantize chain pays the quantize of its input and the dequantize of its output (``docs/speed.md``
has the ncnn source facts). QAT is where this can be acted on: a layer kept float before
training is trained as float, so the exported int8 model loses nothing by it.

:func:`decide_speed` (run by :func:`lightning_ncnnqat.qat.start.start_qat`, so by ``QATCallback``
and ``prepare_qat(targets=...)`` alike) measures on the one target whose timing is real, this
machine (``"x86"``):

1. the just-prepared model is exported (x86 only) into a temporary directory;
2. every int8 layer is timed ALONE, int8 against its float twin (:func:`speed.plan.measure_layers`,
   one child process, interleaved, process CPU time at one thread: a busy machine's preemption
   does not inflate it); the layers that lose clearly (:func:`policy.int8_layer_loses`) are the
   candidates to keep float;
3. int8 models with those layers float are written from the same float model and table (no
   second export: :func:`ncnn.int8_writer.write_int8`), and the whole float, all-int8 and
   candidate models are timed side by side; a candidate is chosen only when it beats all-int8
   by :data:`policy.SPEED_KEEP_FLOAT_GAIN` (:func:`policy.keep_float_pays`), so the whole model decides,
   not the single layers.

``QATConfig.prefer``: ``"speed"`` keeps the chosen layers float; ``"int8"`` measures and reports
but keeps every layer int8; ``"size"`` times nothing (every layer int8: the smallest file). The
result is plain data (:class:`LayerSpeed`: per layer name int8 ms vs float ms), so a profile
measured on a board can feed the same rule (:func:`layers_to_keep_float`).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from lightning_ncnnqat.errors import NcnnQatError
from lightning_ncnnqat.export.api import preflight_export
from lightning_ncnnqat.export.config import resolve_targets
from lightning_ncnnqat.ncnn.int8_writer import Int8Spec, write_int8
from lightning_ncnnqat.ncnn.isolated import HOST, NcnnRuntimeError
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.ncnn.table import parse_table
from lightning_ncnnqat.policy import speed as policy
from lightning_ncnnqat.qat.dtypes import float32_example, float32_model
from lightning_ncnnqat.qat.plan import get_plan
from lightning_ncnnqat.qat.prepare import replan_as_float
from lightning_ncnnqat.ncnn.machine import machine_line
from lightning_ncnnqat.speed.plan import measure_layers, whole_models
from lightning_ncnnqat.ncnn.timing import ModelToTime, Timing, paired_speedup, time_models

__all__ = ["LayerSpeed", "ModelSpeed", "SpeedMeasurement", "SpeedDecision", "SpeedCheck", "speed_check",
           "layers_to_keep_float", "measure_speed", "decide_speed", "keep_slow_layers_float"]


@dataclass
class LayerSpeed:
    """One int8 layer timed alone on one target: median ms of its int8 and its float form (and
    their fastest runs, where timed: the figure least disturbed by other work on the machine)."""

    name: str  # torch module name
    int8_ms: float
    float_ms: float
    kind: str = ""  # ncnn layer type
    int8_min_ms: float | None = None
    float_min_ms: float | None = None

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
    ``rounds``: its ms per round, in the order of the interleaved timing (empty from a profile)."""

    median_ms: float
    min_ms: float
    max_ms: float
    float_layers: list[str] = field(default_factory=list)
    speedup: float = 1.0
    rounds: list[float] = field(default_factory=list, repr=False)


def _faster(base: ModelSpeed, other: ModelSpeed) -> float:
    """How much faster ``other`` runs than ``base``: paired per round where both kept their rounds."""
    if base.rounds and len(base.rounds) == len(other.rounds):
        return statistics.median(a / b for a, b in zip(base.rounds, other.rounds) if b > 0)
    return base.median_ms / other.median_ms


@dataclass
class SpeedMeasurement:
    """What was timed on one target (``clock``: "cpu" = process CPU time, "wall" = wall time)."""

    target: str
    machine: str
    threads: int
    clock: str
    layers: dict[str, LayerSpeed]
    models: dict[str, ModelSpeed]  # "float", "int8" (every layer int8) and "int8-<n>f" candidates
    seconds: float = 0.0  # what measuring cost


@dataclass
class SpeedDecision:
    """The speed decision of one QAT start: which int8 layers stay float, and the figures why."""

    prefer: str
    measurement: SpeedMeasurement | None = None
    chosen: str = "int8"  # key of ``measurement.models``
    not_measured: str = ""  # why nothing was timed

    @property
    def keep_float(self) -> list[str]:
        """Torch names of the int8 layers kept float for speed."""
        if self.measurement is None or self.prefer != "speed":
            return []
        return list(self.measurement.models[self.chosen].float_layers)

    @property
    def verdict(self) -> str | None:
        """``"faster"`` / ``"tie"`` / ``"slower"``: the chosen int8 model against float; None untimed."""
        m = self.measurement
        if m is None:
            return None
        f, s = m.models["float"], m.models[self.chosen]
        return policy.speed_verdict(s.speedup, f.median_ms - s.median_ms)

    def reasons(self) -> dict[str, str]:
        """``{layer: reason}`` of the layers kept float, with their figures (for the QAT plan)."""
        m = self.measurement
        if m is None:
            return {}
        return {
            n: f"int8 slower than float on {m.target} (alone, {m.threads} thread, {m.clock} time: int8 "
               f"{m.layers[n].int8_ms:.4f} ms vs float {m.layers[n].float_ms:.4f} ms, {m.layers[n].ratio:.2f}x); "
               f"kept float for speed (prefer='speed'), measured at QAT start"
            for n in self.keep_float
        }

    def lines(self) -> list[str]:
        """The summary: whole-model figures, what was decided, and plainly when int8 does not pay."""
        if self.measurement is None:
            return [f"int8 speed not measured: {self.not_measured}"] if self.not_measured else []
        m = self.measurement
        f = m.models["float"]

        def fig(key: str) -> str:
            s = m.models[key]
            return f"{s.median_ms:.3f} ms [{s.min_ms:.3f}-{s.max_ms:.3f}] ({s.speedup:.2f}x)"

        out = [f"int8 speed on {m.target} ({m.machine}; {m.threads} thread, {m.clock} time, medians of interleaved "
               f"runs, measured in {m.seconds:.1f} s): float {f.median_ms:.3f} ms, int8 {fig('int8')}"]
        for key, s in m.models.items():
            if key not in ("float", "int8"):
                out.append(f"  int8 with {len(s.float_layers)} layer(s) that lose alone kept float: {fig(key)}")
        losers = layers_to_keep_float(m.layers)
        if self.prefer == "speed":
            keep = self.keep_float
            out.append(f"prefer='speed': {len(keep)} of {len(m.layers)} int8 layer(s) kept float"
                       + (f" ({', '.join(keep)})" if keep
                          else " (none loses enough, or keeping them float does not pay)"))
        elif losers:
            out.append(f"prefer={self.prefer!r}: every layer stays int8; {len(losers)} lose alone: {', '.join(losers)}"
                       " (prefer='speed' keeps such layers float where the whole model gains)")
        v = self.verdict
        s = m.models[self.chosen]
        if v == "slower":
            out.append(f"int8 does NOT pay on {m.target} for this model: its int8 model is {s.speedup:.2f}x "
                       "the float model's speed; deploy the float model (model.ncnn.*) there, or measure on your board")
        elif v == "tie":
            out.append(f"int8 ties with float on {m.target} (within {policy.SPEED_TIE_TOLERANCE:.0%} or "
                       f"{policy.SPEED_MIN_DIFF_MS * 1000:.0f} us): it pays in size only")
        return out

    def note(self) -> str | None:
        """One line for the QAT plan's notes: the deployed int8 model against float."""
        m = self.measurement
        if m is None:
            return None
        f, s = m.models["float"], m.models[self.chosen]
        return (f"{m.threads} thread, {m.clock} ms: float {f.median_ms:.3f}, int8 as planned {s.median_ms:.3f} "
                f"({s.speedup:.2f}x, {self.verdict}); {len(self.keep_float)} layer(s) kept float for speed")


@dataclass(frozen=True)
class SpeedCheck:
    """Where the QAT start may time int8 against float: ``timed`` holds the targets whose timing
    is real (this machine, when the user's targets include it); ``others`` the ones not timed."""

    timed: tuple[str, ...]
    others: tuple[str, ...] = ()
    threads: int = 1


def speed_check(targets: str | Sequence[str]) -> SpeedCheck:
    """The :class:`SpeedCheck` for the export targets a caller was given (``"auto"`` or a list).

    This machine (``"x86"``) is timed when ``targets`` is ``"auto"`` or names it: a user who
    names only emulated ARM targets deploys there, and this machine's timing says nothing of
    them; emulated times are never speeds. Raises ValueError naming an unknown target.
    """
    resolved = resolve_targets(targets)
    named = targets == "auto" or (HOST in ([targets] if isinstance(targets, str) else list(targets)))
    timed = (HOST,) if named else ()
    return SpeedCheck(timed, tuple(t for t in resolved if t not in timed))


def layers_to_keep_float(layers: dict[str, LayerSpeed]) -> list[str]:
    """The layers that lose clearly alone (:func:`policy.int8_layer_loses`), in model order."""
    return [s.name for s in layers.values() if s.loses]


def _candidates(layers: dict[str, LayerSpeed]) -> list[list[str]]:
    """Sets of layers to try float in the whole model: the clear losers. A set holding every int8
    layer would leave QAT nothing to quantize: its best layer stays int8 then."""
    clear = layers_to_keep_float(layers)
    if clear and len(clear) == len(layers):
        best = max(clear, key=lambda n: layers[n].ratio)
        clear = [n for n in clear if n != best]
    return [clear] if clear else []


def _variant(d: Path, keep: set[str], float_weights: str) -> tuple[str, bytes]:
    """The int8 model of export ``d`` with the ncnn layers ``keep`` float: its table rows dropped
    and the int8 writer run again on the same float model."""
    fparam = NcnnParam.parse((d / "model.ncnn.param").read_text(encoding="utf-8"))
    weights, inputs = parse_table((d / "model.ncnn.table").read_text(encoding="utf-8"))
    specs = {n: Int8Spec(n, n, np.asarray(w, dtype=np.float32), inputs[n]) for n, w in weights.items() if n not in keep}
    res = write_int8(fparam, (d / "model.ncnn.bin").read_bytes(), specs, quantize_gemm=False,
                     float_weights=float_weights)
    return res.param_text, res.bin_bytes


def _model_speed(t: Timing, fp: Timing, clock: str, float_layers: list[str]) -> ModelSpeed:
    speedup = paired_speedup(fp, t, clock)
    if clock == "cpu" and t.cpu_median_ms is not None:
        return ModelSpeed(t.cpu_median_ms, t.cpu_min_ms or 0.0, t.cpu_max_ms or 0.0, float_layers, speedup,
                          list(t.cpu_runs or []))
    return ModelSpeed(t.median_ms, t.min_ms, t.max_ms, float_layers, speedup, list(t.wall_runs or []))


def measure_speed(model: nn.Module, example_input: Any, threads: int = 1) -> SpeedMeasurement:
    """Export a QAT-prepared ``model`` (x86) into a temporary directory and time it here: every
    int8 layer alone, then the whole float, all-int8 and candidate models (module docstring).

    Raises ExportError when the model cannot export; NcnnRuntimeError when a timing fails.
    """
    t0 = time.perf_counter()
    clock = "cpu" if threads == 1 else "wall"  # one thread: CPU time is immune to preemption
    with tempfile.TemporaryDirectory(prefix="ncnnqat_speed_") as tmp, float32_model(model) as m32:
        d = Path(tmp)
        # the export chain up to the int8 model, no runtime checks (the preflight's, files kept)
        report = preflight_export(m32, float32_example(example_input), export_dir=d)
        torch_of = {r.ncnn_name: r.torch_name for r in report.layers if r.ncnn_name}
        layers = {}
        for t in measure_layers(d, threads=threads, runs=policy.SPEED_LAYER_RUNS, io=report.io, quantize=False):
            name = torch_of.get(t.ncnn_name, t.ncnn_name)
            low = (t.int8.cpu_min_ms, t.float.cpu_min_ms) if clock == "cpu" else (t.int8.min_ms, t.float.min_ms)
            layers[name] = LayerSpeed(name, t.int8.ms(clock), t.float.ms(clock), t.type, *low)
        ncnn_of = {v: k for k, v in torch_of.items()}
        fp, q = whole_models(d, threads, report.io)
        models = [fp, q]
        cands = {f"int8-{len(c)}f": c for c in _candidates(layers)}
        for key, c in cands.items():
            text, blob = _variant(d, {ncnn_of.get(n, n) for n in c}, report.float_weights or "fp32")
            (d / f"{key}.param").write_text(text, encoding="utf-8")
            (d / f"{key}.bin").write_bytes(blob)
            models.append(ModelToTime(key, str(d / f"{key}.param"), str(d / f"{key}.bin"), q.inputs, q.extract,
                                      q.options))
        timed = time_models(models, runs=policy.SPEED_MODEL_RUNS)
    tf = timed["float"]
    speeds = {"float": _model_speed(tf, tf, clock, []), "int8": _model_speed(timed["int8"], tf, clock, [])}
    speeds.update({k: _model_speed(timed[k], tf, clock, c) for k, c in cands.items()})
    return SpeedMeasurement(HOST, machine_line(), threads, clock, layers, speeds, time.perf_counter() - t0)


def choose(m: SpeedMeasurement) -> str:
    """The int8 model to deploy: all-int8 unless a candidate with layers float beats it clearly
    (:func:`policy.keep_float_pays`; fewer float layers first: on a tie the smaller model)."""
    chosen = "int8"
    for key in sorted((k for k in m.models if k not in ("float", "int8")), key=lambda k: len(m.models[k].float_layers)):
        cur, cand = m.models[chosen], m.models[key]
        if policy.keep_float_pays(_faster(cur, cand), cur.speedup, cur.median_ms - cand.median_ms,
                                  m.models["float"].median_ms - cur.median_ms):
            chosen = key
    return chosen


def decide_speed(model: nn.Module, example_input: Any, prefer: str, check: SpeedCheck | None) -> SpeedDecision:
    """Measure (unless ``prefer="size"`` or nothing can be timed) and decide; a measurement that
    fails is reported in ``not_measured`` (it never stops QAT)."""
    if prefer == "size":
        return SpeedDecision(prefer, not_measured="prefer='size': every layer int8 (the smallest file), nothing timed")
    if check is None or not check.timed:
        why = "no target timed here" + (f" ({', '.join(check.others)}: emulated)" if check and check.others else "")
        return SpeedDecision(prefer, not_measured=why)
    try:
        m = measure_speed(model, example_input, check.threads)
    except (NcnnQatError, NcnnRuntimeError, OSError, ValueError, KeyError) as e:
        # a timing never stops QAT: the export's own errors, the child's, files, a table or
        # .param the writer could not read back; the summary says what failed
        return SpeedDecision(prefer, not_measured=f"the timing failed ({type(e).__name__}: {str(e)[:200]})")
    return SpeedDecision(prefer, m, choose(m) if prefer == "speed" else "int8")  # "int8": what deploys


RunOnce = Callable[[str, Callable[[], Any]], Any]


def keep_slow_layers_float(
    model: nn.Module, example_input: Any, check: SpeedCheck | None, run_once: RunOnce,
    log: Callable[[str], None], warn: Callable[[str], None],
) -> dict[str, str]:
    """The QAT start's speed step: decide (on one process, ``run_once``), re-plan the layers kept
    float with their figures as reasons, note the whole-model figures in the plan, log the
    summary. Returns ``{layer: reason}`` of the layers moved to float."""
    plan = get_plan(model)
    prefer = plan.config.prefer if plan is not None else "speed"
    decision: SpeedDecision = run_once("int8 speed check", lambda: decide_speed(model, example_input, prefer, check))
    reasons = decision.reasons()
    if reasons:
        replan_as_float(model, example_input, reasons)
    plan = get_plan(model)
    note = decision.note()
    if plan is not None and note is not None:
        plan.notes[f"(speed on {decision.measurement.target})"] = note
    for line in decision.lines():
        log(line)
    if decision.verdict == "slower":
        warn(decision.lines()[-1])
    return reasons
