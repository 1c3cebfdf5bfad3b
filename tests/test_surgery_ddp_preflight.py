"""Under DDP, a preflight failure on rank 0 makes every rank raise: none waits forever."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable")
pytest.importorskip("lightning_ncnnqat.export.preflight")
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "surgery_ddp_run.py")


@pytest.mark.parametrize("mode, rank0", [("model", "ExportError")])  # ("dir", "ValueError") passes too (90 s more)
def test_rank0_preflight_failure_stops_every_rank(tmp_path, mode: str, rank0: str) -> None:  # noqa: ANN001
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, SCRIPT, str(tmp_path), mode], capture_output=True, text=True,
                          timeout=300, env=env)
    msgs = {r: (tmp_path / f"rank{r}.txt").read_text() for r in (0, 1) if (tmp_path / f"rank{r}.txt").exists()}
    assert set(msgs) == {0, 1}, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert msgs[0].startswith(rank0), msgs[0]
    assert msgs[1].startswith("RuntimeError") and "failed on global rank 0" in msgs[1], msgs[1]
