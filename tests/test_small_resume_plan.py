"""At resume the checkpoint's QAT plan applies: a `chain_activations` or `prefer` given anew to the
callback does not change a QAT run already under way (docs/manual.md)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ncnnqat import QATCallback, QATConfig
from lightning_ncnnqat.qat.plan import get_plan
from lit_models import NetLit, quiet_trainer

torch.set_num_threads(1)


def _silu_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.SiLU(), nn.Flatten(), nn.Linear(8 * 64, 10))


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)),
                      batch_size=32)


@pytest.mark.parametrize("first, again", [("relu", "off"), ("off", "relu")])
def test_resume_keeps_the_checkpoint_plans_chain_activations(tmp_path, first, again) -> None:
    torch.manual_seed(0)
    lit = NetLit(_silu_net(), lr=0.02)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    cb = dict(start_epoch=0, export_dir=None, verbose=False)
    quiet_trainer(max_epochs=1, enable_checkpointing=True,
                  callbacks=[QATCallback(config=QATConfig(chain_activations=first), **cb), ckpt]).fit(lit, _data())
    kinds = {type(m).__name__ for m in lit.modules()}
    assert ("ReLU" in kinds) == (first == "relu")

    torch.manual_seed(0)
    resumed = NetLit(_silu_net(), lr=0.02)
    quiet_trainer(max_epochs=2, callbacks=[QATCallback(config=QATConfig(chain_activations=again), **cb)]).fit(
        resumed, _data(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert get_plan(resumed).config.chain_activations == first
    assert {type(m).__name__ for m in resumed.modules()} == kinds
