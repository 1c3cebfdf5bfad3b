"""Run ncnn models in a child process, so nothing ncnn does can take the caller down.

:func:`run_ncnn` writes the inputs to a private temporary directory, runs
``worker.py`` (standard library + numpy + ncnn only) with the host Python or with a
target's interpreter (the aarch64 Python under qemu for the ARM profiles, see
:mod:`lightning_ncnnqat.ncnn.targets`), and reads the extracted blobs back. A crash of the child
(SIGSEGV inside ncnn, an abort) or a timeout raises :class:`NcnnRuntimeError` naming the signal,
the model and the target; the training process is never touched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_ncnnqat.errors import NcnnQatError
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.ncnn.targets import worker_command  # the emulated ARM targets (stdlib only)

WORKER = Path(__file__).with_name("worker.py")
HOST = "x86"


class NcnnRuntimeError(NcnnQatError, RuntimeError):
    """The ncnn child process failed: crashed (``signal`` set), timed out, or raised."""

    def __init__(self, message: str, signal_name: str | None = None) -> None:
        super().__init__(message)
        self.signal_name = signal_name


@dataclass
class RunResult:
    """Blobs extracted for every sample (``[N, ...]`` float32, keyed by blob name) and run facts."""

    outputs: dict[str, np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)  # ncnn version, CPU features, options, time_ms
    target: str = HOST


def _target_command(target: str) -> tuple[list[str], dict[str, str]]:
    """argv prefix and extra environment that run a Python script on ``target``."""
    if target == HOST:
        return [sys.executable], {}
    return worker_command(target)


# A child's time limit, sized to the model (:func:`sized_timeout`). ncnn's float and int8 runs of
# the models this package exports take milliseconds to a second per sample on one x86 core; a run
# far beyond that is a hang inside ncnn (a layer looping on a shape it does not support), which
# used to cost the fixed 900 s before the QAT start went on.
TIMEOUT_FLOOR_S = 60.0  # loading the model, starting Python and ncnn, the first sample
SAMPLE_S = 0.5  # per sample, whatever the model
SAMPLE_S_PER_MB = 0.05  # per sample and MB of weights (~50x ncnn's float speed on one core)
SAMPLE_S_PER_MVALUE = 1.0  # per sample and million input values (large images)
EMULATED_SLOWDOWN = 40.0  # an emulated ARM target (qemu) against the host


def _weights_mb(bin_path: str | Path) -> float:
    try:
        return Path(bin_path).stat().st_size / 2**20
    except OSError:
        return 0.0


def sized_timeout(bin_path: str | Path, n_samples: int, input_values: int = 0, target: str = HOST,
                  floor_s: float | None = None) -> float:
    """Seconds a child may run ``n_samples`` samples of the model whose weights are ``bin_path``
    (``input_values``: values of one sample's inputs) before it counts as hung.

    ``floor + n * (SAMPLE_S + SAMPLE_S_PER_MB * MB + SAMPLE_S_PER_MVALUE * Mvalues)``, times
    :data:`EMULATED_SLOWDOWN` on an emulated target: about a minute for a small model at QAT
    start, far above what a run that works takes, and minutes for a model of hundreds of MB.
    """
    floor = TIMEOUT_FLOOR_S if floor_s is None else float(floor_s)
    per_sample = SAMPLE_S + SAMPLE_S_PER_MB * _weights_mb(bin_path) + SAMPLE_S_PER_MVALUE * input_values / 1e6
    limit = floor + max(int(n_samples), 1) * per_sample
    return limit * (1.0 if target == HOST else EMULATED_SLOWDOWN)


def _hung_at(tmpdir: Path) -> str:
    """``: ... layer 'name' (Type)`` from the worker's progress file, '' when it has none."""
    try:
        kind, name = (tmpdir / "progress.txt").read_text(encoding="utf-8").split(maxsplit=1)
    except (OSError, ValueError):
        return ""
    return f"; it was computing layer '{name}' ({kind}) of sample 0"


def _signal_name(returncode: int) -> str | None:
    if returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _id_readers(param: NcnnParam, blob: str) -> tuple[list[str], list[str]]:
    """``(Embed layers, other layers)`` reading ``blob``, through ncnn's ``Split`` copies."""
    embeds: list[str] = []
    others: list[str] = []
    todo = [blob]
    while todo:
        for lay in param.consumers(todo.pop()):
            if lay.type == "Split":
                todo.extend(lay.tops)
            else:
                (embeds if lay.type == "Embed" else others).append(f"{lay.type} '{lay.name}'")
    return embeds, others


def ncnn_inputs(param_text: str, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """The arrays to write into ncnn's Mats, and the blobs written as int32 ids.

    An ncnn Mat holds 4-byte elements, read as float32 by every layer except ``Embed``, which
    reads its input as ``int`` (``((const int*)bottom_blob)[q]``, ncnn ``src/layer/embed.cpp``). So
    an integer input (token ids, PyTorch/ONNX keep int64) read only by Embed layers goes as int32
    values; one read by other layers goes as float32 values (what they compute with); floating
    inputs go as float32.

    Raises:
        NcnnRuntimeError: an integer input read both by Embed and by other layers (one Mat cannot
            be both), or an id that does not fit int32.
    """
    param = NcnnParam.parse(param_text)
    out: dict[str, np.ndarray] = {}
    ids: list[str] = []
    for name, arr in inputs.items():
        arr = np.asarray(arr)
        if arr.dtype.kind not in "iub":
            out[name] = np.ascontiguousarray(arr, dtype=np.float32)
            continue
        embeds, others = _id_readers(param, name)
        if embeds and others:
            raise NcnnRuntimeError(
                f"integer input '{name}' ({arr.dtype}) is read by {embeds[0]} (int32 ids) and by {others[0]} (float "
                "values); an ncnn Mat holds one of them: give the model the ids and their float form as two inputs"
            )
        if not embeds:
            out[name] = np.ascontiguousarray(arr, dtype=np.float32)
            continue
        if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
            raise NcnnRuntimeError(f"integer input '{name}' holds ids outside int32 ({arr.min()}..{arr.max()})")
        out[name] = np.ascontiguousarray(arr, dtype=np.int32)
        ids.append(name)
    return out, ids


def run_ncnn(
    param: str | Path,
    bin_path: str | Path,
    inputs: Mapping[str, np.ndarray],
    extract: Sequence[str],
    options: Mapping[str, Any] | None = None,
    *,
    target: str = HOST,
    light_mode: bool = True,
    time_runs: int = 0,
    timeout_s: float | None = None,
) -> RunResult:
    """Run ``param``/``bin_path`` on every sample of ``inputs`` in a child process.

    Args:
        inputs: input blob name -> ``[N, ...]`` array (one sample per row, no batch dim in ncnn);
            integer arrays (token ids) go to ncnn as :func:`ncnn_inputs` says.
        extract: blob names to extract for every sample.
        options: ``ncnn.Option`` attributes set before loading (ncnn's defaults otherwise).
        target: ``"x86"`` (this machine's ncnn) or an emulated ARM profile name.
        light_mode: False keeps intermediate blobs (cheaper when extracting many of them).
        time_runs: also time this many inferences of the first sample (median in ``info``).
        timeout_s: seconds before the child counts as hung and is killed; None: sized to the
            model, the samples and the target (:func:`sized_timeout`, about a minute for a
            small model on the host).

    Raises:
        NcnnRuntimeError: the child crashed (signal named), timed out or reported an error.
        TargetUnavailable: ``target`` is an emulated profile whose environment is not set up.
    """
    argv, env_extra = _target_command(target)
    with tempfile.TemporaryDirectory(prefix="ncnnqat_run_") as tmp:
        tmpdir = Path(tmp)
        arrays, _ = ncnn_inputs(Path(param).read_text(encoding="utf-8"), inputs)
        n = max((len(a) for a in arrays.values()), default=1)
        if timeout_s is None:
            per = sum(a[0].size for a in arrays.values() if len(a))
            timeout_s = sized_timeout(bin_path, n + int(time_runs), per, target)
            sized = (f", far longer than this model needs ({_weights_mb(bin_path):.1f} MB of "
                     f"weights, limit sized by isolated.sized_timeout): ncnn loops in one of its layers")
        else:
            sized = ""
        np.savez(tmpdir / "inputs.npz", **arrays)
        job = {
            "param": str(Path(param).resolve()),
            "bin": str(Path(bin_path).resolve()),
            "inputs": str(tmpdir / "inputs.npz"),
            "extract": list(extract),
            "options": dict(options or {}),
            "light_mode": bool(light_mode),
            "time_runs": int(time_runs),
            "out": str(tmpdir / "out.npz"),
            "result": str(tmpdir / "result.json"),
            "progress": str(tmpdir / "progress.txt") if sized else "",  # sample 0 layer by layer
        }
        (tmpdir / "job.json").write_text(json.dumps(job), encoding="utf-8")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **env_extra}
        what = f"ncnn ({target}) running {Path(param).name}"
        try:
            proc = subprocess.run(
                [*argv, str(WORKER), str(tmpdir / "job.json")],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                env=env,
                cwd=tmpdir,
            )
        except subprocess.TimeoutExpired as e:
            raise NcnnRuntimeError(
                f"{what} on {n} sample(s) did not finish within {timeout_s:.0f} s{sized}{_hung_at(tmpdir)}"
            ) from e
        sig = _signal_name(proc.returncode)
        if sig is not None:
            raise NcnnRuntimeError(f"{what} crashed with {sig} inside the ncnn runtime", sig)
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise NcnnRuntimeError(f"{what} failed (exit status {proc.returncode}): {tail}")
        with np.load(tmpdir / "out.npz") as z:
            outputs = {k: np.array(z[k]) for k in z.files}
        info = json.loads((tmpdir / "result.json").read_text(encoding="utf-8"))
    return RunResult(outputs, info, target)
