"""The QAT start: ONE sequence that ``QATCallback`` (at ``start_epoch``) and :func:`prepare_qat`
(without a Trainer) both run, so a model gets the same plan, ranges and int8 decisions either way.

1. plan and apply (fold BN, attach quantizers; :func:`prepare.plan_and_apply`);
2. the calibrated start, when the config asks for one (``range_init`` / ``ranges``): ncnn2table's
   calibration on the BN-folded float model sets the input thresholds;
3. the export preflight, when ``targets`` is given: ONNX, pnnx, matching and the int8 writer on
   the just-prepared model, and every int8 layer run once on each target
   (:func:`export.preflight.preflight`);
4. the measured int8 decisions: layers a target computes wrongly are re-planned as float, with
   the reason (:func:`prepare.measured_float_reasons`, :func:`prepare.replan_as_float`; grouped
   convs under ``quantize_grouped_convs="auto"``), then the thresholds are calibrated again
   (a new plan may have new range owners).

A start that fails leaves the model float (the Parameters untouched). The sequence knows
nothing of Lightning: the callback passes ``run_once`` (run on global rank 0, broadcast the
result) and its own ``log`` / ``warn``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from lightning_ncnnqat.qat.config import QATConfig
from lightning_ncnnqat.speed.decide import SpeedCheck, keep_slow_layers_float, speed_check
from lightning_ncnnqat.speed.board_decision import keep_board_layers_float
from lightning_ncnnqat.qat.model_forms import check_model_form
from lightning_ncnnqat.export.api import resolve_targets
from lightning_ncnnqat.export.attention_fusion import find_converter_units
from lightning_ncnnqat.export.preflight import preflight
from lightning_ncnnqat.qat.plan import QATPlan, get_plan
from lightning_ncnnqat.qat.model_copies import follow_inner_copies
from lightning_ncnnqat.qat.prepare import measured_float_reasons, plan_and_apply, replan_as_float, unprepare
from lightning_ncnnqat.calibration.start import calibrated_thresholds
from lightning_ncnnqat.qat.ranges import check_one_input, set_thresholds
from lightning_ncnnqat.qat.wrappers import unwrap
from lightning_ncnnqat.speed.chains import ChainStart

__all__ = ["start_qat", "preflight_measure", "prepare_qat"]

RunOnce = Callable[[str, Callable[[], Any]], Any]
Measure = Callable[[nn.Module, Any], "dict[str, dict[str, float]]"]


def _here(what: str, fn: Callable[[], Any]) -> Any:
    """The single-process ``run_once``: run ``fn`` here."""
    return fn()


def _calibrate(
    model: nn.Module, config: QATConfig, calibration: Any, run_once: RunOnce, log: Callable[[str], None],
    warn: Callable[[str], None],
) -> None:
    """Step 2: thresholds from ``calibration`` (data, or a callable ``n -> data`` that reads the
    first ``n`` batches) set on every range owner."""
    method, n = config.start_calibration

    def run() -> dict[str, Any]:
        t0 = time.perf_counter()
        data = calibration(n) if callable(calibration) else calibration
        thresholds, notes = calibrated_thresholds(model, data, method, n)
        batches = len(data) if hasattr(data, "__len__") and not hasattr(data, "shape") else n
        return {"thresholds": thresholds, "notes": notes, "seconds": time.perf_counter() - t0, "batches": batches}

    found = run_once(f"calibrated start (range_init={config.range_init!r})", run)
    set_thresholds(model, found["thresholds"])
    for note in found["notes"]:
        warn(note)
    log(
        f"{len(found['thresholds'])} input thresholds set by {method} calibration over {found['batches']} "
        f"batch(es) in {found['seconds']:.1f} s; ranges {config.ranges}"
    )


def preflight_measure(
    targets: str | Sequence[str], float_weights: str = "fp32", held_batch: Any = None, verbose: bool = False
) -> Measure:
    """The measurement of step 3: :func:`export.preflight.preflight` on the model as it is."""

    def measure(model: nn.Module, example_input: Any) -> dict[str, dict[str, float]]:
        return preflight(model, example_input, verbose=verbose, targets=targets, float_weights=float_weights,
                         held_batch=held_batch)

    return measure


def start_qat(
    model: nn.Module,
    example_input: Any,
    config: QATConfig,
    *,
    calibration: Any = None,
    measure: Measure | None = None,
    speed: SpeedCheck | None = None,
    run_once: RunOnce = _here,
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
    who: str = "prepare_qat",
) -> QATPlan:
    """Start QAT on ``model`` in place (steps 1-4 of the module docstring); return the final plan.

    Args:
        example_input: traces the model (Tensor, tuple of positional inputs or dict of keyword inputs).
        config: the QAT settings.
        calibration: data for the calibrated start (batches, a DataLoader, a tensor of inputs) or
            a callable ``n -> data`` (the callback reads rank 0's first training batches);
            required when ``config.calibrated_start``.
        measure: ``measure(model, example_input) -> {target: {layer: cosine}}``, the export
            preflight of step 3 (:func:`preflight_measure`; the callback wraps it for its
            precision and held batch); None skips steps 3 and 4.
        speed: where int8 may be timed against float after step 4 (:func:`speed.decide.speed_check`
            of the caller's targets): under ``config.prefer="speed"`` the int8 layers that lose
            here are kept float before training (:func:`speed.decide.keep_slow_layers_float`).
        run_once: ``run_once(what, fn)`` runs ``fn`` once and gives every process its result
            (the callback: on global rank 0, then broadcast).
        log / warn: where progress lines and calibration warnings go.
        who: the entry point named in errors.

    Raises:
        ValueError: ``calibration`` missing for a calibrated start, no layer ncnn can run in
            int8, or a multi-input model with a calibrated start (nothing is changed).
        ExportError: the preflight found a step or layer that cannot export (the model is float again).
    """
    log = log or (lambda line: None)
    warn = warn or (lambda line: warnings.warn(f"{who}: {line}", stacklevel=3))
    if config.calibrated_start and calibration is None:
        raise ValueError(
            f"{who}: `calibration_data` is required with range_init={config.range_init!r}, "
            f"ranges={config.ranges!r} (the thresholds start from a calibration pass over it)"
        )
    check_one_input(model, config, who)
    chains = ChainStart.begin(model, example_input, config.chain_activations)  # counts int8 chains (apply_plan swaps)
    try:
        find_converter_units(model, example_input)  # Linears pnnx fuses into one MultiHeadAttention: planned as it
        plan = plan_and_apply(model, example_input, config)
        if config.calibrated_start:  # first, so the preflight measures the scales QAT starts from
            _calibrate(model, config, calibration, run_once, log, warn)
        if measure is None and config.board_profile is None:
            follow_inner_copies(model)  # an EMA held inside the model takes the plan too
            chains.note(model, plan, log)
            return plan
        wrong = run_once("export preflight", lambda: measure(model, example_input)) if measure else {}
        reasons = measured_float_reasons(model, wrong)
        if reasons:
            replan_as_float(model, example_input, reasons)
            kept = "; ".join(f"{n}: {r}" for n, r in reasons.items())
            log(f"measured at QAT start, kept in float before training: {kept}")
        if config.board_profile is not None:  # the board decides; this machine's timing only reports
            board = config.board_profile
            reasons.update(keep_board_layers_float(model, example_input, board, speed, run_once, log, warn))
        else:
            reasons.update(keep_slow_layers_float(model, example_input, speed, run_once, log, warn))  # int8 that pays
        if reasons and config.calibrated_start:  # a new plan may have new range owners
            _calibrate(model, config, calibration, run_once, log, warn)
    except BaseException:  # undo, then re-raise: nothing is swallowed
        unprepare(model)  # a failed start leaves the float model as it was (activations included)
        raise
    final = get_plan(model)
    assert final is not None
    follow_inner_copies(model)
    chains.note(model, final, log)
    return final


def prepare_qat(
    model: nn.Module,
    example_input: Any,
    config: QATConfig | None = None,
    calibration_data: Any = None,
    targets: str | Sequence[str] | None = None,
    *,
    float_weights: str = "fp32",
    verbose: bool = False,
) -> QATPlan:
    """Start QAT on ``model`` in place without a Trainer, as ``QATCallback`` does at ``start_epoch``.

    ``model`` may be wrapped (DataParallel, DDP, ``torch.compile``, Fabric): the user's model
    inside is converted, and a compiled wrapper recompiles on its next call.
    ``calibration_data`` (batches, a DataLoader or a tensor of inputs) sets the input thresholds
    when ``config`` asks for a calibrated start (``range_init`` other than ``"first_batch"``, or
    ``ranges`` other than ``"moving_average"``); it is required then, and raises ValueError
    before anything is changed when missing.

    ``targets`` (``"auto"`` or a list of ``"x86"``, ``"arm64-a53"``, ``"arm64-a76"``) runs the
    export preflight right after the surgery and makes the measured int8 decisions the callback
    makes: an int8 layer that ncnn computes wrongly on a target (grouped convs under
    ``quantize_grouped_convs="auto"``) is kept in float, with the reason in the plan. Without
    ``targets`` nothing is measured: the export later flags such layers instead. Raises
    ValueError if ncnn could run nothing in int8, ExportError if the model cannot export; a
    failed start leaves the model float. UnsupportedModelError (one line, the fix) for a form QAT
    cannot prepare (:mod:`.model_forms`: a ScriptModule, float64 weights...).
    """
    check_model_form(model, "prepare_qat")
    if targets is not None:
        resolve_targets(targets)  # ValueError naming an unknown target, before anything changes
    measure = None if targets is None else preflight_measure(targets, float_weights, verbose=verbose)
    plan = start_qat(
        model, example_input, config or QATConfig(), calibration=calibration_data, measure=measure,
        speed=None if targets is None else speed_check(targets), log=print if verbose else None,
    )
    if verbose:
        print(plan.summary())
    unmeasured = _unmeasured_grouped_convs(model, plan) if targets is None else []
    if unmeasured:
        warnings.warn(
            f"prepare_qat: {len(unmeasured)} grouped conv(s) run in int8 unmeasured ({', '.join(unmeasured[:4])}"
            f"{', ...' if len(unmeasured) > 4 else ''}): ncnn's int8 runtime computes some grouped convs wrongly; "
            "pass targets='auto' (or ['x86', ...]) to measure them and keep the wrong ones in float, "
            "as QATCallback does",
            stacklevel=2,
        )
    return plan


def _unmeasured_grouped_convs(model: nn.Module, plan: QATPlan) -> list[str]:
    """Int8 grouped convs (1 < groups < channels) left to measurement (``quantize_grouped_convs="auto"``)."""
    if plan.config.quantize_grouped_convs != "auto":
        return []
    modules = dict(unwrap(model).named_modules())
    return [
        n for n, p in plan.layers.items()
        if p.kind == "ConvolutionDepthWise" and 1 < modules[n].groups < modules[n].in_channels
    ]
