"""The export's measurements in the real ncnn runtime: parity per output, per-layer checks, timing.

Every inference runs in a child process (:mod:`lightning_ncnnqat.ncnn.isolated`): a crash inside ncnn fails
the ``parity`` step with the signal named and leaves the caller (``Trainer.fit``) alive. The
rules on the measurements are :mod:`lightning_ncnnqat.policy`'s (this machine's applied by
:mod:`lightning_ncnnqat.verification.judging`, an emulated target's by :mod:`.targets`), their findings rendered by
:func:`lightning_ncnnqat.verification.verdicts.render`; an output's int8 cosine is judged against the
QAT model's own float32 floor (:mod:`lightning_ncnnqat.verification.output_floor`), measured only where it misses the bar.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict

import numpy as np
import torch
from torch import nn

from lightning_ncnnqat import policy
from lightning_ncnnqat.conversion.graph_match import Wiring
from lightning_ncnnqat.conversion.model_io import ModelIO, torch_outputs
from lightning_ncnnqat.ncnn.isolated import HOST, NcnnRuntimeError, RunResult
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.ncnn.targets import TargetUnavailable
from lightning_ncnnqat.policy import MIN_NOTED_GAP, approximation_gap  # noqa: F401  (re-exported)
from lightning_ncnnqat.verification.float_conversion import FLOAT_OPTIONS, judge_conversion, locate_departure
from lightning_ncnnqat.verification.judging import judge
from lightning_ncnnqat.verification.layer_checks import QuantizedRef
from lightning_ncnnqat.verification.output_floor import Float32Floor
from lightning_ncnnqat.verification.parity import agreement
from lightning_ncnnqat.verification.report import ExportReport, OutputParity
from lightning_ncnnqat.verification.runs import (  # noqa: F401  (ModelFiles, blob_names, the options: public here too)
    PARITY_OPTIONS,
    STRICT_OPTIONS,
    ModelFiles,
    TargetTimeLimit,
    blob_names,
    chain_outputs,
    is_class_scores,
    run_layer_checks,
    strict_parity,
)
from lightning_ncnnqat.verification.targets import target_parity
from lightning_ncnnqat.verification.verdicts import render


def measure(
    report: ExportReport,
    files: ModelFiles,
    qmodel: nn.Module,
    folded: nn.Module,
    io: ModelIO,
    held: list[torch.Tensor],
    refs: list[QuantizedRef],
    out_scales: dict[str, float],
    layer_check_samples: int,
    timing_runs: int,
    timing_threads: int | None,
    targets: Sequence[str] = (HOST,),
    float_param: NcnnParam | None = None,
    wirings: tuple[Wiring, Wiring] | None = None,
    say: Callable[[str], None] | None = None,
) -> None:
    """Fill the parity, per-layer and timing parts of ``report``: on this machine (``x86``) and
    on every emulated ARM target in ``targets`` (parity and per-layer checks with that
    profile's default options; emulated times are never measured); and the conversion's own
    verdict (``report.conversion``, :mod:`.conversion`; ``float_param``: model.ncnn.param, to
    locate a departure; ``wirings``: the torch and ncnn graphs, to name the ops there). ``say``
    is told each target before its runs start (an emulated target takes seconds to minutes)."""
    say = say or (lambda _msg: None)
    n = len(held[0]) if held else 0
    say(f"ncnn export: parity on {HOST} (this machine): {n} sample(s), per-layer checks, timing ...")
    feeds = {b: t.numpy() for b, t in zip(files.input_blobs, held)}
    q_ref = torch_outputs(qmodel, io, held)
    f_ref = torch_outputs(folded, io, held)
    outs = files.output_blobs
    r8 = files.run("int8", feeds, outs, options=PARITY_OPTIONS)
    rf = files.run("ncnn", feeds, outs, options=PARITY_OPTIONS)
    rf32 = files.run("ncnn", feeds, outs, options={**PARITY_OPTIONS, "use_fp16_storage": False})
    report.outputs = []
    files.class_outputs = {i for i in range(len(outs)) if is_class_scores(io, i)}
    for i, (blob, path) in enumerate(zip(outs, io.output_paths)):
        o = OutputParity(blob, path)
        cls = i in files.class_outputs
        o.int8_vs_qat = agreement(q_ref[i], r8.outputs[blob], cls)
        o.float_vs_torch = agreement(f_ref[i], rf.outputs[blob], cls)
        o.float_vs_torch_fp32_storage = agreement(f_ref[i], rf32.outputs[blob], cls)
        report.outputs.append(o)
    worst = min(report.outputs, key=lambda o: o.int8_vs_qat.cosine)
    report.int8_vs_qat = worst.int8_vs_qat
    report.float_vs_torch = worst.float_vs_torch
    report.float_vs_torch_fp32_storage = worst.float_vs_torch_fp32_storage
    report.runtime = {HOST: {**r8.info, "profile": "this machine", "int8_vs_qat": asdict(worst.int8_vs_qat)}}
    render(report, strict_parity(report, files, HOST, feeds, q_ref, worst.int8_vs_qat.cosine)[1])

    chain = chain_outputs(qmodel, io, held, refs, layer_check_samples) if refs else None
    if refs:
        report.layer_checks = run_layer_checks(files, HOST, held, refs, chain, out_scales)
    floor = Float32Floor(qmodel, io, held, q_ref)  # measured only if an int8 output misses the bar
    judge(report, floor)
    _judge_conversion(report, files, folded, io, held, f_ref, rf32, refs, float_param, wirings)
    _timing(report, files, feeds, timing_runs, timing_threads)
    for target in targets:
        if target != HOST:
            say(f"ncnn export: parity on {target} (emulated, qemu): {n} sample(s), per-layer checks ...")
            target_parity(report, files, target, feeds, q_ref, held, refs, chain, out_scales, floor)


def _judge_conversion(
    report: ExportReport, files: ModelFiles, folded: nn.Module, io: ModelIO, held: list[torch.Tensor],
    f_ref: list[np.ndarray], rf32: RunResult, refs: list[QuantizedRef], float_param: NcnnParam | None,
    wirings: tuple[Wiring, Wiring] | None,
) -> None:
    """``report.conversion`` from the fp32-storage float run, or where that misses, from a run with
    the runtime's approximations off too (Winograd's transforms alone lose ~1e-3 in cosine on a
    cancelling model: not the converter's doing); a departure is located and warned of."""
    int8_failing = [policy.output_failing(o.int8_vs_qat.cosine, o.float32_floor) for o in report.outputs]
    report.conversion = judge_conversion(folded, io, held, f_ref, rf32.outputs, files.output_blobs,
                                         {**PARITY_OPTIONS, "use_fp16_storage": False}, int8_failing)
    if any(o["float_failing"] for o in report.conversion["outputs"]):
        feeds = {b: t.numpy() for b, t in zip(files.input_blobs, held)}
        strict = files.run("ncnn", feeds, files.output_blobs, options=FLOAT_OPTIONS)
        report.conversion = judge_conversion(folded, io, held, f_ref, strict.outputs, files.output_blobs,
                                             int8_failing=int8_failing)
    render(report, policy.float_arithmetic_note(report.conversion["outputs"]))
    if report.conversion["faithful"] or float_param is None:
        return
    anchors = {r.torch_name: r.ncnn_name for r in refs}
    try:
        report.conversion["first_departure"] = locate_departure(
            float_param, files.path("ncnn", "param"), files.path("ncnn", "bin"), folded, io, held, anchors,
            files.output_blobs, wirings,
        )
    except NcnnRuntimeError as e:  # the ncnn run that locates it failed: the verdict stands, its place is unknown
        report.conversion["first_departure"] = {"message": f"its first departing layer was not located ({type(e).__name__}: {e})"}
    render(report, policy.conversion_departure(report.conversion))


def measure_layers(
    files: ModelFiles,
    qmodel: nn.Module,
    io: ModelIO,
    held: list[torch.Tensor],
    refs: list[QuantizedRef],
    out_scales: dict[str, float],
    targets: Sequence[str],
    samples: int = 1,
) -> dict[str, dict[str, float]]:
    """Per-layer checks only, on every target that can run: ``{target: {torch name: isolated
    cosine}}`` of the layers the int8 runtime computes wrongly there (default options). Targets
    that are not set up are left out."""
    if not refs:
        return {}
    chain = chain_outputs(qmodel, io, held, refs, samples)
    wrong: dict[str, dict[str, float]] = {}
    for target in targets:
        try:
            checks = run_layer_checks(files, target, held, refs, chain, out_scales)
        except TargetUnavailable:
            continue
        except TargetTimeLimit as e:
            warnings.warn(f"int8 layers not measured: {e}", stacklevel=2)
            continue
        wrong[target] = {c.torch_name: c.isolated_cosine for c in checks if c.ok is False}
    return wrong


def _timing(
    report: ExportReport, files: ModelFiles, feeds: dict[str, np.ndarray], runs: int, threads: int | None
) -> None:
    if runs <= 0:
        return
    first = {b: v[:1] for b, v in feeds.items()}
    opts = {} if threads is None else {"num_threads": int(threads)}
    t_f = files.run("ncnn", first, files.output_blobs, options=opts, time_runs=runs)
    t_q = files.run("int8", first, files.output_blobs, options=opts, time_runs=runs)
    f_ms, q_ms = t_f.info["time_ms"], t_q.info["time_ms"]
    report.timing = {
        "float32_ms": f_ms,
        "int8_ms": q_ms,
        "speedup": f_ms / q_ms if q_ms else float("nan"),
        "threads": int(t_q.info["options"].get("num_threads", 0)),
        "runs": runs,
        "input_shapes": [list(v.shape[1:]) for v in feeds.values()],
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
    }
