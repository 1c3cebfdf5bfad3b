"""Rules on a model's outputs: the int8 output cosine (bar, float32 floor, default options),
top-1 agreement and near-ties, the runtime's approximation gap, and the float conversion.

Each rule takes measured figures and returns :class:`~.findings.Finding` objects (and, for an
output, the verdict ``report.json`` records next to the figure); nothing here measures or writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .bars import (
    FLOOR_FACTOR,
    MIN_DEFAULT_OPTIONS_COSINE,
    MIN_OUTPUT_COSINE,
    MIN_TOP1_AGREEMENT,
    approximation_gap,
    at_floor,
    needs_floor,
    output_failing,
)
from .findings import Finding, note, warning

_STRICT = "with fp16 storage/arithmetic and packed kernels off"


@dataclass(frozen=True)
class OutputVerdict:
    """The verdict on one output's int8 cosine: its findings and what ``report.json`` records.

    ``float32_floor``: the floor judged against (None: not measured); ``at_float32_floor``: whether
    the better figure is at it; ``default_options_ok``: whether the default options' own figure
    passes (only when a strict figure was judged too, else None)."""

    findings: tuple[Finding, ...]
    float32_floor: float | None
    at_float32_floor: bool | None
    default_options_ok: bool | None = None

    def as_dict(self, strict_judged: bool) -> dict[str, Any]:
        """``{"float32_floor", "at_float32_floor"}``, plus ``"default_options_ok"`` when a strict
        figure was judged: the keys an output's entry in ``report.json`` gains."""
        d: dict[str, Any] = {"float32_floor": self.float32_floor, "at_float32_floor": self.at_float32_floor}
        if strict_judged:
            d["default_options_ok"] = self.default_options_ok
        return d


def floor_not_measured(error: str) -> Finding:
    """The float64 run for the floor failed: the absolute bar alone judges."""
    return note("float32_floor_not_measured",
                f"float32 floor not measured (the QAT model does not run in float64: {error})")


def judge_output(
    cos: float, floor: float | None, *, where: str = "", on: str = "", strict: float | None = None
) -> OutputVerdict | None:
    """Judge an int8 output cosine ``cos`` with the QAT model; None when nothing applies
    (:func:`~.bars.needs_floor` is False: the caller then need not measure the floor).

    ``strict``: the same with the runtime's approximations off (emulated targets). The int8 model
    is judged on the better of the two (``best``) against the bar and the float32 ``floor``
    (None: not measured): a note at the floor, else a warning. When only the default options are
    lower, ``cos`` is also judged on its own: below :data:`MIN_DEFAULT_OPTIONS_COSINE` and not at
    the floor, a warning naming both figures. ``where`` names the output (empty for single-output
    models), ``on`` the target (``"on arm64-a53, "``; empty for this machine).
    """
    if not needs_floor(cos, strict):
        return None
    best = cos if strict is None else max(cos, strict)
    gap = strict is not None and strict > cos  # only the default options are lower
    best_ok = best >= MIN_OUTPUT_COSINE or (floor is not None and at_floor(best, floor))
    default_ok = not gap or cos >= MIN_DEFAULT_OPTIONS_COSINE or (floor is not None and at_floor(cos, floor))
    found: list[Finding] = []
    if best < MIN_OUTPUT_COSINE:
        found.append(_below_bar(best, floor, where, on, cos if gap else None, best_ok and default_ok))
    if best_ok and not default_ok:
        floor_txt = "" if floor is None else f" and not at the float32 floor {floor:.6f}"
        found.append(warning(
            "default_options_below_bar",
            f"{on}int8 output cosine with the QAT model is only {cos:.6f}{where} under default options, {best:.6f} "
            f"{_STRICT}: below {MIN_DEFAULT_OPTIONS_COSINE}{floor_txt}. The int8 model is right, but the runtime's "
            "default options lose too much on this model: deploy with those options off (net.opt), or see the "
            "per-layer checks for the layer",
            value=cos, bar=MIN_DEFAULT_OPTIONS_COSINE,
        ))
    return OutputVerdict(tuple(found), floor, None if floor is None else at_floor(best, floor),
                         default_ok if strict is not None else None)


def _below_bar(best: float, floor: float | None, where: str, on: str, default: float | None, tail_ok: bool) -> Finding:
    """The better figure ``best`` misses the bar: a note at the float32 ``floor``, else a warning.
    ``default``: the default options' lower figure, where a strict one was judged."""
    figure = f"{best:.6f}{where}" + (f" {_STRICT}" if default is not None else "")
    err8 = 1.0 - best
    if floor is not None and at_floor(best, floor):
        tail = f"; under default options it is {default:.6f}: the runtime's own approximation" if default is not None and tail_ok else ""
        return note(
            "output_at_float32_floor",
            f"{on}int8 output cosine with the QAT model is {figure}, below {MIN_OUTPUT_COSINE} but at the float32 "
            f"floor: the QAT model itself reaches only cosine {floor:.6f} between float32 and float64 arithmetic on "
            f"the held batch (int8 error 1-cos {err8:.3g} <= {FLOOR_FACTOR:g} x the floor's {1.0 - floor:.3g}); the "
            f"model's own conditioning, not a quantization error{tail}",
            value=best, bar=MIN_OUTPUT_COSINE,
        )
    why = "" if floor is None else (
        f", beyond the QAT model's float32 floor {floor:.6f} (int8 error 1-cos {err8:.3g} > {FLOOR_FACTOR:g} x the "
        f"floor's {1.0 - floor:.3g})"
    )
    tail = f"; {default:.6f} under default options" if default is not None else ""
    return warning("output_below_bar", f"{on}int8 output cosine with the QAT model is only {figure}{why}{tail}",
                   value=best, bar=MIN_OUTPUT_COSINE)


class Top1Figures(Protocol):
    """The top-1 figures of one output (``verification.parity.Agreement`` has them)."""

    cosine: float
    top1_agreement: float | None
    top1_agreement_beyond_noise: float | None
    top1_flips: int
    near_tie_flips: int
    noise_rms: float


def judge_top1(a: Top1Figures, floor: float | None, where: str = "") -> list[Finding]:
    """Top-1 agreement below :data:`MIN_TOP1_AGREEMENT`: a note when every flip is a near-tie
    (within the measured int8 noise) and the output's cosine passes; else a warning. The noise
    that makes a flip a near-tie is measured on this very output: when its cosine fails (below the
    bar, not at the float32 ``floor``) the noise is the defect, and so are the flips."""
    if a.top1_agreement is None or a.top1_agreement >= MIN_TOP1_AGREEMENT:
        return []
    failing = output_failing(a.cosine, floor)
    beyond = a.top1_agreement_beyond_noise
    pct = f"{100 * a.top1_agreement:.2f}%{where}"
    if beyond is not None and beyond >= MIN_TOP1_AGREEMENT and not failing:
        return [note(
            "top1_near_ties",
            f"int8 top-1 agreement with the QAT model is {pct}, but all {a.near_tie_flips} flip(s) are near-ties: "
            f"the reference margin is within the measured int8 noise (RMS {a.noise_rms:.3g} per value), so they "
            "say nothing about a defect",
            value=a.top1_agreement, bar=MIN_TOP1_AGREEMENT,
        )]
    if failing:
        text = (f"int8 top-1 agreement with the QAT model is only {pct} ({a.top1_flips} flips; the output cosine "
                f"{a.cosine:.6f} fails too, so the int8 noise they would be near-ties within is itself the defect)")
    else:
        text = (f"int8 top-1 agreement with the QAT model is only {pct} "
                f"({a.top1_flips - a.near_tie_flips} of {a.top1_flips} flips are beyond the int8 noise)")
    return [warning("top1_below_bar", text, value=a.top1_agreement, bar=MIN_TOP1_AGREEMENT)]


def judge_approximation_gap(target: str, default_cos: float, strict_cos: float) -> list[Finding]:
    """A note when a target's default-options cosine is materially below its strict one
    (:func:`~.bars.approximation_gap`): the runtime's own approximation, not a quantization error."""
    if not approximation_gap(default_cos, strict_cos):
        return []
    return [note(
        "runtime_approximation_gap",
        f"on {target}, int8 vs QAT cosine is {default_cos:.6f} under default options and {strict_cos:.6f} with "
        "fp16 storage/arithmetic and packed kernels off: the difference is the runtime's own approximation "
        "(float layers in fp16, approximate requantize), not a quantization error",
        value=default_cos, bar=strict_cos,
    )]


def float_arithmetic_note(outputs: Sequence[Mapping[str, Any]]) -> list[Finding]:
    """A note for float conversion outputs (``report.conversion["outputs"]``) whose float figure
    fails while int8 matches the QAT model: ncnn's float32 summation, not the converter."""
    odd = [o for o in outputs if o.get("float_failing") and o.get("int8_failing") is False]
    if not odd:
        return []
    figs = ", ".join(f"{o['blob']} cosine {o['cosine']:.6f}" for o in odd)
    return [note(
        "float_summation",
        f"the float ncnn model differs from the folded PyTorch model beyond its float32 floor ({figs}) while the int8 "
        "model (the same converted graph) matches the QAT model: ncnn's float32 summation on a poorly conditioned "
        "model, not a conversion that changes the model's meaning",
        value=min(o["cosine"] for o in odd), bar=MIN_OUTPUT_COSINE,
    )]


def conversion_departure(verdict: Mapping[str, Any]) -> list[Finding]:
    """A warning for a conversion verdict (``report.conversion``) that departs; none when it is
    faithful or was not judged. Names the departing outputs and where the departure starts."""
    if not verdict or verdict.get("faithful") is not False:
        return []
    bad = [o for o in verdict["outputs"] if o["departs"]]
    figs = ", ".join(
        f"{o['blob']} cosine {o['cosine']:.6f}" + ("" if o["float32_floor"] is None else f" (float32 floor {o['float32_floor']:.6f})")
        for o in bad
    )
    first = verdict.get("first_departure") or {}
    return [warning(
        "conversion_departs",
        f"the converter changed the model's meaning: the float ncnn model vs the folded PyTorch model gives {figs}, "
        f"below {MIN_OUTPUT_COSINE} and not at the float32 floor; {first.get('message', '')}. The int8 model inherits "
        "this; keep that op out of the model, or rewrite it with ops the converter keeps",
        layer=first.get("torch_layer"), value=min((o["cosine"] for o in bad), default=None), bar=MIN_OUTPUT_COSINE,
    )]
