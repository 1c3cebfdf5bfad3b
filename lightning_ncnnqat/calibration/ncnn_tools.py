"""Run ncnn's own C++ tools (``ncnn2table``, ``ncnn2int8``) where they are built, as references.

ncnn ships them only as C++ (``tools/quantize`` in Tencent/ncnn); users who built ncnn have
them, pip users do not. The package never needs them: its tests and benchmarks use these
helpers to compare :func:`~lightning_ncnnqat.calibrate` and the int8 writer with the real tools.
A crash or a timeout of a tool is returned as a failed :class:`ToolRun`, never raised, so a
caller can report it (ncnn2table's EQ crashes, see ``tests/test_ncnn_tools_calibrate.py``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

#: ncnn2table's ``method=`` values.
TOOL_METHODS = ("kl", "aciq", "eq")


@dataclass
class ToolRun:
    """One tool run: ``ok`` when it exited 0 and wrote its output; ``message`` says why not."""

    ok: bool
    message: str
    returncode: int | None
    stdout: str = ""
    stderr: str = ""


def find_tools(tools_dir: str | Path | None = None) -> Path | None:
    """The folder holding ``ncnn2table`` and ``ncnn2int8``: ``tools_dir``, else ``$NCNN_TOOLS``;
    None when neither holds both."""
    for d in (tools_dir, os.environ.get("NCNN_TOOLS")):
        if d and (Path(d) / "ncnn2table").is_file() and (Path(d) / "ncnn2int8").is_file():
            return Path(d)
    return None


def write_npy_list(samples: torch.Tensor | np.ndarray, work: str | Path) -> Path:
    """One ``.npy`` per sample (``[C, H, W]`` float32, what ``type=1`` reads) under ``work``, and
    ``work/list.txt`` naming them in order; returns the list's path."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    x = samples.detach().cpu().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples)
    lines = []
    for i, xi in enumerate(x):
        p = work / f"s{i:05d}.npy"
        np.save(p, np.ascontiguousarray(xi, dtype=np.float32))
        lines.append(str(p))
    (work / "list.txt").write_text("\n".join(lines) + "\n")
    return work / "list.txt"


def _run(cmd: Sequence[str], what: str, out: Path, timeout_s: float) -> ToolRun:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return ToolRun(False, f"{what} did not finish within {timeout_s:.0f} s", None)
    if proc.returncode != 0 or not out.is_file() or out.stat().st_size == 0:
        if proc.returncode < 0:
            try:
                how = signal.Signals(-proc.returncode).name
            except ValueError:
                how = f"signal {-proc.returncode}"
        else:
            how = f"exit status {proc.returncode}" if proc.returncode else "no output written"
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        return ToolRun(False, f"{what} failed ({how}); last line: {last[0][:160]!r}", proc.returncode,
                       proc.stdout, proc.stderr)
    return ToolRun(True, "ok", 0, proc.stdout, proc.stderr)


def run_ncnn2table(
    tools: str | Path,
    param: str | Path,
    bin_path: str | Path,
    samples: torch.Tensor | np.ndarray,
    method: str,
    out_table: str | Path,
    *,
    threads: int = 1,
    timeout_s: float = 300.0,
) -> ToolRun:
    """The real ``ncnn2table`` on ``samples`` ``[N, C, H, W]`` (float32, as the model takes them).

    The samples are written next to ``out_table`` (``<out_table>.inputs/``) and read with
    ``type=1``; ``thread=1`` makes the tool's output deterministic.

    Raises:
        ValueError: ``method`` is not one of :data:`TOOL_METHODS`, or ``samples`` is not 4-D.
    """
    if method not in TOOL_METHODS:
        raise ValueError(f"`method` must be one of {TOOL_METHODS}, got {method!r}")
    if samples.ndim != 4:
        raise ValueError(f"`samples` must be [N, C, H, W], got shape {tuple(samples.shape)}")
    out_table = Path(out_table)
    out_table.unlink(missing_ok=True)
    listfile = write_npy_list(samples, out_table.parent / f"{out_table.name}.inputs")
    c, h, w = (int(v) for v in samples.shape[1:])
    cmd = [str(Path(tools) / "ncnn2table"), str(param), str(bin_path), str(listfile), str(out_table),
           f"shape=[{w},{h},{c}]", f"method={method}", "type=1", f"thread={int(threads)}"]
    return _run(cmd, f"ncnn2table method={method}", out_table, timeout_s)


def run_ncnn2int8(
    tools: str | Path,
    param: str | Path,
    bin_path: str | Path,
    table: str | Path,
    out_param: str | Path,
    out_bin: str | Path,
    *,
    timeout_s: float = 600.0,
) -> ToolRun:
    """The real ``ncnn2int8``: float ``param``/``bin_path`` + ``table`` -> ``out_param``/``out_bin``."""
    Path(out_bin).unlink(missing_ok=True)
    cmd = [str(Path(tools) / "ncnn2int8"), str(param), str(bin_path), str(out_param), str(out_bin), str(table)]
    return _run(cmd, f"ncnn2int8 on {Path(table).name}", Path(out_bin), timeout_s)


def tool_thresholds(stderr: str) -> dict[str, tuple[float, float]]:
    """``layer -> (max, threshold)`` from ncnn2table's ``print_quant_info`` lines (``%f``)."""
    out = {}
    for line in stderr.splitlines():
        m = re.match(r"^(\S+)\s+: max = (\S+)\s+threshold = (\S+)", line)
        if m:
            out[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return out
