"""Folded BN statistics that keep training after QAT starts (issue 19 item 11 c: freeze_bn_after).

While live, a folded BN computes BN's train-mode math around the quantized folded weight
(torch.ao's ConvBn ``_forward_slow``) and updates its running statistics as BN does; once frozen
(the default from the start) nothing about today's fold changes.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ncnnqat import QATCallback, QATConfig, prepare_qat
from lightning_ncnnqat.qat.bn_fold import set_bn_stats_frozen, stats_live
from lightning_ncnnqat.qat.plan import get_plan
from lit_models import NetLit, digits_cnn, digits_tensors, quiet_trainer

torch.set_num_threads(1)


class ConvNet(nn.Module):
    def __init__(self, zero_gamma: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 64, 6, bias=False)
        self.bn1d = nn.BatchNorm1d(6)
        if zero_gamma:  # timm's zero-initialised last BN of a residual block
            nn.init.zeros_(self.bn.weight)
            nn.init.constant_(self.bn.bias, 0.1)  # so the ReLU after it passes gradients

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        return self.bn1d(self.head(torch.flatten(x, 1)))


def _trained_float(zero_gamma: bool = False) -> tuple[ConvNet, torch.Tensor]:
    torch.manual_seed(0)
    net = ConvNet(zero_gamma)
    x = torch.randn(64, 3, 8, 8) * 2 + 0.5
    net.train()
    with torch.no_grad():
        for i in range(0, 64, 16):  # running statistics away from 0 / 1
            net(x[i:i + 16])
    return net, x


def test_live_fold_is_batchnorm_in_train_mode() -> None:
    net, x = _trained_float()
    ref = copy.deepcopy(net).train()
    prepare_qat(net, x[:1], QATConfig(freeze_bn_after=1))
    assert stats_live(net.bn) and stats_live(net.bn1d)
    net.train()
    batch = x[:16]
    y, y_ref = net(batch), ref(batch)
    # BN's train-mode output (batch statistics), up to int8 input and weight quantization
    assert F.cosine_similarity(y.flatten(), y_ref.flatten(), dim=0) > 0.995
    # running statistics took BN's momentum step (unbiased variance) from the batch
    for name in ("bn", "bn1d"):
        a, b = getattr(net, name), getattr(ref, name)
        assert torch.allclose(a.running_mean, b.running_mean, rtol=0.05, atol=0.02), name
        assert torch.allclose(a.running_var, b.running_var, rtol=0.05, atol=0.02), name
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked)
    y.square().mean().backward()
    for p in (net.conv.weight, net.bn.weight, net.bn.bias, net.head.weight, net.bn1d.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert net.conv.bias.grad.abs().max() < 1e-6  # a bias before train-mode BN cancels, as in float
    # eval (and the export) fold with the running statistics, live or frozen alike
    net.eval()
    with torch.no_grad():
        live_eval = net(batch)
    assert set_bn_stats_frozen(net) == 0 and not stats_live(net.bn)
    with torch.no_grad():
        assert torch.equal(net(batch), live_eval)
    exact = (1.0 / torch.sqrt(net.bn.running_var.double() + net.bn.eps)).float()
    assert torch.equal(net.bn.inv_std, exact)


def test_frozen_by_default_and_statistics_do_not_move() -> None:
    net, x = _trained_float()
    prepare_qat(net, x[:1])
    assert get_plan(net).config.freeze_bn_after == 0 and not stats_live(net.bn)
    before = net.bn.running_mean.clone()
    net.train()
    net(x[:16]).sum().backward()
    assert torch.equal(net.bn.running_mean, before)


def test_zero_gamma_stays_finite() -> None:
    net, x = _trained_float(zero_gamma=True)
    prepare_qat(net, x[:1], QATConfig(freeze_bn_after=2))
    net.train()
    y = net(x[:16])
    y.square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(net.bn.weight.grad).all()
    assert net.bn.weight.grad.abs().sum() > 0  # gamma leaves zero


def test_two_forwards_before_one_backward() -> None:
    """The next step updates the statistics in place: a graph still to be back-propagated must
    not hold them (gradient accumulation inside one training_step, or two forwards)."""
    net, x = _trained_float()
    prepare_qat(net, x[:1], QATConfig(freeze_bn_after=1))
    net.train()
    loss = net(x[:16]).square().mean() + net(x[16:32]).square().mean()
    loss.backward()
    assert torch.isfinite(net.conv.weight.grad).all()


class StatsPerEpoch(Callback):
    def __init__(self) -> None:
        self.stats: list[tuple[torch.Tensor, bool]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        bn = pl_module.net[1]
        self.stats.append((bn.running_var.clone(), stats_live(bn)))


def test_callback_freezes_after_n_epochs() -> None:
    x, y = digits_tensors()
    rec = StatsPerEpoch()
    torch.manual_seed(0)
    trainer = quiet_trainer(
        max_epochs=4, accelerator="cpu", devices=1,
        callbacks=[QATCallback(start_epoch=1, freeze_bn_after=2, export_dir=None, verbose=False), rec],
    )
    lit = NetLit(digits_cnn(), lr=0.02, momentum=0.9, example=torch.zeros(1, 1, 8, 8))
    trainer.fit(lit, DataLoader(TensorDataset(x[:256], y[:256]), batch_size=32))
    (v0, _), (v1, live1), (v2, live2), (v3, live3) = rec.stats
    assert live1 and live2 and not live3  # live in QAT epochs 1 and 2, frozen at the start of epoch 3
    assert not torch.equal(v1, v0) and not torch.equal(v2, v1)  # statistics moved while live
    assert torch.equal(v3, v2)  # and not after
