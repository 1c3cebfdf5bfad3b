"""Pruning that starts after QAT started: does the QAT model follow it as a float model does?

    python benchmarks/prune_after_start.py [--seeds 0 1 2] [--no-follow]

Lightning's ``ModelPruning("l1_unstructured", amount=0.3, use_global_unstructured=True,
apply_pruning=lambda e: e >= 2)`` on a small conv-BN net (sklearn digits 8x8, SGD lr 0.05 momentum
0.9, 4 epochs, 6 steps each), float vs ``QATCallback(start_epoch=1)``. Validation accuracy at the end
of epoch 3 (one epoch after the first pruning) and after the last pruning (no epoch follows it).
``--no-follow`` disables the callback's ComputedWatch (the folded BN statistics stay frozen from the
QAT start, as before callbacks/_computed_watch.py).
"""

from __future__ import annotations

import argparse
import warnings

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ncnnqat import QATCallback
from lightning_ncnnqat.callbacks._computed_watch import ComputedWatch


def digits(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """192 training / 64 validation digits as [N, 1, 8, 8] in [-1, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(d.target)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:256]
    x, y = x[idx], y[idx]
    return (DataLoader(TensorDataset(x[:192], y[:192]), batch_size=32),
            DataLoader(TensorDataset(x[192:], y[192:]), batch_size=32))


class Lit(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
        )
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx) -> None:  # noqa: ANN001
        self.log("acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class Acc(Callback):
    def __init__(self) -> None:
        self.history: list[float] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        if not trainer.sanity_checking:
            self.history.append(float(trainer.callback_metrics["acc"]))


def run(seed: int, qat: bool) -> tuple[float, float]:
    """(accuracy at the end of epoch 3, accuracy after the last pruning)."""
    train, val = digits()
    torch.manual_seed(seed)
    lit, acc = Lit(), Acc()
    cbs: list[Callback] = [acc, ModelPruning("l1_unstructured", amount=0.3, use_global_unstructured=True,
                                             apply_pruning=lambda e: e >= 2, make_pruning_permanent=False, verbose=0)]
    if qat:
        cbs.insert(0, QATCallback(start_epoch=1, export_dir=None, verbose=False))
    trainer = L.Trainer(max_epochs=4, callbacks=cbs, logger=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(lit, train, val)
    lit.eval()  # not trainer.validate: ModelPruning's setup would deepcopy the pruned layers again
    with torch.no_grad():
        final = torch.cat([lit(x).argmax(1) == y for x, y in val]).float().mean()
    return acc.history[3], float(final)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-follow", action="store_true", help="folded BN statistics stay frozen (the old behaviour)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if args.no_follow:
        ComputedWatch.at_epoch_start = lambda *a, **k: None  # type: ignore[method-assign]
    print("seed  float ep3  float final  QAT ep3  QAT final")
    for seed in args.seeds:
        f3, ff = run(seed, qat=False)
        q3, qf = run(seed, qat=True)
        print(f"{seed:>4}  {f3:9.3f}  {ff:11.3f}  {q3:7.3f}  {qf:9.3f}", flush=True)


if __name__ == "__main__":
    main()
