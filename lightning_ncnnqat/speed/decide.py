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
2. its int8 model's requantize chains (``speed.segments``: what ncnn2int8 fuses) are timed as
   units, int8 against float (one child process, interleaved, process CPU time at one thread: a
   busy machine's preemption does not inflate it); a chain holding layers that lose in int8 even
   inside a chain (:data:`policy.SPEED_SPLIT_KINDS`) is also timed in the pieces it breaks into
   with them float; each int8 Gemm and MultiHeadAttention is a unit alone and the model's SDPA
   layers one unit (dynamic int8: float in, float out; SDPA int8 all together or not at all), so
   a losing one is re-planned float like any unit (``replan_as_float`` via ``skip``);
3. three candidate plans come from those figures (``speed.candidates``: ``clear``, ``loose``, and
   the ``floor`` fallback, int8 only where a unit clearly wins), their int8 models are written from
   the same export as the export itself would write them (``speed.variants``, no second export),
   and float, all-int8 and the candidates are timed side by side; the rounds are split in two
   halves: :func:`choose` takes a plan with more layers float only where it beats the current one
   by :func:`policy.keep_float_pays` on both, and steps to a safer plan while the chosen one is
   slower than float on either; the second half's figures are the ones reported.

``QATConfig.prefer``: ``"speed"`` keeps the chosen layers float; ``"int8"`` measures and reports
but keeps every layer int8; ``"size"`` times nothing (every layer int8: the smallest file). The
result is plain data (:class:`LayerSpeed`: per layer name int8 ms vs float ms), so a profile
measured on a board can feed the same rule (:func:`layers_to_keep_float`).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lightning_ncnnqat.errors import NcnnQatError
from lightning_ncnnqat.export.api import preflight_export
from lightning_ncnnqat.export.config import resolve_targets
from lightning_ncnnqat.ncnn.isolated import HOST, NcnnRuntimeError
from lightning_ncnnqat.ncnn.machine import machine_line
from lightning_ncnnqat.ncnn.timing import ModelToTime, Timing
from lightning_ncnnqat.policy import speed as policy
from lightning_ncnnqat.qat.dtypes import float32_example, float32_model
from lightning_ncnnqat.qat.plan import get_plan
from lightning_ncnnqat.qat.prepare import replan_as_float
from lightning_ncnnqat.speed.candidates import UnitSpeed, candidate_plans
from lightning_ncnnqat.speed.choice import (PLAN_LABELS, LayerSpeed, ModelSpeed, SpeedMeasurement, _model_speed, choose,
                                            confirm, explain)
from lightning_ncnnqat.speed.plan import whole_models
from lightning_ncnnqat.speed.segments import time_side_by_side
from lightning_ncnnqat.speed.unit_timing import split_rounds, time_chains
from lightning_ncnnqat.speed.variants import write_variant

__all__ = ["LayerSpeed", "ModelSpeed", "SpeedMeasurement", "SpeedDecision", "SpeedCheck", "speed_check",
           "layers_to_keep_float", "measure_speed", "choose", "decide_speed", "keep_slow_layers_float"]


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
        """``"faster"`` / ``"tie"`` / ``"slower"``: the chosen int8 model against float (reported
        rounds); None untimed."""
        m = self.measurement
        if m is None:
            return None
        f, s = m.reported("float"), m.reported(self.chosen)
        return policy.speed_verdict(s.speedup, f.median_ms - s.median_ms)

    def reasons(self) -> dict[str, str]:
        """``{layer: reason}`` of the layers kept float, with their figures (for the QAT plan)."""
        m = self.measurement
        if m is None:
            return {}
        why = m.models[self.chosen].why
        tail = "kept float for speed (prefer='speed'), measured at QAT start"
        return {n: f"{why.get(n, 'int8 slower than float on ' + m.target)}; {tail}" for n in self.keep_float}

    def lines(self) -> list[str]:
        """The summary: whole-model figures, each plan tried and why it was or was not taken, and
        plainly when int8 does not pay (last line; :meth:`verdict_line`)."""
        if self.measurement is None:
            return [f"int8 speed not measured: {self.not_measured}"] if self.not_measured else []
        m = self.measurement
        f = m.reported("float")

        def fig(key: str) -> str:
            s = m.reported(key)
            return f"{s.median_ms:.3f} ms [{s.min_ms:.3f}-{s.max_ms:.3f}] ({s.speedup:.2f}x {policy.PER_ROUND})"

        held = ("; figures from a confirming timing of the plan chosen" if m.confirmed
                else "; figures from the second half of the rounds" if m.check else "")
        why = explain(m, self.chosen) if self.prefer == "speed" else {}
        out = [f"int8 speed on {m.target} ({m.machine}; {m.threads} thread, {m.clock} time; ms: median [min-max] of "
               f"interleaved runs; Nx {policy.PER_ROUND}: float / int8 in each round, the median over rounds, so it can "
               f"differ from the ratio of the medians{held}; measured in {m.seconds:.1f} s): float {f.median_ms:.3f} ms, "
               f"int8 {fig('int8')}" + (f": {why['int8']}" if "int8" in why else "")]
        plans = [k for k in m.models if k not in ("float", "int8")]
        if plans:
            out.append("  plans tried (int8 layers kept float): " + "; ".join(
                f"{k} = {PLAN_LABELS.get(k, k)}" for k in plans))
        for key in plans:
            out.append(f"  {key}, {len(m.models[key].float_layers)} layer(s) float: {fig(key)}"
                       + (f": {why[key]}" if key in why else ""))
        if self.prefer == "speed":
            keep = self.keep_float
            out.append(f"prefer='speed': {len(keep)} of {len(m.layers)} int8 layer(s) kept float"
                       + (f" ({', '.join(keep)})" if keep
                          else " (none loses enough, or keeping them float does not pay)"))
        elif plans:
            best = max(plans, key=lambda k: m.reported(k).speedup)
            out.append(f"prefer={self.prefer!r}: every layer stays int8; with {len(m.models[best].float_layers)} "
                       f"float ({best}) it would run {m.reported(best).speedup:.2f}x float {policy.PER_ROUND} "
                       "(prefer='speed' keeps such layers float where the whole model gains)")
        last = self.verdict_line()
        return out + ([last] if last else [])

    def verdict_line(self) -> str | None:
        """The deployed int8 model's verdict in words where int8 does not clearly pay: slower than
        float, or a tie (size only, or nothing where the .bin is barely smaller: policy.tie_message)."""
        m = self.measurement
        if m is None:
            return None
        v, s = self.verdict, m.reported(self.chosen)
        if v == "slower":
            return (f"int8 does NOT pay on {m.target} for this model: its int8 model is {s.speedup:.2f}x the float "
                    f"model's speed {policy.PER_ROUND}; deploy the float model (model.ncnn.*) there, or measure on your board")
        if v == "tie":
            tol = (f"within {policy.SPEED_TIE_TOLERANCE:.0%} or {policy.SPEED_MIN_DIFF_MS * 1000:.0f} us, "
                   f"{s.speedup:.2f}x {policy.PER_ROUND}")
            return policy.tie_message(m.target, tol, m.sizes.get("float"), m.sizes.get(self.chosen))
        return None

    def note(self) -> str | None:
        """One line for the QAT plan's notes: the deployed int8 model against float."""
        m = self.measurement
        if m is None:
            return None
        f, s = m.reported("float"), m.reported(self.chosen)
        return (f"{m.threads} thread, {m.clock} ms: float {f.median_ms:.3f}, int8 as planned {s.median_ms:.3f} "
                f"({s.speedup:.2f}x {policy.PER_ROUND}, {self.verdict}); {len(self.keep_float)} layer(s) kept float for speed")


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


def _layer_speeds(units: list[UnitSpeed]) -> dict[str, LayerSpeed]:
    """Per torch layer: the figures of the smallest unit timed with it (a piece, else its chain)."""
    out: dict[str, LayerSpeed] = {}
    for u in units:
        for v in [u, *u.pieces]:
            for n, k in zip(v.layers, v.kinds):
                out[n] = LayerSpeed(n, v.int8_ms, v.float_ms, k, v.int8_min_ms, v.float_min_ms,
                                    v.layers if len(v.layers) > 1 else ())
    order = [n for u in units for n in u.layers]
    return {n: out[n] for n in order}


def measure_speed(model: nn.Module, example_input: Any, threads: int = 1, decide: bool = False) -> SpeedMeasurement:
    """Export a QAT-prepared ``model`` (x86) into a temporary directory and time it here: every
    int8 chain whole, then the whole float, all-int8 and candidate models (module docstring).
    ``decide``: also choose the plan (:func:`speed.choice.choose`) and confirm it in a timing of
    its own (:func:`speed.choice.confirm`; ``m.chosen``, ``m.confirmed``).

    Raises ExportError when the model cannot export; NcnnRuntimeError when a timing fails.
    """
    t0 = time.perf_counter()
    clock = "cpu" if threads == 1 else "wall"  # one thread: CPU time is immune to preemption
    with tempfile.TemporaryDirectory(prefix="ncnnqat_speed_") as tmp, float32_model(model) as m32:
        d = Path(tmp)
        # the export chain up to the int8 model, no runtime checks (the preflight's, files kept)
        report = preflight_export(m32, float32_example(example_input), export_dir=d)
        torch_of = {r.ncnn_name: r.torch_name for r in report.layers if r.ncnn_name}
        ncnn_of = {v: k for k, v in torch_of.items()}
        fw = report.float_weights or "fp32"
        fp, q = whole_models(d, threads, report.io)
        # SDPA called by the model itself stays int8: `skip` (replan_as_float) has no module to name
        units = [u for u in time_chains(d, fp, torch_of, threads, clock, fw)
                 if not any(n.startswith("(model):sdpa") for n in u.layers)]
        plans = candidate_plans(units, HOST, threads, clock)
        models = [fp, q]
        for p in plans:
            text, blob = write_variant(d, {ncnn_of.get(n, n) for n in p.float_layers}, fw)
            (d / f"{p.name}.param").write_text(text, encoding="utf-8")
            (d / f"{p.name}.bin").write_bytes(blob)
            models.append(ModelToTime(p.name, str(d / f"{p.name}.param"), str(d / f"{p.name}.bin"), q.inputs,
                                      q.extract, q.options))
        timed = time_side_by_side(models, runs=policy.SPEED_MODEL_RUNS)
        halves = [{k: split_rounds(t)[h] for k, t in timed.items()} for h in (0, 1)]

        def speeds(half: dict[str, Timing]) -> dict[str, ModelSpeed]:
            tf = half["float"]
            out = {"float": _model_speed(tf, tf, clock, []), "int8": _model_speed(half["int8"], tf, clock, [])}
            out.update({p.name: _model_speed(half[p.name], tf, clock, p.float_layers, p.why) for p in plans})
            return out

        m = SpeedMeasurement(HOST, machine_line(), threads, clock, _layer_speeds(units), speeds(halves[0]), 0.0,
                             speeds(halves[1]), units)
        m.sizes = {mt.name: Path(mt.bin).stat().st_size for mt in models if Path(mt.bin).is_file()}
        if decide:
            m.chosen = confirm(m, choose(m), {mt.name: mt for mt in models})
    m.seconds = time.perf_counter() - t0
    return m


def decide_speed(model: nn.Module, example_input: Any, prefer: str, check: SpeedCheck | None) -> SpeedDecision:
    """Measure (unless ``prefer="size"`` or nothing can be timed) and decide; a measurement that
    fails is reported in ``not_measured`` (it never stops QAT)."""
    if prefer == "size":
        return SpeedDecision(prefer, not_measured="prefer='size': every layer int8 (the smallest file), nothing timed")
    if check is None or not check.timed:
        why = "no target timed here" + (f" ({', '.join(check.others)}: emulated)" if check and check.others else "")
        return SpeedDecision(prefer, not_measured=why)
    try:
        m = measure_speed(model, example_input, check.threads, decide=prefer == "speed")
    except (NcnnQatError, NcnnRuntimeError, OSError, ValueError, KeyError) as e:
        # a timing never stops QAT: the export's own errors, the child's, files, a table or
        # .param the writer could not read back; the summary says what failed
        return SpeedDecision(prefer, not_measured=f"the timing failed ({type(e).__name__}: {str(e)[:200]})")
    return SpeedDecision(prefer, m, m.chosen or "int8" if prefer == "speed" else "int8")  # "int8": what deploys


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
    show_decision(decision, log, warn)
    return reasons


def show_decision(decision: Any, log: Callable[[str], None], warn: Callable[[str], None]) -> None:
    """Log a decision's summary lines; a "slower" verdict goes out once, as the warning only."""
    warned = decision.verdict_line() if decision.verdict == "slower" else None
    for line in decision.lines():
        if line != warned:
            log(line)
    if warned:
        warn(warned)
