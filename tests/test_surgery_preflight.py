"""The callback's preflight hook: export_dir checked at fit start, the export chain run at QAT start."""

from __future__ import annotations

import importlib

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat import QATCallback
from lit_models import loader, make_data

preflight_module = pytest.importorskip("lightning_ncnnqat.export.preflight")
ExportError = importlib.import_module("lightning_ncnnqat.errors").ExportError


class NoOnnx(nn.Module):
    """Trains fine, but torch.onnx has no export for linalg.inv: the export must fail."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(x).mean((2, 3))
        eye = torch.eye(2, device=x.device)
        y = torch.linalg.inv(y[:, :2, None] * eye + 2 * eye).flatten(1)
        return self.fc(torch.cat([y, y], 1))


class Lit(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = NoOnnx()
        self.example_input_array = torch.randn(2, 3, 16, 16)
        self.steps: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        self.steps.append(self.current_epoch)
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_unwritable_export_dir_fails_before_training(tmp_path) -> None:  # noqa: ANN001
    (tmp_path / "a_file").write_text("not a directory")
    bad = tmp_path / "a_file" / "export"
    cb = QATCallback(start_epoch=1, export_dir=str(bad), verbose=False)
    model = Lit()
    trainer = L.Trainer(max_epochs=2, callbacks=[cb], enable_progress_bar=False, logger=False,
                        enable_checkpointing=False, default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match="a_file/export"):
        trainer.fit(model, loader(make_data()))
    assert model.steps == []


def test_model_that_cannot_export_fails_at_qat_start(tmp_path) -> None:  # noqa: ANN001
    cb = QATCallback(start_epoch=1, export_dir=str(tmp_path / "export"), verbose=False)
    model = Lit()
    trainer = L.Trainer(max_epochs=3, callbacks=[cb], enable_progress_bar=False, logger=False,
                        enable_checkpointing=False, default_root_dir=str(tmp_path))
    with pytest.raises(ExportError, match="onnx"):
        trainer.fit(model, loader(make_data()))
    assert model.steps == [0] * 4  # epoch 0 trained (float); no QAT step ran


def test_preflight_off_skips_both_checks(tmp_path) -> None:  # noqa: ANN001
    (tmp_path / "a_file").write_text("not a directory")
    cb = QATCallback(start_epoch=0, export_dir=str(tmp_path / "a_file" / "export"), verbose=False, preflight=False)
    model = Lit()
    trainer = L.Trainer(max_epochs=1, callbacks=[cb], enable_progress_bar=False, logger=False,
                        enable_checkpointing=False, default_root_dir=str(tmp_path))
    with pytest.raises(Exception):  # noqa: B017  (the export at fit end fails instead)
        trainer.fit(model, loader(make_data()))
    assert model.steps == [0] * 4 and cb.active
