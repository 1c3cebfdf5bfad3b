"""QAT under DDP (gloo, 2 CPU processes): synchronised ranges, identical state, resume."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from lightning_ncnnqat.ops import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_run.py")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable")


def _run(out, strategy: str, devices: int, batch: int, resume: str | None = None, export=None,  # noqa: ANN001
         ranges: str = "moving_average") -> list[dict]:
    cmd = [sys.executable, SCRIPT, str(out), strategy, str(devices), str(batch)] + ([resume] if resume else [])
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", NCNNQAT_TEST_EXPORT=str(export or ""),
               NCNNQAT_TEST_RANGES=ranges)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(devices)]


def _assert_same(a: dict, b: dict, **tol: float) -> None:
    assert a["ranges"].keys() == b["ranges"].keys()
    for k in a["ranges"]:
        assert torch.allclose(a["ranges"][k], b["ranges"][k], **tol), k
    for k in a["params"]:
        assert torch.allclose(a["params"][k], b["params"][k], **tol), k


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_ranks_hold_identical_state_and_match_single_process(tmp_path, strategy: str) -> None:  # noqa: ANN001
    ranks = _run(tmp_path / "ddp", strategy, 2, 8)
    assert ranks[0]["world_size"] == 2
    assert all(r > 0 for r in ranks[0]["ranges"].values())
    for k in ranks[0]["ranges"]:
        assert torch.equal(ranks[0]["ranges"][k], ranks[1]["ranges"][k]), k  # bit-identical across ranks
    for k in ranks[0]["params"]:
        assert torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]), k
    if strategy == "ddp":
        # one process over the same global batches (2 x 8, the distributed sampler interleaves)
        (single,) = _run(tmp_path / "single", "auto", 1, 16)
        _assert_same(ranks[0], single, rtol=1e-4, atol=1e-5)


def test_resume_from_ddp_checkpoint(tmp_path) -> None:  # noqa: ANN001
    first = _run(tmp_path / "a", "ddp", 2, 8)
    ckpt = sorted(glob.glob(str(tmp_path / "a" / "ckpt" / "epoch=1*.ckpt")))[0]
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert "ncnnqat" in state
    resumed = _run(tmp_path / "b", "ddp", 2, 8, resume=ckpt)
    _assert_same(first[0], resumed[0], rtol=1e-6, atol=1e-7)
    for k in resumed[0]["ranges"]:
        assert torch.equal(resumed[0]["ranges"][k], resumed[1]["ranges"][k])


def test_learned_ranges_identical_across_ranks_trained_and_resumed_exactly(tmp_path) -> None:  # noqa: ANN001
    first = _run(tmp_path / "a", "ddp", 2, 8, ranges="learned")
    logs = first[0]["log_thresholds"]
    assert logs and logs.keys() == first[0]["ranges"].keys()
    for k in logs:
        assert torch.equal(logs[k], first[1]["log_thresholds"][k]), k  # the same Adam step on every rank
        assert torch.equal(first[0]["ranges"][k], logs[k].exp()), k  # the table carries exp(log t) exactly
    # trained: they moved away from the ACIQ start (rank 0's first batches), which "fixed" keeps
    fixed = _run(tmp_path / "fixed", "ddp", 2, 8, ranges="fixed")
    assert all(torch.equal(fixed[0]["ranges"][k], fixed[1]["ranges"][k]) for k in logs)
    assert any(not torch.allclose(fixed[0]["ranges"][k], first[0]["ranges"][k], rtol=1e-3) for k in logs)
    ckpt = sorted(glob.glob(str(tmp_path / "a" / "ckpt" / "epoch=1*.ckpt")))[0]
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert any("learned_ranges" in v for v in state["callbacks"].values())
    resumed = _run(tmp_path / "b", "ddp", 2, 8, resume=ckpt, ranges="learned")
    for k in logs:
        assert torch.equal(resumed[0]["log_thresholds"][k], logs[k]), k  # Adam moments restored too
    _assert_same(first[0], resumed[0], rtol=1e-6, atol=1e-7)


def _table(path) -> dict[str, list[float]]:  # noqa: ANN001
    rows = {}
    for line in open(path).read().splitlines():
        name, *values = line.split(" ")
        rows[name] = [float(v) for v in values]
    return rows


def test_ddp_export_equals_rank0_state_and_cli_reexports_the_checkpoint(tmp_path) -> None:  # noqa: ANN001
    export_dir = tmp_path / "export"
    ranks = _run(tmp_path / "a", "ddp", 2, 8, export=export_dir)
    report = json.loads((export_dir / "report.json").read_text())
    table = _table(export_dir / "model.ncnn.table")
    assert report["layers"]
    for layer in report["layers"]:
        rank0 = ranks[0]["ranges"][layer["input_owner"]]
        expected = float(reference.scale_from_absmax(rank0, 8).item())
        assert layer["input_scale"] == expected, layer["torch_name"]
        assert table[layer["ncnn_name"]] == pytest.approx([expected], rel=1e-8)
    # the export command rebuilds the model from the DDP run's last checkpoint: same tables, byte for byte
    ckpt = sorted(glob.glob(str(tmp_path / "a" / "ckpt" / "epoch=2*.ckpt")))[0]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT]), PYTHONWARNINGS="ignore")
    cli = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_ncnnqat", "export", ckpt, "--model", "lit_models:LitMixed",
         "--export-dir", str(cli), "--quiet"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("model.table", "model.ncnn.table"):
        assert (cli / name).read_bytes() == (export_dir / name).read_bytes(), name
