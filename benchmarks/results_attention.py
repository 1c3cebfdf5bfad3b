"""A small attention model through QAT and the ncnn int8 export (issue 18), at the results size.

Conv stem (4x4 patches of a 16x16 image: 16 tokens of 32) -> block 1 with ``nn.MultiheadAttention``
(pnnx: one MultiHeadAttention) -> block 2 with ``F.scaled_dot_product_attention`` (one SDPA, its
q/k/v and projection Linears Gemms) -> each block's MLP as Linear on tokens (Gemm) -> mean -> head.
LayerNorm and GELU stay float in ncnn. Trained float, then ``prepare_qat`` (with
``targets=["x86"]``: the QAT start the callback runs, its speed decision under ``--prefer``,
default ``speed``; ``--prefer int8`` keeps every layer int8) and QAT fine-tuning,
then ``export`` to x86 and the emulated A53/A76 with report.json; prints the figures
docs/results.md records: accuracy (PyTorch float / QAT, ncnn int8 on x86), int8 vs QAT cosine and
top-1 per target, flagged layers, int8 vs float timing (the export report's), and ncnn's own PTQ of
the float model (pnnx, ncnn2table KL on 200 training images, ncnn2int8) where ``$NCNN_TOOLS`` holds
the tools.

    NCNN_TOOLS=../shared/ncnn-tools python benchmarks/results_attention.py [--dataset fashion_mnist|digits] [--out runs/attention]

Fashion-MNIST needs Debian's ``dataset-fashion-mnist``; without it use ``--dataset digits``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from results_data import load_splits  # noqa: E402

from lightning_ncnnqat import QATConfig, export, prepare_qat  # noqa: E402
from lightning_ncnnqat.calibration.ncnn_tools import find_tools, run_ncnn2int8, run_ncnn2table  # noqa: E402
from lightning_ncnnqat.conversion.pnnx import convert_with_pnnx  # noqa: E402
from lightning_ncnnqat.ncnn.isolated import run_ncnn  # noqa: E402

DIM, TOKENS_SIDE = 32, 4


class MhaBlock(nn.Module):
    def __init__(self, heads: int) -> None:
        super().__init__()
        self.n1, self.attn = nn.LayerNorm(DIM), nn.MultiheadAttention(DIM, heads, batch_first=True)
        self.n2, self.fc1, self.fc2 = nn.LayerNorm(DIM), nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = self.n1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        return t + self.fc2(F.gelu(self.fc1(self.n2(t))))


class SdpaBlock(nn.Module):
    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.n1, self.qkv, self.proj = nn.LayerNorm(DIM), nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.n2, self.fc1, self.fc2 = nn.LayerNorm(DIM), nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        q, k, v = (u.reshape(b, n, self.heads, c // self.heads).transpose(1, 2) for u in self.qkv(self.n1(t)).chunk(3, -1))
        t = t + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        return t + self.fc2(F.gelu(self.fc1(self.n2(t))))


class AttnNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.ReLU(), nn.Conv2d(16, DIM, 4, 4))
        self.b1, self.b2 = MhaBlock(4), SdpaBlock(2)
        self.head = nn.Linear(DIM, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.b2(self.b1(t)).mean(1))


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def _acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _ncnn_acc(param: Path, bin_path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    got = run_ncnn(param, bin_path, {"in0": x.numpy()}, ["out0"], target="x86")
    return float((np.asarray(got.outputs["out0"]).reshape(len(x), -1).argmax(1) == y.numpy()).mean())


def _ptq(model: nn.Module, xtr: torch.Tensor, xva: torch.Tensor, yva: torch.Tensor, out: Path) -> dict:
    """ncnn's own PTQ of the float model: pnnx, ncnn2table (KL, 200 training images), ncnn2int8."""
    tools = find_tools()
    if tools is None:
        return {"ptq": "ncnn tools not found"}
    out.mkdir(parents=True, exist_ok=True)
    res = convert_with_pnnx(model, xtr[:1])
    (out / "f.param").write_text(res.param_text)
    (out / "f.bin").write_bytes(res.bin_bytes)
    run_ncnn2table(tools, out / "f.param", out / "f.bin", xtr[:200], "kl", out / "f.table")
    run_ncnn2int8(tools, out / "f.param", out / "f.bin", out / "f.table", out / "i.param", out / "i.bin")
    int8 = (out / "i.param").read_text()
    return {"ncnn_fp32_x86_acc": _ncnn_acc(out / "f.param", out / "f.bin", xva, yva),
            "ptq_kl_int8_x86_acc": _ncnn_acc(out / "i.param", out / "i.bin", xva, yva),
            "ptq_int8_layers": {t: sum(1 for line in int8.splitlines() if line.startswith(t) and "18=2" in line)
                                for t in ("MultiHeadAttention", "SDPA", "Gemm")}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="digits", choices=("fashion_mnist", "digits"))
    ap.add_argument("--float-epochs", type=int, default=15)
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--out", default="runs/attention")
    ap.add_argument("--targets", nargs="+", default=["x86", "arm64-a53", "arm64-a76"])
    ap.add_argument("--prefer", default="speed", choices=["speed", "int8", "size"],
                    help="QATConfig(prefer=): 'speed' (the default) keeps the int8 layers that lose on x86 float")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    s = load_splits(a.dataset, None, 16, 8000, None, 0)
    size = lambda t: F.interpolate(t, size=(16, 16), mode="area") if t.shape[-1] != 16 else t  # noqa: E731
    xtr, xva = size(s.x_train), size(s.x_val)
    t0 = time.time()
    model = AttnNet()
    _fit(model, xtr, s.y_train, a.float_epochs, 3e-3, 0)
    float_acc = _acc(model, xva, s.y_val)
    ptq = _ptq(copy.deepcopy(model), xtr, xva, s.y_val, Path(a.out) / "ptq")
    plan = prepare_qat(model, xtr[:1], QATConfig(prefer=a.prefer), targets=["x86"])  # the QAT start as the callback runs it
    print(plan.summary())
    _fit(model, xtr, s.y_train, a.qat_epochs, 5e-4, 1)
    qat_acc = _acc(model, xva, s.y_val)
    out = Path(a.out)
    report = export(model, out, xtr[:1], xva[:200], targets=a.targets, verbose=False)
    got = run_ncnn(out / "model.int8.param", out / "model.int8.bin", {"in0": xva.numpy()}, ["out0"], target="x86")
    int8_acc = float((np.asarray(got.outputs["out0"]).reshape(len(xva), -1).argmax(1) == s.y_val.numpy()).mean())
    res = {
        "data": s.note + " (resized to 16x16)", "float_acc": float_acc, "qat_acc": qat_acc, "ncnn_int8_x86_acc": int8_acc,
        "int8_layers": {"attention": plan.attention_layers, "sdpa": plan.sdpa_calls, "gemm": list(plan.gemm_layers),
                        "table": list(plan.layers)},
        "prefer": a.prefer, "float_layers": dict(plan.float_layers),
        **ptq,
        "flagged": report.flagged_layers,
        "int8_vs_qat": {t: {k: report.runtime[t]["int8_vs_qat"].get(k) for k in ("cosine", "top1_agreement")}
                        for t in a.targets if t in report.runtime},
        "timing": {k: (report.timing or {}).get(k) for k in ("float32_ms", "int8_ms", "speedup", "verdict", "runs", "machine")},
        "minutes": (time.time() - t0) / 60,
    }
    print(json.dumps(res, indent=1, default=str))
    (out / "results_attention.json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
