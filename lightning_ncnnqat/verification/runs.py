"""The export's ncnn runs and what every check shares: the model files on disk and their blobs
(:class:`ModelFiles`, with each emulated target's time budget), the run options, int8 parity with
the runtime's approximations off, and the per-layer checks run on one target.

Every inference runs in a child process (:mod:`lightning_ncnnqat.ncnn.isolated`): a crash inside
ncnn raises :class:`~lightning_ncnnqat.ncnn.isolated.NcnnRuntimeError` naming the signal and
leaves the caller alive.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lightning_ncnnqat import policy
from lightning_ncnnqat.conversion.model_io import ModelIO
from lightning_ncnnqat.ncnn.isolated import HOST, NcnnRuntimeError, RunResult, run_ncnn
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.policy import Finding
from lightning_ncnnqat.verification.float_conversion import FLOAT_OPTIONS
from lightning_ncnnqat.verification.attention_checks import ATTENTION_TYPES
from lightning_ncnnqat.verification.layer_checks import QuantizedRef, blobs_to_extract, capture_outputs, check_layers
from lightning_ncnnqat.verification.parity import agreement
from lightning_ncnnqat.verification.report import ExportReport

#: One thread for parity: the same numbers on every machine, and no OpenMP oversubscription.
PARITY_OPTIONS = {"num_threads": 1}
#: The runtime's own approximations switched off: float layers in fp32 without Winograd (its
#: transforms round differently from a direct conv), unpacked int8 kernels; one thread, as
#: PARITY_OPTIONS. The same options the float conversion is judged under (conversion.FLOAT_OPTIONS).
STRICT_OPTIONS = FLOAT_OPTIONS


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


def is_class_scores(io: ModelIO, i: int) -> bool:
    """Top-1 figures only for ``[N, C]`` outputs (one score per class), not feature maps or boxes."""
    return i < len(io.output_shapes) and len(io.output_shapes[i]) == 1


def strict_parity(
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


def chain_outputs(
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
                chain[n].append(got.get(n))  # None: no module computes it alone (an SDPA call)
    finally:
        qmodel.train(was_training)
    return chain


def run_layer_checks(
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
    close = [c for c in flagged if not c.ok_without_packing
             and policy.layer_cosine_ok(c.isolated_cosine, param.layer(c.ncnn_name).type in ATTENTION_TYPES)]
    if close:
        strict = files.run("int8", feeds, extract, target=target, options=STRICT_OPTIONS, light_mode=False)
        again = {c.torch_name: c for c in check_layers(param, refs, strict.outputs, chain, out_scales)}
        for c in close:
            if again[c.torch_name].ok:
                c.ok, c.runtime_approximation = True, True
    return checks
