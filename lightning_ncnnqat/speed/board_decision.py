"""The QAT start's keep-float decision for a board, from its profile (issue 20, item 3).

``QATConfig(board_profile="board.json")`` names a profile that ``python -m
lightning_ncnnqat.ncnn.targets profile`` wrote on the board (every ncnn layer of an export timed
there in int8 and in float, ncnn's default options). At QAT start (:func:`keep_board_layers_float`,
chosen by :func:`lightning_ncnnqat.start.start_qat` instead of the x86 timing of
:func:`~lightning_ncnnqat.speed.decide.keep_slow_layers_float`):

1. the just-prepared model's export chain runs into a temporary directory (no runtime checks):
   it gives the ncnn name of every int8 layer of the plan and the float ``model.ncnn.param``;
2. the profile must have timed THIS architecture: the same float layers (pnnx names them by their
   place in the graph, so every export of one architecture has the same names) at the same input
   shape (:func:`ncnn.targets.profile.check_architecture`); otherwise :class:`ProfileError` names
   the file;
3. each int8 layer's board times become a :class:`~lightning_ncnnqat.speed.decide.LayerSpeed`
   (:func:`speed.board.board_layer_speeds`), and the clear losers (:func:`policy.int8_layer_loses`,
   the same rule as on x86) are the candidates. The whole model cannot run on the board now: the
   board's int8 model with them float is ESTIMATED as its measured int8 time less what each
   loser saves alone, and the candidates are kept float only when that estimate pays
   (:func:`policy.keep_float_pays`). The summary says the decision is from the profile (its
   device line, thread count) and not confirmed as a whole model;
4. a layer that the profiled int8 model already ran in float has no int8 time there; under
   ``prefer="speed"`` it stays float (the profile's model is the evidence that it deploys so).

The board is the deploy target, so it decides; where this machine is timed too (the targets
include ``"x86"``), the x86 int8 vs float timing of the model as planned for the board is
reported, and decides nothing (``docs/targets.md``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lightning_ncnnqat.errors import NcnnQatError
from lightning_ncnnqat.export.api import preflight_export
from lightning_ncnnqat.ncnn.targets.profile import BoardProfile, check_architecture, emulated_allowed, load_profile
from lightning_ncnnqat.policy import speed as policy
from lightning_ncnnqat.qat.dtypes import float32_example, float32_model
from lightning_ncnnqat.qat.plan import get_plan
from lightning_ncnnqat.qat.prepare import replan_as_float
from lightning_ncnnqat.speed.board import board_layer_speeds
from lightning_ncnnqat.speed.decide import (
    LayerSpeed, SpeedCheck, SpeedDecision, decide_speed, layers_to_keep_float, show_decision,
)

__all__ = ["BoardDecision", "decide_on_board", "keep_board_layers_float"]

#: What stands for the figures of an emulated profile (tests of the mechanics): never shown as speeds.
_HIDDEN = "EMULATED, times not shown: they are not speeds"


@dataclass
class BoardDecision:
    """What a board profile decided at QAT start: per int8 layer its board times, the layers
    kept float, the whole-model figures measured on the board and the estimate with them float."""

    prefer: str
    profile: BoardProfile
    threads: int
    layers: dict[str, LayerSpeed]  # torch name -> its board times (int8 layers of the plan)
    untimed: list[str] = field(default_factory=list)  # int8 layers the profiled int8 model ran in float
    keep: list[str] = field(default_factory=list)  # torch names kept float for this board
    estimated_ms: float | None = None  # the board's int8 model with ``keep`` float, estimated
    x86: SpeedDecision | None = None  # this machine's timing, reported only

    @property
    def model_ms(self) -> dict[str, float]:
        """The board's whole-model medians (``float``, ``int8``) at :attr:`threads`."""
        return self.profile.model_ms(self.threads, allow_emulated=emulated_allowed())

    @property
    def where(self) -> str:
        """The board, its thread count and the profile's file, for every line that shows its figures."""
        return f"{self.profile.describe()}; {self.threads} thread(s); board profile {self.profile.path}"

    @property
    def verdict(self) -> str | None:
        """The planned int8 model against float on the board: ``faster`` / ``tie`` / ``slower``
        (:func:`policy.speed_verdict`; estimated when layers are kept float); None for an
        emulated profile (its times are not speeds, so they give no verdict)."""
        if self.profile.emulated:
            return None
        m = self.model_ms
        q = self.estimated_ms if self.keep and self.estimated_ms else m["int8"]
        return policy.speed_verdict(m["float"] / q, m["float"] - q)

    def reasons(self) -> dict[str, str]:
        """``{layer: reason}`` of the layers kept float, with the board's figures (for the plan)."""
        out = {}
        for n in self.keep:
            s = self.layers.get(n)
            if s is None:
                out[n] = (f"ran in float in the profiled int8 model on {self.where}: no int8 time there; kept float "
                          "(prefer='speed'), from the board profile at QAT start")
                continue
            figures = (_HIDDEN if self.profile.emulated else
                       f"int8 {s.int8_ms:.4f} ms vs float {s.float_ms:.4f} ms, {s.ratio:.2f}x")  # fmt: skip
            out[n] = (f"int8 slower than float on {self.where} (alone: {figures}); kept float for speed "
                      "(prefer='speed'), decided at QAT start from the board's layer times, not confirmed as a whole model")
        return out

    def lines(self) -> list[str]:
        """The summary: the board's figures, what was decided and on what evidence, plainly when
        int8 does not pay there, and this machine's figures as a report only."""
        m = self.model_ms
        out = []
        if self.profile.emulated:
            out.append("EMULATED board profile, accepted by allow_emulated_profiles() to test the mechanics: its "
                       "times are not speeds and decide nothing that matters")
        figures = _HIDDEN if self.profile.emulated else (
            f"float {m['float']:.3f} ms, int8 {m['int8']:.3f} ms ({m['float'] / m['int8']:.2f}x float, "
            f"{policy.speed_verdict(m['float'] / m['int8'], m['float'] - m['int8'])})")
        out.append(f"int8 speed on the board ({self.where}; ncnn's default options, medians measured there): {figures}")
        losers = layers_to_keep_float(self.layers)
        if self.prefer == "speed":
            est = "" if not self.keep or self.estimated_ms is None or self.profile.emulated else (
                f"; its int8 model with them float estimated at {self.estimated_ms:.3f} ms "
                f"({m['float'] / self.estimated_ms:.2f}x float, {self.verdict})")
            out.append(f"prefer='speed': {len(self.keep)} of {len(self.layers) + len(self.untimed)} int8 layer(s) kept "
                       f"float for the board" + (f" ({', '.join(self.keep)})" if self.keep else
                                                 " (none loses there, or keeping them float does not pay)")
                       + f": decided from the board profile's layer times, NOT confirmed as a whole model{est}; "
                       "profile the new export on the board to confirm")  # fmt: skip
        elif losers:
            out.append(f"prefer={self.prefer!r}: every layer stays int8; {len(losers)} lose alone on the board: "
                       f"{', '.join(losers)} (prefer='speed' keeps such layers float where the model gains)")
        last = self.verdict_line()
        out += ([last] if last else []) + self._x86_lines()
        return out

    def verdict_line(self) -> str | None:
        """The planned int8 model's verdict on the board in words where int8 does not clearly pay
        (slower, or a tie: :func:`policy.tie_message`); None where it is faster or emulated."""
        v, m = self.verdict, self.model_ms
        q = self.estimated_ms if self.keep and self.estimated_ms else m.get("int8")
        how = "estimated from its layer times" if self.keep and self.estimated_ms else "as profiled"
        if v == "slower":
            return (f"int8 does NOT pay on the board ({self.profile.describe()}) for this model ({how}: "
                    f"{m['float'] / q:.2f}x float): deploy the float model (model.ncnn.*) there")
        if v == "tie":
            return policy.tie_message(f"the board ({self.profile.describe()})", f"{how}: {m['float'] / q:.2f}x float")
        return None

    def _x86_lines(self) -> list[str]:
        if self.x86 is None:
            return []
        if self.x86.measurement is None:
            return [f"x86 (this machine) not timed: {self.x86.not_measured}"] if self.x86.not_measured else []
        x = self.x86.measurement
        f, q = x.models["float"], x.models["int8"]
        return [f"int8 speed on {x.target} ({x.machine}; {x.threads} thread, {x.clock} time), REPORTED ONLY (the "
                f"board profile decides): float {f.median_ms:.3f} ms, int8 as planned for the board {q.median_ms:.3f} "
                f"ms ({q.speedup:.2f}x {policy.PER_ROUND}, {self.x86.verdict})"]

    def note(self) -> str:
        """One line for the QAT plan's notes."""
        m = self.model_ms
        figures = _HIDDEN if self.profile.emulated else f"float {m['float']:.3f} ms, int8 {m['int8']:.3f} ms as profiled"
        return (f"{self.where}: {figures}; "
                f"{len(self.keep)} layer(s) kept float from its layer times (not confirmed as a whole model)")


def _exported_names(model: nn.Module, example_input: Any) -> tuple[dict[str, str], str, dict[str, list[int]]]:
    """``({torch name: ncnn name} of the plan's int8 layers, model.ncnn.param text, {input blob:
    shape})`` of the model's export (x86 chain up to the int8 model, no runtime checks).
    Raises ExportError naming the step and layer where the model cannot export."""
    with tempfile.TemporaryDirectory(prefix="ncnnqat_board_") as tmp, float32_model(model) as m32:
        report = preflight_export(m32, float32_example(example_input), export_dir=tmp)
        text = (Path(tmp) / "model.ncnn.param").read_text(encoding="utf-8")
    names = {r.torch_name: r.ncnn_name for r in report.layers if r.ncnn_name}
    inputs = {i["blob"]: [int(d) for d in i["shape"]] for i in report.io.get("inputs", [])}
    return names, text, inputs


def _estimate(layers: dict[str, LayerSpeed], n_int8: int, float_ms: float, int8_ms: float) -> tuple[list[str], float]:
    """The clear losers to keep float (never every int8 layer: the best stays) and the board's
    int8 model estimated with them float: its int8 time less what each saves alone. Empty when
    that estimate does not pay (:func:`policy.keep_float_pays`)."""
    losers = layers_to_keep_float(layers)
    if losers and len(losers) == n_int8:
        best = max(losers, key=lambda n: layers[n].ratio)
        losers = [n for n in losers if n != best]
    saved = sum(layers[n].int8_ms - layers[n].float_ms for n in losers)
    est = max(int8_ms - saved, 1e-6)
    if losers and policy.keep_float_pays(int8_ms / est, float_ms / int8_ms, saved, float_ms - int8_ms):
        return losers, est
    return [], est


def decide_on_board(model: nn.Module, example_input: Any, prefer: str, profile: str | Path) -> BoardDecision:
    """Decide which int8 layers of a QAT-prepared ``model`` stay float for the board ``profile``
    timed (module docstring). The profile's first thread count decides (1 by default).

    Raises:
        ProfileError: the profile timed another architecture or input shape (the file named).
        EmulatedProfileError: an emulated profile outside ``allow_emulated_profiles()``.
        ExportError: the model cannot export (step and layer named).
    """
    prof = load_profile(profile)
    allow = emulated_allowed()
    threads = prof.threads[0]
    model_ms = prof.model_ms(threads, allow_emulated=allow)  # refuses an emulated profile first
    names, float_param, inputs = _exported_names(model, example_input)
    check_architecture(prof, float_param, type(model).__name__, inputs)
    untimed = [t for t, n in names.items() if n in prof.float_in_int8]
    timed = {t: n for t, n in names.items() if n not in prof.float_in_int8}
    layers = board_layer_speeds(prof, timed, threads, allow_emulated=allow) if timed else {}
    decision = BoardDecision(prefer, prof, threads, layers, untimed)
    if prefer == "speed":
        keep, decision.estimated_ms = _estimate(layers, len(names), model_ms["float"], model_ms["int8"])
        decision.keep = keep + untimed
    return decision


RunOnce = Callable[[str, Callable[[], Any]], Any]


def keep_board_layers_float(
    model: nn.Module, example_input: Any, profile: str | Path, check: SpeedCheck | None, run_once: RunOnce,
    log: Callable[[str], None], warn: Callable[[str], None],
) -> dict[str, str]:
    """The QAT start's speed step with a board profile: decide for the board (on one process,
    ``run_once``), re-plan the layers kept float with the board's figures as reasons, note it in
    the plan, time this machine where ``check`` times it (reported only), log the summary.
    Returns ``{layer: reason}`` of the layers moved to float. ``prefer="size"`` reads nothing.

    Raises as :func:`decide_on_board` (the QAT start then leaves the model float)."""
    plan = get_plan(model)
    prefer = plan.config.prefer if plan is not None else "speed"
    if prefer == "size":
        log("prefer='size': every layer int8 (the smallest file); the board profile decides nothing")
        return {}
    decision: BoardDecision = run_once("board profile decision",
                                       lambda: decide_on_board(model, example_input, prefer, profile))
    reasons = decision.reasons()
    if reasons:
        replan_as_float(model, example_input, reasons)
    plan = get_plan(model)
    if plan is not None:
        plan.notes["(speed on the board)"] = decision.note()
    if check is not None and check.timed:  # this machine too: reported, the board decides
        try:
            decision.x86 = run_once("int8 speed check (reported only)",
                                    lambda: decide_speed(model, example_input, "int8", check))
        except NcnnQatError as e:  # decide_speed reports its own failures; a report never stops QAT
            decision.x86 = SpeedDecision("int8", not_measured=str(e)[:200])
    show_decision(decision, log, warn)
    return reasons
