"""Rules on the per-layer checks (one int8 layer on ncnn's own input, see
``verification.layer_checks``): a wrong layer, one that could not be judged, a gap that is the
runtime's own approximation, int8 outputs one step off. Each returns findings naming the layer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from .bars import MIN_LAYER_COSINE
from .findings import Finding, note, warning


class LayerFigures(Protocol):
    """What a per-layer check measured (``verification.layer_checks.LayerCheck`` has it)."""

    torch_name: str
    ncnn_name: str
    isolated_cosine: float
    isolated_max_rel_err: float
    ok: bool | None
    ok_without_packing: bool | None
    int8_step_mismatch: float | None
    int8_step_mismatch_without_packing: float | None
    runtime_approximation: bool | None


def approximation_notes(target: str, checks: Iterable[LayerFigures]) -> list[Finding]:
    """Notes for layers whose default-options error is the runtime's approximation: right with
    fp16 and packing off (``runtime_approximation``), so not wrong layers."""
    return [
        note(
            "layer_runtime_approximation",
            f"on {target}, layer '{c.torch_name}' differs from the QAT layer by up to {100 * c.isolated_max_rel_err:.1f}% "
            f"of its output range under default options (cosine {c.isolated_cosine:.5f}) and matches with fp16 "
            "storage/arithmetic and packing off: the runtime's own approximation, not a wrong layer",
            layer=c.torch_name, value=c.isolated_cosine, bar=MIN_LAYER_COSINE,
        )
        for c in checks
        if c.runtime_approximation
    ]


def host_layer_findings(checks: Iterable[LayerFigures]) -> list[Finding]:
    """This machine's per-layer verdicts, in layer order: int8 outputs one step off (a note), a
    wrong layer (a warning naming the fix), a layer whose ncnn input was garbage (a warning)."""
    found: list[Finding] = []
    for c in checks:
        if c.ok and c.int8_step_mismatch:
            found.append(_step_note(c))
        if c.ok is False:
            fix = (
                "it is right with net.opt.use_packing_layout = False"
                if c.ok_without_packing
                else "it is wrong with use_packing_layout = False too"
            )
            found.append(warning(
                "layer_wrong",
                f"layer '{c.torch_name}' (ncnn '{c.ncnn_name}') is computed wrongly by the ncnn int8 runtime "
                f"under default options (cosine {c.isolated_cosine:.4f}); {fix}. Keep it in float "
                "(QATConfig.skip) or configure the runtime",
                layer=c.torch_name, value=c.isolated_cosine, bar=MIN_LAYER_COSINE,
            ))
        elif c.ok is None:
            found.append(warning(
                "layer_not_judged",
                f"layer '{c.torch_name}' could not be checked: its input in the ncnn int8 runtime is non-finite or "
                "beyond int32 range after scaling (an upstream layer is wrong)",
                layer=c.torch_name,
            ))
    return found


def _step_note(c: LayerFigures) -> Finding:
    """A note: some of a right layer's int8 outputs are one step off, and whether the packed
    kernels' approximate requantize explains it."""
    packed = c.int8_step_mismatch_without_packing
    why = (
        f" ({100 * packed:.3f}% with use_packing_layout=False: ncnn's packed kernel requantizes with an "
        "approximate reciprocal; the runtime's own approximation, not a QAT error)"
        if packed is not None and packed < c.int8_step_mismatch
        else ""
    )
    return note(
        "layer_int8_steps_off",
        f"layer '{c.torch_name}': {100 * c.int8_step_mismatch:.3f}% of its int8 outputs are one step off the "
        f"QAT layer on ncnn's own input under default options{why}",
        layer=c.torch_name, value=c.int8_step_mismatch,
    )


def target_layer_findings(target: str, profile: str, checks: Iterable[LayerFigures]) -> list[Finding]:
    """An emulated target's per-layer verdicts: a warning per layer computed wrongly there."""
    return [
        warning(
            "layer_wrong",
            f"layer '{c.torch_name}' (ncnn '{c.ncnn_name}') is computed wrongly by the ncnn int8 runtime on "
            f"{target} ({profile}) under default options (cosine {c.isolated_cosine:.4f})",
            layer=c.torch_name, value=c.isolated_cosine, bar=MIN_LAYER_COSINE,
        )
        for c in checks
        if c.ok is False
    ]
