"""SiLU vs swapped activations on scikit-learn digits: accuracy after QAT and ncnn speed.

    python benchmarks/swap_digits.py --seeds 0 1 2 --float-epochs 30 --qat-epochs 5

Per seed: train the small SiLU CNN of ``deploy_speed.py`` (1 input channel, digits upsampled to
16x16) in float; then from those weights (a) QAT as is, (b) ``swap_activations`` (SiLU -> ReLU)
then QAT, both for ``--qat-epochs``; export both; top-1 on the held-out 450 images of: the float
SiLU model (PyTorch), each ncnn int8 model, and ncnn's own post-training quantization of the float
SiLU model (the real ``ncnn2table`` + ``ncnn2int8`` from ``../shared/ncnn-tools`` or ``$NCNN_TOOLS``,
``--ptq-method`` on the first ``--ptq-samples`` training images, as ``benchmarks/results_ptq.py``
runs them; skipped with a line saying so where the tools are absent). Then the ncnn models are
timed side by side (1 thread, interleaved): float SiLU, int8 SiLU (QAT), int8 SiLU (ncnn PTQ),
float swapped, int8 swapped.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.append(str(p))

from deploy_speed import SiLUCNN, machine  # noqa: E402
from results_ptq import TOOLS, float_ncnn  # noqa: E402

from lightning_ncnnqat.calibration.ncnn_tools import find_tools, run_ncnn2int8, run_ncnn2table  # noqa: E402

from lightning_ncnnqat import export, prepare_qat  # noqa: E402
from lightning_ncnnqat.speed.activation_swap import swap_activations  # noqa: E402
from lightning_ncnnqat.ncnn.isolated import run_ncnn  # noqa: E402
from lightning_ncnnqat.speed.plan import count_chains, time_models, whole_models  # noqa: E402


def digits(seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn digits as [N, 1, size, size] in [0, 1]; 1347 train / 450 test (split by ``seed``)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:1347], perm[1347:]
    return x[tr], y[tr], x[te], y[te]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * ((len(y) + 63) // 64)))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def top1_torch(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean()) * 100


def qat_export(model: nn.Module, x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor, epochs: int,
               lr: float, seed: int, out: Path) -> tuple[float, float]:
    """QAT ``model`` in place, export to ``out``; (QAT torch top-1, ncnn int8 top-1) on ``xt``."""
    prepare_qat(model, x[:1])
    train(model, x, y, epochs, lr, seed)
    rep = export(model, out, x[:1], x[:64], verbose=False, targets=["x86"], timing_runs=0, check_onnx=False,
                 layer_check_samples=1)
    if rep.failures:
        raise RuntimeError(f"export failed: {rep.failures}")
    return top1_torch(model, xt, yt), ncnn_top1(out / "model.int8.param", out / "model.int8.bin", xt, yt)


def ncnn_top1(param: Path, bin_path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    r = run_ncnn(param, bin_path, {"in0": x.numpy()}, ["out0"])
    return float((r.outputs["out0"].reshape(len(y), -1).argmax(1) == y.numpy()).mean()) * 100


def ncnn_ptq(fm: nn.Module, x: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor, method: str, samples: int,
             out: Path) -> float | None:
    """ncnn's own PTQ of the float model ``fm``: pnnx float model (BN folded), ``ncnn2table``
    (``method``, the first ``samples`` of ``x``, 1 thread) and ``ncnn2int8`` into ``out/ptq.*``;
    its ncnn top-1 on ``xt``. None when ncnn's tools are absent; RuntimeError when a tool fails."""
    tools = find_tools(TOOLS)
    if tools is None:
        return None
    param, bin_ = float_ncnn(fm, x[:1], out)
    table = out / f"ptq_{method}.table"
    run = run_ncnn2table(tools, param, bin_, x[:samples], method, table, threads=1)
    if not run.ok:
        raise RuntimeError(run.message)
    run = run_ncnn2int8(tools, param, bin_, table, out / "ptq.param", out / "ptq.bin")
    if not run.ok:
        raise RuntimeError(f"{run.message}: {run.stderr[-200:]}")
    return ncnn_top1(out / "ptq.param", out / "ptq.bin", xt, yt)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--float-epochs", type=int, default=30)
    p.add_argument("--qat-epochs", type=int, default=5)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--size", type=int, default=16, help="digits are upsampled to size x size")
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--work", default="swap_digits_out")
    p.add_argument("--ptq-method", default="kl", choices=["kl", "aciq", "eq"], help="ncnn2table's method")
    p.add_argument("--ptq-samples", type=int, default=256, help="training images ncnn2table calibrates on")
    a = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for seed in a.seeds:
        x, y, xt, yt = digits(seed, a.size)
        torch.manual_seed(seed)
        fm = SiLUCNN(10, a.width, in_ch=1)
        train(fm, x, y, a.float_epochs, 3e-3, seed)
        f_acc = top1_torch(fm, xt, yt)
        ptq = ncnn_ptq(copy.deepcopy(fm), x, xt, yt, a.ptq_method, a.ptq_samples, Path(a.work) / f"ptq_{seed}")
        silu = copy.deepcopy(fm)
        s_qat, s_int8 = qat_export(silu, x, y, xt, yt, a.qat_epochs, 5e-4, seed, Path(a.work) / f"silu_{seed}")
        sw = copy.deepcopy(fm)
        rep = swap_activations(sw)
        sw_swapped_acc = top1_torch(sw, xt, yt)
        w_qat, w_int8 = qat_export(sw, x, y, xt, yt, a.qat_epochs, 5e-4, seed, Path(a.work) / f"swap_{seed}")
        rows.append((seed, f_acc, s_qat, s_int8, sw_swapped_acc, w_qat, w_int8, ptq))
        ptq_text = "tools absent" if ptq is None else f"{ptq:.2f}"
        print(f"seed {seed}: float SiLU {f_acc:.2f} | ncnn PTQ ({a.ptq_method}) of it {ptq_text} | "
              f"SiLU QAT {s_qat:.2f} int8 {s_int8:.2f} | swapped before QAT "
              f"{sw_swapped_acc:.2f}, after QAT {w_qat:.2f}, int8 {w_int8:.2f} ({len(rep.swapped)} swapped)", flush=True)
    cols = list(zip(*rows))
    names = ["float SiLU (torch)", "SiLU QAT (torch)", "SiLU int8 (ncnn)", "swapped, no fine-tune (torch)",
             "swapped QAT (torch)", "swapped int8 (ncnn)", f"SiLU ncnn PTQ int8 ({a.ptq_method}, {a.ptq_samples} images)"]
    print(f"\ntop-1 % on 450 held-out digits ({a.size}x{a.size}, width {a.width}), {a.float_epochs} float + {a.qat_epochs} QAT epochs, seeds {a.seeds}")
    print("| model | mean | per seed |\n|---|---|---|")
    for name, col in zip(names, cols[1:]):
        if any(v is None for v in col):
            print(f"| {name} | not run: ncnn's tools are not at {TOOLS} (set NCNN_TOOLS) | |")
            continue
        print(f"| {name} | {statistics.mean(col):.2f} | {', '.join(f'{v:.2f}' for v in col)} |")
    seed = a.seeds[-1]
    s_dir, w_dir = Path(a.work) / f"silu_{seed}", Path(a.work) / f"swap_{seed}"
    sf, sq = whole_models(s_dir, 1)
    wf, wq = whole_models(w_dir, 1)
    models = [dataclasses.replace(sf, name="float SiLU"), dataclasses.replace(sq, name="int8 SiLU"),
              dataclasses.replace(wf, name="float swapped"), dataclasses.replace(wq, name="int8 swapped")]
    ptq_dir = Path(a.work) / f"ptq_{seed}"
    if (ptq_dir / "ptq.param").is_file():  # the tool's int8 model of the same float weights
        models.insert(2, dataclasses.replace(sq, name="int8 SiLU-PTQ", param=str((ptq_dir / "ptq.param").resolve()),
                                             bin=str((ptq_dir / "ptq.bin").resolve())))
    t = time_models(models, runs=a.runs)
    base = t["float SiLU"].ms("cpu")
    m = machine()
    print(f"\nncnn speed, 1 thread, {a.runs} interleaved runs; {m['cpu']} ({', '.join(m['features'])}), load "
          f"{m['load_1min']:.1f}, ncnn {m['ncnn']}")
    print("| model | CPU ms median [min-max] | wall ms median [min-max] | vs float SiLU (CPU) | requantized / int8 convs |")
    print("|---|---|---|---|---|")
    chains = {"SiLU": count_chains((s_dir / "model.int8.param").read_text()),
              "swapped": count_chains((w_dir / "model.int8.param").read_text())}
    if (ptq_dir / "ptq.param").is_file():
        chains["SiLU-PTQ"] = count_chains((ptq_dir / "ptq.param").read_text())
    for name, v in t.items():
        c = chains[name.split()[1]]
        ch = f"{c.requantized} / {c.int8_convs}" if name.startswith("int8") else "-"
        print(f"| {name} | {v.cpu_median_ms:.3f} [{v.cpu_min_ms:.3f}-{v.cpu_max_ms:.3f}] | {v.median_ms:.3f} "
              f"[{v.min_ms:.3f}-{v.max_ms:.3f}] | {base / v.ms('cpu'):.2f}x | {ch} |")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
