"""Run ncnn models in a child process, so nothing ncnn does can take the caller down.

:func:`run_ncnn` writes the inputs to a private temporary directory, runs
``ncnn_worker.py`` (standard library + numpy + ncnn only) with the host Python or with a
target's interpreter (the aarch64 Python under qemu for the ARM profiles, see
:mod:`lightning_ncnnqat.targets`), and reads the extracted blobs back. A crash of the child
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

from ..errors import NcnnQatError

WORKER = Path(__file__).with_name("ncnn_worker.py")
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
    from ..targets import worker_command  # ARM emulation; raises TargetUnavailable with the fix

    return worker_command(target)


def _signal_name(returncode: int) -> str | None:
    if returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


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
    timeout_s: float = 900.0,
) -> RunResult:
    """Run ``param``/``bin_path`` on every sample of ``inputs`` in a child process.

    Args:
        inputs: input blob name -> ``[N, ...]`` array (one sample per row, no batch dim in ncnn).
        extract: blob names to extract for every sample.
        options: ``ncnn.Option`` attributes set before loading (ncnn's defaults otherwise).
        target: ``"x86"`` (this machine's ncnn) or an emulated ARM profile name.
        light_mode: False keeps intermediate blobs (cheaper when extracting many of them).
        time_runs: also time this many inferences of the first sample (median in ``info``).

    Raises:
        NcnnRuntimeError: the child crashed (signal named), timed out or reported an error.
        TargetUnavailable: ``target`` is an emulated profile whose environment is not set up.
    """
    argv, env_extra = _target_command(target)
    with tempfile.TemporaryDirectory(prefix="ncnnqat_run_") as tmp:
        tmpdir = Path(tmp)
        np.savez(tmpdir / "inputs.npz", **{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()})
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
            raise NcnnRuntimeError(f"{what} did not finish within {timeout_s:.0f} s") from e
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
