"""int8 parity and per-layer checks on the emulated ARM targets, judged with the same rules as
this machine's (:mod:`lightning_ncnnqat.policy`) and rendered into the report. A target that is
not set up, or whose ncnn run crashes, times out or fails, is a report entry; any other
exception is a fault of ours and propagates.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from lightning_ncnnqat import policy
from lightning_ncnnqat.ncnn.isolated import NcnnRuntimeError
from lightning_ncnnqat.ncnn.targets import PROFILES, TargetUnavailable
from lightning_ncnnqat.policy import Finding
from lightning_ncnnqat.verification.layer_checks import QuantizedRef
from lightning_ncnnqat.verification.output_floor import Float32Floor, output_verdict
from lightning_ncnnqat.verification.parity import agreement
from lightning_ncnnqat.verification.report import ExportReport
from lightning_ncnnqat.verification.runs import PARITY_OPTIONS, ModelFiles, run_layer_checks, strict_parity
from lightning_ncnnqat.verification.verdicts import render


def target_parity(
    report: ExportReport,
    files: ModelFiles,
    target: str,
    feeds: dict[str, np.ndarray],
    q_ref: list[np.ndarray],
    held: list[torch.Tensor],
    refs: list[QuantizedRef],
    chain: dict[str, list[torch.Tensor]] | None,
    out_scales: dict[str, float],
    floor: Float32Floor,
) -> None:
    """int8 parity and per-layer checks on an emulated target, with its default options, judged
    and rendered into ``report``. A target that is not set up, or whose ncnn run crashes, times
    out or fails, becomes a report entry (``runtime[target]["error"]`` and a note or warning);
    any other exception is a fault of ours and propagates (the ``parity`` step names it)."""
    prof = PROFILES.get(target)
    entry: dict = {"profile": prof.description if prof else target, "emulated": True}
    report.runtime[target] = entry
    found: list[Finding] = []
    try:
        _target_runs(report, entry, files, target, feeds, q_ref, held, refs, chain, out_scales, floor, found)
    except TargetUnavailable as e:  # not set up: the error names the set-up command
        entry["error"] = str(e)
        found.append(policy.target_not_checked(target, str(e), unavailable=True))
    except NcnnRuntimeError as e:  # the emulated ncnn run crashed, timed out or failed
        entry["error"] = str(e)
        found.append(policy.target_not_checked(target, f"{type(e).__name__}: {e}", unavailable=False))
    render(report, found)


def _target_runs(
    report: ExportReport, entry: dict, files: ModelFiles, target: str, feeds: dict[str, np.ndarray], q_ref: list[np.ndarray],
    held: list[torch.Tensor], refs: list[QuantizedRef], chain: dict[str, list[torch.Tensor]] | None,
    out_scales: dict[str, float], floor: Float32Floor, found: list[Finding],
) -> None:
    """The runs of :func:`_target_parity`: figures into ``entry`` (``report.runtime[target]``),
    findings appended to ``found`` as they are made (kept when a later run fails)."""
    r8 = files.run("int8", feeds, files.output_blobs, target=target, options=PARITY_OPTIONS)
    entry.update(r8.info)
    entry.pop("time_ms", None)  # emulated: says nothing about the device's speed
    per_out = [agreement(q_ref[i], r8.outputs[b], i in files.class_outputs) for i, b in enumerate(files.output_blobs)]
    entry["outputs"] = [{"blob": b, "int8_vs_qat": asdict(a)} for b, a in zip(files.output_blobs, per_out)]
    worst = min(per_out, key=lambda a: a.cosine)
    entry["int8_vs_qat"] = asdict(worst)
    strict, gap = strict_parity(report, files, target, feeds, q_ref, worst.cosine)
    found += gap
    if refs and chain is not None:
        checks = run_layer_checks(files, target, held, refs, chain, out_scales)
        entry["layer_checks"] = [c.to_dict() for c in checks]
        entry["flagged_layers"] = [c.torch_name for c in checks if c.ok is False]
        found += policy.approximation_notes(target, checks)
        found += policy.target_layer_findings(target, entry["profile"], checks)
    # judged on the better of default and strict options (a gap that only the default options
    # have is the runtime's own approximation, noted above), and the default options on their
    # own against MIN_DEFAULT_OPTIONS_COSINE (see policy.judge_output)
    for i, (b, a) in enumerate(zip(files.output_blobs, per_out)):
        where = f" (output {b})" if len(per_out) > 1 else ""
        judged, verdict = output_verdict(report, floor, i, a.cosine, where, on=f"on {target}, ", strict=strict[i])
        found += judged
        if verdict is not None:
            entry["outputs"][i].update(verdict)
    measured = [o["float32_floor"] for o in entry["outputs"] if o.get("float32_floor") is not None]
    if measured:
        entry["float32_floor"] = min(measured)
