"""The deploy kit runs models whose first ncnn layer works in place on the input (D3).

A model that normalises its own input (a data BatchNorm, ``(x / 255 - mean) / std`` buffers) or
starts with an in-place ReLU gives an ncnn graph whose first layer writes into the input blob.
``ncnn.Mat(array)`` borrows numpy memory without a reference count, and ncnn's in-place check
dereferences that count: ``run_int8.py`` (and ``ncnn/runtime.py``) died with SIGSEGV. Both now
hand ncnn an owned copy. Each model here is exported, then ``run_int8.py`` runs as a user runs
it (a subprocess); its output must equal ncnn's in this process and the QAT model's within what
the report measured, and the caller's input array must be left unchanged.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lightning_ncnnqat import QATConfig, prepare_qat
from lightning_ncnnqat.export import export
from lightning_ncnnqat.ncnn.runtime import NcnnNet

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _body() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


class DataBN(nn.Module):
    """ST-GCN's ``data_bn``: a BatchNorm on the raw input (pixels 0..255), no conv before it."""

    def __init__(self) -> None:
        super().__init__()
        self.data_bn, self.body = nn.BatchNorm2d(3), _body()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.data_bn(x))


class BufferNorm(nn.Module):
    """torchvision-style normalisation in the model: ``(x / 255 - mean) / std`` from buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.body = _body()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x / 255.0 - self.mean) / self.std)


class InplaceReLUFirst(nn.Module):
    """An in-place ReLU on the input (centred data), then the body."""

    def __init__(self) -> None:
        super().__init__()
        self.act, self.body = nn.ReLU(inplace=True), _body()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.act(x - 0.5))


CASES = {"data_bn": (DataBN, 255.0), "buffers": (BufferNorm, 255.0), "inplace_relu": (InplaceReLUFirst, 1.0)}


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    """``(model, report, export dir, held batch)`` of a QAT model of one case, ranges from four
    training batches (the data BN's statistics too), exported for x86."""
    cls, scale = CASES[request.param]
    torch.manual_seed(0)
    model = cls()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 8, 8, generator=g) * scale
    prepare_qat(model, x[:2], QATConfig(prefer="int8"))
    model.train()
    with torch.no_grad():
        for i in range(0, 64, 16):
            model(x[i : i + 16])
    model.eval()
    held = torch.rand(8, 3, 8, 8, generator=g) * scale
    out = tmp_path_factory.mktemp(request.param)
    report = export(model, out, held[:1], held, verbose=False, timing_runs=0, targets="x86")
    return model, report, out, held


def test_first_layer_works_in_place(exported) -> None:
    """The premise: the first layer reading the input blob is one ncnn runs in place
    (BatchNorm, BinaryOp, ReLU)."""
    _, _, out, _ = exported
    rows = [ln.split() for ln in (out / "model.int8.param").read_text().splitlines()[2:] if ln.strip()]
    assert rows[0][0] == "Input"
    readers = [r[0] for r in rows[1:] if rows[0][4] in r[4 : 4 + int(r[2])]]
    assert readers and readers[0] in {"BatchNorm", "BinaryOp", "ReLU"}, rows[:4]


def test_run_int8_script_runs_and_gives_the_int8_models_outputs(exported, tmp_path: Path) -> None:
    model, report, out, held = exported
    assert "could not run `run_int8.py`" not in (out / "DEPLOY.md").read_text()
    sample = held[2].numpy()
    np.save(tmp_path / "sample.npy", sample)
    r = subprocess.run([sys.executable, "run_int8.py", str(tmp_path / "sample.npy"), "--save", str(tmp_path / "o.npz")],
                       cwd=out, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    got = np.load(tmp_path / "o.npz")["out0"].ravel()
    net = NcnnNet(out / "model.int8.param", out / "model.int8.bin")
    before = sample.copy()
    here = net.run(sample)
    assert np.array_equal(sample, before)  # ncnn worked on its own copy, not the caller's array
    assert np.array_equal(got, here)
    with torch.no_grad():
        want = model(held[2:3]).numpy().ravel()
    assert float(np.abs(got - want).max()) <= report.int8_vs_qat.max_abs_err + 1e-6
    assert got.std() > 0  # a real output, not a constant
    assert net.time_per_image(sample, runs=2, warmup=1) > 0  # the timing loop reuses one input Mat


def test_deterministic_run_matches_the_note(exported) -> None:
    """The export's own self-test of the kit ran: DEPLOY.md's expected output is what the script prints."""
    _, _, out, _ = exported
    r = subprocess.run([sys.executable, "run_int8.py"], cwd=out, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    note = (out / "DEPLOY.md").read_text()
    block = note.split("Expected output for the deterministic input", 1)[1].split("```")[1].strip()
    assert r.stdout.strip() == block
