"""LightningModules and data for the callback tests (small, deterministic, CPU)."""

from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from models import MixedNet


def make_data(n: int = 64, size: int = 16, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    # class-dependent means so the task is learnable
    x = torch.randn(n, 3, size, size, generator=g) + (y.float()[:, None, None, None] - 4.5) / 3
    return TensorDataset(x, y)


def loader(ds: TensorDataset, batch_size: int = 16) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


class _Steps:
    """Training/eval steps shared by the lightning.pytorch and pytorch_lightning modules."""

    lr = 0.05

    def _build(self, example: bool) -> None:
        self.net = MixedNet()
        if example:
            self.example_input_array = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx) -> None:  # noqa: ANN001
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx) -> None:  # noqa: ANN001
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        return self(batch[0])

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class LitMixed(_Steps, L.LightningModule):
    def __init__(self, example: bool = True) -> None:
        super().__init__()
        self._build(example)


try:
    import pytorch_lightning as PL

    class PLMixed(_Steps, PL.LightningModule):
        def __init__(self, example: bool = True) -> None:
            super().__init__()
            self._build(example)

except ImportError:  # pragma: no cover
    PL = None


def make_module(base: type, example: bool = True) -> L.LightningModule:
    """A test LightningModule deriving from ``base`` (lightning.pytorch or pytorch_lightning)."""
    return (LitMixed if base is L.LightningModule else PLMixed)(example)


def quiet_trainer(**kw: Any) -> L.Trainer:
    """A Trainer without logger, checkpoints, progress bar or model summary; ``kw`` adds to these
    or overrides them (``enable_checkpointing=True`` for a run with a ModelCheckpoint)."""
    args: dict[str, Any] = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False)
    args.update(kw)
    return L.Trainer(**args)


class NetLit(L.LightningModule):
    """A LightningModule around ``net``: trains on ``loss(net(x), y)`` with SGD at ``lr`` (and
    ``momentum``); validation logs ``val_loss``, and ``val_acc`` (argmax == y) with ``log_acc``.
    ``example`` becomes ``example_input_array`` when given."""

    def __init__(self, net: nn.Module, lr: float = 0.05, momentum: float = 0.0,
                 loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
                 example: torch.Tensor | None = None, log_acc: bool = False) -> None:
        super().__init__()
        self.net = net
        self.lr, self.momentum, self.loss, self.log_acc = lr, momentum, loss, log_acc
        if example is not None:
            self.example_input_array = example

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        return self.loss(self(x), y)

    def validation_step(self, batch, batch_idx) -> None:  # noqa: ANN001
        x, y = batch
        out = self(x)
        self.log("val_loss", self.loss(out, y))
        if self.log_acc:
            self.log("val_acc", (out.argmax(1) == y).float().mean())

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 8x8 digits (skips without sklearn): images [1797, 1, 8, 8] float32 in [-1, 1],
    labels [1797] int64."""
    d = pytest.importorskip("sklearn.datasets").load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    return x, torch.tensor(d.target, dtype=torch.int64)


def digits(n_train: int, n_val: int) -> tuple[TensorDataset, TensorDataset]:
    """Train and validation sets of ``n_train`` and ``n_val`` digits, a seeded shuffle of them."""
    x, y = digits_tensors()
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, va = idx[:n_train], idx[n_train:n_train + n_val]
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va])


def digits_cnn() -> nn.Sequential:
    """conv-bn-relu x2 (the second stride 2) and a linear head, 1x8x8 -> 10 logits."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 16, 10),
    )
