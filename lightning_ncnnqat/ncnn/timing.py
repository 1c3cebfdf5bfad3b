"""Timing ncnn models side by side in a child process (``ncnn/speed_worker.py``): the primitives.

Every timing runs in ONE child process (numpy + ncnn only), interleaved (the models alternate
within each round, A B then B A, so a drift of the machine falls on all alike), reported as
median with min/max in wall time and in process CPU time, with ncnn's default options except
``num_threads``. Imports no torch and nothing of the export, so the export
itself may time (the ncnn layer: standard library here, numpy and ncnn in the child).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightning_ncnnqat.ncnn.isolated import TIMEOUT_FLOOR_S, NcnnRuntimeError, sized_timeout

WORKER = Path(__file__).with_name("speed_worker.py")

@dataclass
class Timing:
    """Milliseconds per inference over ``runs`` interleaved runs: wall clock, and process CPU
    time (``cpu_*``: not inflated by preemption on a busy machine; summed over threads)."""

    median_ms: float
    min_ms: float
    max_ms: float
    runs: int
    cpu_median_ms: float | None = None
    cpu_min_ms: float | None = None
    cpu_max_ms: float | None = None
    # every run in order (round r of every model of one time_models call ran back to back)
    wall_runs: list[float] | None = field(default=None, repr=False)
    cpu_runs: list[float] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, times: Sequence[float], cpu: Sequence[float] | None = None) -> Timing:
        if not times:
            raise ValueError("Timing.of: no times")
        c = (statistics.median(cpu), min(cpu), max(cpu)) if cpu else (None, None, None)
        return cls(statistics.median(times), min(times), max(times), len(times), *c, list(times),
                   list(cpu) if cpu else None)

    def ms(self, on: str = "wall") -> float:
        """The median of ``on`` ("wall" or "cpu"; "cpu" falls back to wall where not measured)."""
        if on not in ("wall", "cpu"):
            raise ValueError(f"Timing.ms: `on` must be 'wall' or 'cpu', got {on!r}")
        return self.cpu_median_ms if on == "cpu" and self.cpu_median_ms is not None else self.median_ms


def paired_speedup(base: Timing, other: Timing, on: str = "wall") -> float:
    """Median over rounds of ``base_r / other_r``: how much faster ``other`` runs than ``base``,
    each round compared with the run right beside it (same :func:`time_models` call), so a
    machine whose speed drifts between rounds (other jobs, cache pressure) moves both alike.
    Raises ValueError when the two were not timed in one call (runs not kept or of other counts)."""
    a = base.cpu_runs if on == "cpu" and base.cpu_runs else base.wall_runs
    b = other.cpu_runs if on == "cpu" and other.cpu_runs else other.wall_runs
    if not a or not b or len(a) != len(b):
        raise ValueError("paired_speedup: both timings need their runs, from one time_models call")
    return statistics.median(x / y for x, y in zip(a, b) if y > 0)


@dataclass
class ModelToTime:
    """One ncnn model for :func:`time_models`; ``inputs``: blob -> shape ([c, h, w] etc.);
    ``data``: blob -> a .npy file of one sample fed instead of random normal values (int32 ids
    for an Embed input keep their integer values)."""

    name: str
    param: str
    bin: str
    inputs: dict[str, list[int]]
    extract: list[str]
    options: dict[str, Any] = field(default_factory=dict)
    data: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # the timing child runs in its own temporary folder: relative paths are made absolute
        # here, against the caller's working directory
        self.param, self.bin = os.path.abspath(self.param), os.path.abspath(self.bin)
        self.data = {blob: os.path.abspath(path) for blob, path in self.data.items()}


def _values(m: ModelToTime) -> int:
    """Values of one sample's inputs of ``m``."""
    return sum(int(math.prod(shape)) for shape in m.inputs.values())


def _run_worker(job: dict, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="ncnnqat_speed_") as tmp:
        job = {**job, "result": str(Path(tmp) / "result.json")}
        (Path(tmp) / "job.json").write_text(json.dumps(job), encoding="utf-8")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        try:
            proc = subprocess.run([sys.executable, str(WORKER), str(Path(tmp) / "job.json")],
                                  capture_output=True, text=True, timeout=timeout_s, env=env, cwd=tmp)
        except subprocess.TimeoutExpired as e:
            raise NcnnRuntimeError(f"ncnn timing did not finish within {timeout_s:.0f} s") from e
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise NcnnRuntimeError(f"ncnn timing failed (exit status {proc.returncode}): {tail}")
        return json.loads((Path(tmp) / "result.json").read_text(encoding="utf-8"))


def time_models(models: Sequence[ModelToTime], runs: int = 30, warmup: int = 5, timeout_s: float | None = None) -> dict[str, Timing]:
    """Time ``models`` interleaved in one child process; name -> :class:`Timing`.

    Raises ValueError for runs < 1, duplicate names or no model; NcnnRuntimeError when the child
    crashes, times out or reports an error (message from the child).
    """
    if not models:
        raise ValueError("time_models: `models` is empty")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"time_models: `runs` must be an int >= 1, got {runs!r}")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"time_models: model names must be unique, got {names}")
    if len(models) > 2:
        # The child's rounds go A B C, then C B A: the first and the last model run twice in a
        # row at every turn, the second run with warm caches, which favours them over the rest
        # (a 16x16 toy model: int8 vs float read 1.22x with int8 first, 0.94x with float first).
        # A copy of each around the timed ones (timed too, dropped) puts every timed run right
        # after another model's run. With two models (A B, B A) both are treated alike.
        models = [dataclasses.replace(models[0], name=_PAD[0]), *models, dataclasses.replace(models[-1], name=_PAD[1])]
    if timeout_s is None:  # sized to the models (isolated.sized_timeout): a hang costs about a minute, not 15
        timeout_s = TIMEOUT_FLOOR_S + sum(sized_timeout(m.bin, runs + int(warmup), _values(m), floor_s=0) for m in models)
    res = _run_worker({"models": [asdict(m) for m in models], "runs": runs, "warmup": int(warmup)}, timeout_s)
    cpu = res.get("cpu_ms", {})
    return {k: Timing.of(v, cpu.get(k)) for k, v in res["times_ms"].items() if k not in _PAD}


#: names of the padding copies :func:`time_models` adds around three or more models
_PAD = ("\x00pad-before", "\x00pad-after")


def blob_shapes(model: ModelToTime, blobs: Sequence[str], timeout_s: float | None = None) -> dict[str, list[int]]:
    """Shapes ncnn gives ``blobs`` of ``model`` on its input shapes ([c, h, w], [h, w] or [w])."""
    timeout_s = sized_timeout(model.bin, 1, _values(model)) if timeout_s is None else timeout_s
    return _run_worker({"models": [asdict(model)], "runs": 1, "shapes": list(blobs)}, timeout_s)["shapes"]
