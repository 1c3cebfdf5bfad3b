"""A preprocessing the export cannot use fails when fit starts, not after training (the export at
fit end would stop on it, after hours of work)."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ncnnqat import ConfigError, ExportConfig, QATCallback
from lightning_ncnnqat.preprocessing import Preprocessing


class Gray(L.LightningModule):
    """A 1-channel conv net that counts its training steps."""

    def __init__(self, preprocessing: object = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
        self.steps = 0
        if preprocessing is not None:
            self.preprocessing = preprocessing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple, _: int) -> torch.Tensor:
        self.steps += 1
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class GrayData(L.LightningDataModule):
    def __init__(self, preprocessing: object = None) -> None:
        super().__init__()
        if preprocessing is not None:
            self.preprocessing = preprocessing
        g = torch.Generator().manual_seed(0)
        self.ds = TensorDataset(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.ds, batch_size=8)


def _fit(tmp_path, model: L.LightningModule, dm: L.LightningDataModule) -> None:
    cb = QATCallback(start_epoch=1, export=ExportConfig(dir=str(tmp_path / "out"), targets=["x86"]))
    trainer = L.Trainer(max_epochs=2, callbacks=[cb], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, dm)


@pytest.mark.parametrize(
    "where,pre,match",
    [
        ("datamodule", {"mean": [8.0], "std": [8.0]}, "GRAY"),  # RGB by default: 3 values needed
        ("module", {"mean": [0.5], "std": [0.0], "channel_order": "GRAY"}, r"std\[0\]"),
        ("datamodule", {"mean": [0.5], "std": [0.5], "channel_order": "YUV"}, "channel_order"),
        ("module", {"mean": [0.5], "stdev": [0.5]}, "unknown key"),
    ],
)
def test_a_bad_preprocessing_fails_before_the_first_step(tmp_path, where: str, pre: dict, match: str) -> None:
    model = Gray(pre if where == "module" else None)
    dm = GrayData(pre if where == "datamodule" else None)
    with pytest.raises(ConfigError, match=match) as info:
        _fit(tmp_path, model, dm)
    assert model.steps == 0, "the error came after training had started"
    assert info.value.argument == "preprocessing"


def test_preprocessing_errors_name_the_setting_and_stay_value_errors() -> None:
    with pytest.raises(ValueError, match="channel_order='GRAY'") as info:
        Preprocessing(mean=[8.0], std=[8.0])
    assert isinstance(info.value, ConfigError) and info.value.argument == "preprocessing"
    assert Preprocessing(mean=[8.0], std=[8.0], channel_order="GRAY").channels == 1
