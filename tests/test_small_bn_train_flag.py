"""The package's own modules follow ``model.train()``: at fit start and at resume (frozen folded
BatchNorms under ``freeze_bn_after``) Lightning finds no module of ours in eval mode, and the
frozen statistics stay frozen whatever the flag (``qat/bn_fold.py``: the ``stats_live`` flag)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ncnnqat import QATCallback, QATConfig, prepare_qat
from lightning_ncnnqat.qat.bn_fold import is_folded, set_bn_stats_frozen, stats_live
from lit_models import NetLit, digits_cnn, quiet_trainer

torch.set_num_threads(1)


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d form: a BatchNorm subclass running its own activation child."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


def _bn_act_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), BatchNormAct(8), nn.Conv2d(8, 4, 3, stride=2),
                         nn.Flatten(), nn.Linear(4 * 9, 10))


def _bn1d_net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))


class EvalAtStart(Callback):
    """The modules in eval mode when training starts (Lightning's own check runs just before)."""

    def __init__(self) -> None:
        self.found: list[list[str]] = []

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.found.append([n for n, m in pl_module.named_modules() if not m.training])


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (96,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=32)


@pytest.mark.parametrize("make", [digits_cnn, _bn_act_net, _bn1d_net])
def test_resume_with_frozen_bn_finds_no_module_in_eval(tmp_path, make) -> None:
    torch.manual_seed(0)
    lit = NetLit(make(), lr=0.02)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    qat = dict(start_epoch=0, freeze_bn_after=1, export_dir=None, verbose=False)
    quiet_trainer(max_epochs=2, enable_checkpointing=True, callbacks=[QATCallback(**qat), ckpt]).fit(lit, _data())
    assert all(not stats_live(m) for m in lit.modules() if is_folded(m))  # frozen after one QAT epoch

    torch.manual_seed(0)
    again = NetLit(make(), lr=0.02)
    seen = EvalAtStart()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_epochs=3, callbacks=[QATCallback(**qat), seen]).fit(
            again, _data(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert seen.found == [[]]
    assert not [w for w in caught if "in eval mode" in str(w.message)]
    folded = [m for m in again.modules() if is_folded(m)]
    assert folded and all(not stats_live(m) for m in folded)


@pytest.mark.parametrize("make", [digits_cnn, _bn_act_net, _bn1d_net])
def test_a_frozen_fold_computes_the_same_whatever_its_flag(make) -> None:
    """Numerics unchanged: a frozen folded BN's training flag changes no output and no statistic."""
    torch.manual_seed(0)
    net = make()
    x = torch.randn(16, 1, 8, 8)
    prepare_qat(net, x[:1], QATConfig(freeze_bn_after=1))
    net.train()
    net(x)  # one live step: ranges initialised, statistics moved
    set_bn_stats_frozen(net)
    folded = [m for m in net.modules() if is_folded(m)]
    assert folded and all(m.training for m in folded)  # follows net.train()
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in folded]
    ref = copy.deepcopy(net)
    for m in ref.modules():
        if is_folded(m):
            m.training = False  # the flag the fold used to force
    with torch.no_grad():
        assert torch.equal(net(x), ref(x))
    for m, (mean, var) in zip(folded, stats):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
    net.eval()
    assert not any(m.training for m in folded)
