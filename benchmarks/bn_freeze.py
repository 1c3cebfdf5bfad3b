"""Freezing folded BN statistics when QAT starts vs after 1 or 2 QAT epochs (QATConfig.freeze_bn_after).

sklearn's digits (8x8, 1297 train / 500 validation images, fixed split), a small CNN with three
conv + BN blocks. Per seed: float training (SGD momentum 0.9, lr 0.05, 3 epochs), then 4 QAT
epochs from that float model, once per (QAT learning rate, freeze_bn_after): the float run's own
lr 0.05 (what a user keeps, issue 19 item 11) and a tenth of it. Reported: validation top-1 of the
QAT model in eval mode (the folded, fake-quantized network the int8 export reproduces; parity is
measured by the export, not here) after the last QAT epoch, mean and per seed.

    python benchmarks/bn_freeze.py [--seeds 0 1 2] [--qat-epochs 4]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat import QATConfig, prepare_qat
from lightning_ncnnqat.qat.bn_fold import set_bn_stats_frozen


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.int64)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    tr, va = idx[:1297], idx[1297:]
    return x[tr], y[tr], x[va], y[va]


class Net(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()

        def block(i: int, o: int, s: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

        self.features = nn.Sequential(block(1, c, 1), block(c, c, 1), block(c, 2 * c, 2))
        self.fc = nn.Linear(2 * c * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, seed: int) -> None:
    model.train()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(x), 32):
        b = order[i:i + 32]
        opt.zero_grad()
        F.cross_entropy(model(x[b]), y[b]).backward()
        opt.step()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def qat_run(float_model: nn.Module, data: tuple, lr: float, freeze_after: int, epochs: int, seed: int) -> float:
    xtr, ytr, xva, yva = data
    model = copy.deepcopy(float_model)
    prepare_qat(model, xtr[:1], QATConfig(freeze_bn_after=freeze_after))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for epoch in range(epochs):
        if epoch == freeze_after:
            set_bn_stats_frozen(model)  # what QATCallback does at the start of epoch start + freeze_bn_after
        train_epoch(model, opt, xtr, ytr, seed * 100 + 10 + epoch)
    acc = accuracy(model, xva, yva)
    return acc if acc == acc else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--float-epochs", type=int, default=3)
    ap.add_argument("--qat-epochs", type=int, default=4)
    ap.add_argument("--float-lr", type=float, default=0.05)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = digits()
    freezes = (0, 1, 2)
    lrs = (args.float_lr, args.float_lr / 10)
    results: dict[tuple[float, int], list[float]] = {(lr, f): [] for lr in lrs for f in freezes}
    floats = []
    t0 = time.time()
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=args.float_lr, momentum=0.9)
        for epoch in range(args.float_epochs):
            train_epoch(model, opt, data[0], data[1], seed * 100 + epoch)
        floats.append(accuracy(model, data[2], data[3]))
        for lr in lrs:
            for f in freezes:
                results[(lr, f)].append(qat_run(model, data, lr, f, args.qat_epochs, seed))
    print(f"digits, {len(args.seeds)} seeds {args.seeds}, float {args.float_epochs} epochs at lr {args.float_lr}, "
          f"QAT {args.qat_epochs} epochs ({time.time() - t0:.0f} s)")
    print(f"float model: top-1 {statistics.mean(floats):.4f} (per seed {', '.join(f'{a:.4f}' for a in floats)})")
    print(f"{'QAT lr':>8} {'freeze_bn_after':>16} {'mean top-1':>11}  per seed")
    for (lr, f), accs in results.items():
        print(f"{lr:>8g} {f:>16d} {statistics.mean(accs):>11.4f}  {', '.join(f'{a:.4f}' for a in accs)}")


if __name__ == "__main__":
    main()
