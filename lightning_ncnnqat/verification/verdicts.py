"""The export's verdicts on what the runtime checks measured: notes (facts that explain a figure)
and warnings (problems), per quantized layer and per output, for :mod:`lightning_ncnnqat.verification.runtime_checks`."""

from __future__ import annotations

from lightning_ncnnqat.policy import MIN_TOP1_AGREEMENT
from lightning_ncnnqat.ncnn.isolated import HOST
from lightning_ncnnqat.verification.output_floor import Float32Floor, judge_output, output_failing
from lightning_ncnnqat.verification.report import ExportReport


def approximation_notes(report: ExportReport, target: str, checks: list) -> None:
    """Note the layers whose default-options gap is the runtime's approximation (right with it off)."""
    for c in checks:
        if c.runtime_approximation:
            report.notes.append(
                f"on {target}, layer '{c.torch_name}' differs from the QAT layer by up to {100 * c.isolated_max_rel_err:.1f}% "
                f"of its output range under default options (cosine {c.isolated_cosine:.5f}) and matches with fp16 "
                "storage/arithmetic and packing off: the runtime's own approximation, not a wrong layer"
            )


def judge(report: ExportReport, floor: Float32Floor) -> None:
    """Notes and warnings of this machine's layer checks and output parity (top-1, cosine vs floor)."""
    approximation_notes(report, HOST, report.layer_checks)
    for c in report.layer_checks:
        if c.ok and c.int8_step_mismatch:
            packed = c.int8_step_mismatch_without_packing
            why = (
                f" ({100 * packed:.3f}% with use_packing_layout=False: ncnn's packed kernel requantizes with an "
                "approximate reciprocal; the runtime's own approximation, not a QAT error)"
                if packed is not None and packed < c.int8_step_mismatch
                else ""
            )
            report.notes.append(
                f"layer '{c.torch_name}': {100 * c.int8_step_mismatch:.3f}% of its int8 outputs are one step off the "
                f"QAT layer on ncnn's own input under default options{why}"
            )
        if c.ok is False:
            fix = (
                "it is right with net.opt.use_packing_layout = False"
                if c.ok_without_packing
                else "it is wrong with use_packing_layout = False too"
            )
            report.warnings.append(
                f"layer '{c.torch_name}' (ncnn '{c.ncnn_name}') is computed wrongly by the ncnn int8 runtime "
                f"under default options (cosine {c.isolated_cosine:.4f}); {fix}. Keep it in float "
                "(QATConfig.skip) or configure the runtime"
            )
        elif c.ok is None:
            report.warnings.append(
                f"layer '{c.torch_name}' could not be checked: its input in the ncnn int8 runtime is non-finite or "
                "beyond int32 range after scaling (an upstream layer is wrong)"
            )
    for i, o in enumerate(report.outputs):
        a = o.int8_vs_qat
        where = f" (output {o.blob}, {o.torch})" if len(report.outputs) > 1 else ""
        judge_output(report, floor, i, a.cosine, where)
        # the noise that makes a flip a near-tie is measured on this very output: when its cosine
        # fails (below the bar, not at the float32 floor) the noise is the defect, and so are the flips
        failing = output_failing(a.cosine, o.float32_floor)
        if a.top1_agreement is not None and a.top1_agreement < MIN_TOP1_AGREEMENT:
            beyond = a.top1_agreement_beyond_noise
            if beyond is not None and beyond >= MIN_TOP1_AGREEMENT and not failing:
                report.notes.append(
                    f"int8 top-1 agreement with the QAT model is {100 * a.top1_agreement:.2f}%{where}, but all "
                    f"{a.near_tie_flips} flip(s) are near-ties: the reference margin is within the measured int8 "
                    f"noise (RMS {a.noise_rms:.3g} per value), so they say nothing about a defect"
                )
            elif failing:
                report.warnings.append(
                    f"int8 top-1 agreement with the QAT model is only {100 * a.top1_agreement:.2f}%{where} "
                    f"({a.top1_flips} flips; the output cosine {a.cosine:.6f} fails too, so the int8 noise they "
                    "would be near-ties within is itself the defect)"
                )
            else:
                report.warnings.append(
                    f"int8 top-1 agreement with the QAT model is only {100 * a.top1_agreement:.2f}%{where} "
                    f"({a.top1_flips - a.near_tie_flips} of {a.top1_flips} flips are beyond the int8 noise)"
                )
    if report.float32_floor is not None:
        report.runtime[HOST]["float32_floor"] = report.float32_floor
