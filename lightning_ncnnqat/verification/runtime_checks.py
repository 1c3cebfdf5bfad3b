"""The export's measurements in the real ncnn runtime: parity per output, per-layer checks, timing.

Every inference runs in a child process (:mod:`lightning_ncnnqat.ncnn.isolated`): a crash inside ncnn fails
the ``parity`` step with the signal named and leaves the caller (``Trainer.fit``) alive. The
rules on the measurements are :mod:`lightning_ncnnqat.policy`'s (this machine's applied by
:mod:`lightning_ncnnqat.verification.judging`, an emulated target's here), their findings rendered by
:func:`lightning_ncnnqat.verification.verdicts.render`; an output's int8 cosine is judged against the
QAT model's own float32 floor (:mod:`lightning_ncnnqat.verification.output_floor`), measured only where it misses the bar.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lightning_ncnnqat import policy
from lightning_ncnnqat.conversion.graph_match import Wiring
from lightning_ncnnqat.conversion.model_io import ModelIO, torch_outputs
from lightning_ncnnqat.ncnn.isolated import HOST, NcnnRuntimeError, RunResult, run_ncnn
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.ncnn.targets import PROFILES, TargetUnavailable
from lightning_ncnnqat.policy import MIN_NOTED_GAP, Finding, approximation_gap  # noqa: F401  (re-exported)
from lightning_ncnnqat.verification.float_conversion import FLOAT_OPTIONS, judge_conversion, locate_departure
from lightning_ncnnqat.verification.judging import judge
from lightning_ncnnqat.verification.layer_checks import QuantizedRef, blobs_to_extract, capture_outputs, check_layers
from lightning_ncnnqat.verification.output_floor import Float32Floor, output_verdict
from lightning_ncnnqat.verification.parity import agreement
from lightning_ncnnqat.verification.report import ExportReport, OutputParity
from lightning_ncnnqat.verification.verdicts import render

#: One thread for parity: the same numbers on every machine, and no OpenMP oversubscription.
PARITY_OPTIONS = {"num_threads": 1}
#: The runtime's own approximations switched off: float layers in fp32 without Winograd (its
#: transforms round differently from a direct conv), unpacked int8 kernels; one thread, as
#: PARITY_OPTIONS. The same options the float conversion is judged under (conversion.FLOAT_OPTIONS).
STRICT_OPTIONS = FLOAT_OPTIONS


def _strict_parity(
    report: ExportReport, files: ModelFiles, target: str, feeds: dict[str, np.ndarray], q_ref: list[np.ndarray], default_cos: float
) -> tuple[list[float], list[Finding]]:
    """int8 parity with the runtime's approximations off, to tell them apart from real errors;
    returns the strict cosine of every output and the approximation-gap finding, if any."""
    rs = files.run("int8", feeds, files.output_blobs, target=target, options=STRICT_OPTIONS)
    per_out = [agreement(q_ref[i], rs.outputs[b], i in files.class_outputs) for i, b in enumerate(files.output_blobs)]
    strict = min(per_out, key=lambda a: a.cosine)
    report.runtime[target]["int8_vs_qat_strict"] = asdict(strict)
    report.runtime[target]["strict_options"] = {k: v for k, v in STRICT_OPTIONS.items() if k != "num_threads"}
    return [a.cosine for a in per_out], policy.judge_approximation_gap(target, default_cos, strict.cosine)


@dataclass
class ModelFiles:
    """The converted models on disk and their blob names."""

    export_dir: Path
    int8_param: NcnnParam
    input_blobs: list[str]
    output_blobs: list[str]
    class_outputs: set[int] = field(default_factory=set)  # outputs that are [N, C] class scores
    target_time_limit_s: float | None = None  # wall time all runs on one emulated target may take
    spent_s: dict[str, float] = field(default_factory=dict)

    def path(self, stem: str, ext: str) -> Path:
        return self.export_dir / f"model.{stem}.{ext}"

    def run(self, stem: str, feeds: dict[str, np.ndarray], extract: Sequence[str], target: str = HOST, **kw) -> RunResult:
        """One ncnn run; on an emulated target within what is left of ``target_time_limit_s``.

        Raises TargetTimeLimit once the target's time is spent (the remaining checks there are skipped).
        """
        limit = self.target_time_limit_s if target != HOST else None
        if limit is None:
            return run_ncnn(self.path(stem, "param"), self.path(stem, "bin"), feeds, extract, target=target, **kw)
        left = limit - self.spent_s.get(target, 0.0)
        if left <= 0:
            raise TargetTimeLimit(target, limit)
        t0 = time.perf_counter()
        try:
            return run_ncnn(self.path(stem, "param"), self.path(stem, "bin"), feeds, extract, target=target,
                            timeout_s=min(left, kw.pop("timeout_s", 900.0)), **kw)
        except NcnnRuntimeError as e:
            if "did not finish within" in str(e) and time.perf_counter() - t0 >= left - 1:
                raise TargetTimeLimit(target, limit) from e
            raise
        finally:
            self.spent_s[target] = self.spent_s.get(target, 0.0) + time.perf_counter() - t0


class TargetTimeLimit(NcnnRuntimeError):
    """The runs on one emulated target took ``target_time_limit_s``; its remaining checks are skipped."""

    def __init__(self, target: str, limit_s: float) -> None:
        super().__init__(
            f"{target}: the emulated runs reached the target's time limit of {limit_s:.0f} s; its remaining checks "
            "were skipped (raise export(target_time_limit_s=...) or check fewer targets)"
        )


def blob_names(param: NcnnParam, io: ModelIO) -> tuple[list[str], list[str]]:
    """Input and output blob names of a pnnx model for ``io``: ``in0..`` / ``out0..`` when pnnx
    wrote them so, else the Input layers' blobs and the unconsumed tops, in file order."""
    tops = {t for lay in param.layers for t in lay.tops}
    if all(n in tops for n in io.input_names + io.output_names):
        return io.input_names, io.output_names
    inputs = [lay.tops[0] for lay in param.layers if lay.type == "Input"]
    consumed = {b for lay in param.layers for b in lay.bottoms}
    outputs = [t for lay in param.layers for t in lay.tops if t not in consumed]
    if len(inputs) != len(io.input_names) or len(outputs) != len(io.output_names):
        raise ValueError(
            f"the ncnn model has input blobs {inputs} and output blobs {outputs}; the PyTorch model has "
            f"{len(io.input_names)} input(s) and {len(io.output_names)} output(s)"
        )
    return inputs, outputs


def _is_class_scores(io: ModelIO, i: int) -> bool:
    """Top-1 figures only for ``[N, C]`` outputs (one score per class), not feature maps or boxes."""
    return i < len(io.output_shapes) and len(io.output_shapes[i]) == 1


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
    files.class_outputs = {i for i in range(len(outs)) if _is_class_scores(io, i)}
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
    render(report, _strict_parity(report, files, HOST, feeds, q_ref, worst.int8_vs_qat.cosine)[1])

    chain = _chain(qmodel, io, held, refs, layer_check_samples) if refs else None
    if refs:
        report.layer_checks = _layer_checks(files, HOST, held, refs, chain, out_scales)
    floor = Float32Floor(qmodel, io, held, q_ref)  # measured only if an int8 output misses the bar
    judge(report, floor)
    _judge_conversion(report, files, folded, io, held, f_ref, rf32, refs, float_param, wirings)
    _timing(report, files, feeds, timing_runs, timing_threads)
    for target in targets:
        if target != HOST:
            say(f"ncnn export: parity on {target} (emulated, qemu): {n} sample(s), per-layer checks ...")
            _target_parity(report, files, target, feeds, q_ref, held, refs, chain, out_scales, floor)


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
    chain = _chain(qmodel, io, held, refs, samples)
    wrong: dict[str, dict[str, float]] = {}
    for target in targets:
        try:
            checks = _layer_checks(files, target, held, refs, chain, out_scales)
        except TargetUnavailable:
            continue
        except TargetTimeLimit as e:
            warnings.warn(f"int8 layers not measured: {e}", stacklevel=2)
            continue
        wrong[target] = {c.torch_name: c.isolated_cosine for c in checks if c.ok is False}
    return wrong


def _target_parity(
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
    strict, gap = _strict_parity(report, files, target, feeds, q_ref, worst.cosine)
    found += gap
    if refs and chain is not None:
        checks = _layer_checks(files, target, held, refs, chain, out_scales)
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


def _chain(
    qmodel: nn.Module, io: ModelIO, held: list[torch.Tensor], refs: list[QuantizedRef], samples: int
) -> dict[str, list[torch.Tensor]]:
    """The PyTorch QAT model's output of every checked layer, for the first ``samples`` samples."""
    k = max(1, min(samples, len(held[0])))
    device = next((p.device for p in qmodel.parameters()), torch.device("cpu"))
    names = [r.torch_name for r in refs]
    chain: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    was_training = qmodel.training
    qmodel.eval()
    try:
        for s in range(k):
            a, kw = io.call([t[s : s + 1].to(device) for t in held])
            got = capture_outputs(qmodel, names, lambda: qmodel(*a, **kw))
            for n in names:
                chain[n].append(got[n])
    finally:
        qmodel.train(was_training)
    return chain


def _layer_checks(
    files: ModelFiles,
    target: str,
    held: list[torch.Tensor],
    refs: list[QuantizedRef],
    chain: dict[str, list[torch.Tensor]],
    out_scales: dict[str, float],
) -> list:
    k = len(next(iter(chain.values())))
    feeds = {b: t[:k].numpy() for b, t in zip(files.input_blobs, held)}
    param = files.int8_param
    extract = blobs_to_extract(param, [r.ncnn_name for r in refs])
    blobs = files.run("int8", feeds, extract, target=target, options=PARITY_OPTIONS, light_mode=False).outputs
    checks = check_layers(param, refs, blobs, chain, out_scales)
    flagged = [c for c in checks if c.ok is False]
    stepped = [c for c in checks if c.int8_step_mismatch]
    if flagged or stepped:  # is it the packed kernels' own approximation? run them unpacked
        unpacked = files.run(
            "int8", feeds, extract, target=target, options={**PARITY_OPTIONS, "use_packing_layout": False}, light_mode=False
        )
        again = {c.torch_name: c for c in check_layers(param, refs, unpacked.outputs, chain, out_scales)}
        for c in flagged:
            c.ok_without_packing = again[c.torch_name].ok
        for c in stepped:
            c.int8_step_mismatch_without_packing = again[c.torch_name].int8_step_mismatch
    # a layer whose shape of output is right (cosine passes) but whose max error does not, and that
    # is right with the runtime's approximations off, is not computed wrongly: say what it is
    close = [c for c in flagged if policy.layer_cosine_ok(c.isolated_cosine) and not c.ok_without_packing]
    if close:
        strict = files.run("int8", feeds, extract, target=target, options=STRICT_OPTIONS, light_mode=False)
        again = {c.torch_name: c for c in check_layers(param, refs, strict.outputs, chain, out_scales)}
        for c in close:
            if again[c.torch_name].ok:
                c.ok, c.runtime_approximation = True, True
    return checks


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
