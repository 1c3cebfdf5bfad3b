"""LightningModules and data for the callback tests (small, deterministic, CPU)."""

from __future__ import annotations

import lightning.pytorch as L
import torch
import torch.nn.functional as F
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
