"""Weights that become computed (or stop being computed) after QAT converted the layers.

Lightning's ``ModelPruning(apply_pruning=lambda epoch: epoch >= k)`` adds prune's pre-hooks after
QAT started; a user may register a parametrization or make pruning permanent there too. QAT must
quantize the weight the layer computes with, train its sources, export it, follow the change in
the plan's notes, and let the folded BN statistics follow the changed weight
(``callbacks/_computed_watch.py``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

from lightning_ncnnqat import prepare_qat
from lightning_ncnnqat.qat.bn_fold import stats_live
from lightning_ncnnqat.callbacks._computed_watch import ComputedWatch
from lightning_ncnnqat.ops import fake_quantize_per_channel
from lightning_ncnnqat.qat.prepared import folded_float_model
from lightning_ncnnqat.qat.prepare import unprepare

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


class Half(nn.Module):
    """A user parametrization: the layer computes with half of its stored weight."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 0.5 * w


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c2(torch.relu(self.bn(self.c1(x))))).mean((2, 3)))


def _steps(m: nn.Module, x: torch.Tensor, n: int) -> None:
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    m.train()
    for _ in range(n):
        loss = F.mse_loss(m(x), torch.ones(len(x), 5))
        opt.zero_grad()
        loss.backward()
        opt.step()


def _change(kind: str, layer: nn.Module) -> None:
    if kind == "prune":
        prune.l1_unstructured(layer, "weight", amount=0.5)
    elif kind == "parametrization":
        parametrize.register_parametrization(layer, "weight", Half())
    elif kind == "weight_norm":
        parametrizations.weight_norm(layer)


def _effective(kind: str, layer: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        if kind == "prune":
            return layer.weight_orig * layer.weight_mask
        if kind == "parametrization":
            return 0.5 * layer.parametrizations.weight.original
        if kind == "weight_norm":
            g, v = layer.parametrizations.weight.original0, layer.parametrizations.weight.original1
            return g * v / v.flatten(1).norm(dim=1).reshape(-1, *[1] * (v.dim() - 1))
        return layer.weight.detach().clone()


KINDS = ["prune", "parametrization", "weight_norm", "prune_removed"]


@pytest.mark.parametrize("kind", KINDS)
def test_change_after_start_is_quantized_trained_exported_and_noted(kind: str) -> None:
    torch.manual_seed(0)
    m = Net()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    plan = prepare_qat(m, x[:2])
    _steps(m, x, 2)
    watch = ComputedWatch(m, plan)
    for layer in (m.fc, m.c1):  # c1: the layer with the folded BN
        _change(kind.replace("_removed", ""), layer)
    assert watch.changed(m, plan) == {"c1": True, "fc": True}  # computed now: values may have changed
    if kind == "prune_removed":  # made permanent at a later look: a change that keeps the values
        assert "computed weight by" in plan.notes["fc"]
        _steps(m, x, 1)
        for layer in (m.fc, m.c1):
            prune.remove(layer, "weight")
        assert watch.changed(m, plan) == {"c1": False, "fc": False}
    assert not watch.changed(m, plan)  # seen now
    if kind == "prune_removed":
        assert "fc" not in plan.notes
    else:
        assert "changed after QAT started" in plan.notes["fc"] and "computed weight by" in plan.notes["c1"]
    _steps(m, x, 2)
    m.eval()
    m(x[:2])  # recomputes a hook-computed weight from the trained sources
    want = _effective(kind, m.fc)
    wq, _ = m.fc.quantized_weight_bias()
    torch.testing.assert_close(wq.detach(), fake_quantize_per_channel(want, m.fc.weight_groups, m.fc.weight_bits)[0])
    if kind == "prune_removed":  # a plain Parameter again, trained since (no mask keeps the zeros)
        assert isinstance(m.c1.weight, nn.Parameter) and not m.c1._forward_pre_hooks
        assert not hasattr(folded_float_model(m).c1, "weight_orig")
    elif kind == "prune":
        mask = m.c1.weight_mask
        assert float((mask == 0).float().mean()) >= 0.5
        folded = folded_float_model(m)
        assert bool((folded.c1.weight[mask == 0] == 0).all())  # the export writes the pruned weight
    else:
        folded = folded_float_model(m)
        torch.testing.assert_close(folded.fc.weight, want)
        assert not parametrize.is_parametrized(folded.fc)


@pytest.mark.parametrize("amount", [0.3, 0.6])
def test_pruning_made_permanent_between_two_looks_is_seen(amount: float) -> None:
    """prune + prune.remove between two looks leaves the same hooks (none) and Parameter: the
    weight's zeros tell; a further pruning of an already pruned-and-removed weight too."""
    torch.manual_seed(0)
    m = Net()
    x = torch.randn(8, 3, 8, 8)
    plan = prepare_qat(m, x[:2])
    _steps(m, x, 1)
    watch = ComputedWatch(m, plan)
    for _ in range(2):
        prune.l1_unstructured(m.c1, "weight", amount=amount)
        prune.remove(m.c1, "weight")
        assert watch.changed(m, plan) == {"c1": True}
        _steps(m, x, 1)  # no exact zeros from training
        assert not watch.changed(m, plan)


@pytest.mark.parametrize("kind", ["parametrization", "weight_norm"])
def test_unprepare_keeps_a_parametrization_added_under_qat(kind: str) -> None:
    torch.manual_seed(0)
    m = Net()
    x = torch.randn(4, 3, 8, 8)
    prepare_qat(m, x[:2])
    _change(kind, m.c2)
    _steps(m, x, 1)
    unprepare(m)
    assert parametrize.is_parametrized(m.c2) and isinstance(m.c2, nn.Conv2d)
    assert not hasattr(m.c2, "input_quantizer")
    torch.testing.assert_close(m.c2.weight, _effective(kind, m.c2))
    m.eval()
    with torch.no_grad():
        want = F.conv2d(torch.relu(m.bn(m.c1(x))), _effective(kind, m.c2), m.c2.bias, padding=1)
    torch.testing.assert_close(m.c2(torch.relu(m.bn(m.c1(x)))), want)


def test_unprepare_after_parametrization_removed_under_qat() -> None:
    torch.manual_seed(0)
    m = Net()
    parametrizations.weight_norm(m.c2)  # before QAT
    x = torch.randn(4, 3, 8, 8)
    prepare_qat(m, x[:2])
    _steps(m, x, 1)
    parametrize.remove_parametrizations(m.c2, "weight")  # made permanent under QAT
    _steps(m, x, 1)
    unprepare(m)
    assert type(m.c2) is nn.Conv2d and isinstance(m.c2.weight, nn.Parameter)
    assert m(x).shape == (4, 5)


def _lit_fit(tmp_path, apply_pruning, epochs: int = 3, permanent: bool = True):  # noqa: ANN001, ANN202
    from lightning.pytorch.callbacks import Callback, ModelPruning

    from lightning_ncnnqat import QATCallback
    from lit_models import NetLit, quiet_trainer

    class Spy(Callback):
        """BN statistics at each epoch start, and whether they train in that epoch."""

        def __init__(self) -> None:
            self.var: list[torch.Tensor] = []
            self.live: list[bool] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            self.var.append(pl_module.net.bn.running_var.clone())
            self.live.append(stats_live(pl_module.net.bn))

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 3, 8, 8, generator=g), torch.randn(32, 5, generator=g))
    torch.manual_seed(0)
    lit, spy = NetLit(Net(), lr=0.05, loss=F.mse_loss, example=torch.randn(2, 3, 8, 8)), Spy()
    cb = QATCallback(start_epoch=0, export_dir=None, verbose=False)
    pruning = ModelPruning("l1_unstructured", amount=0.5, apply_pruning=apply_pruning,
                           parameters_to_prune=[(lit.net.c1, "weight"), (lit.net.fc, "weight")], verbose=0,
                           make_pruning_permanent=permanent)
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[cb, pruning, spy], limit_val_batches=0)
    trainer.fit(lit, torch.utils.data.DataLoader(data, batch_size=8))
    return lit, spy, cb


@pytest.mark.parametrize("first", [0, 1])
def test_model_pruning_after_start_lets_folded_statistics_follow(tmp_path, first: int) -> None:  # noqa: ANN001
    """ModelPruning first prunes at the end of epoch ``first`` (QAT started at epoch 0, statistics
    frozen at once): in the next epoch the folded statistics of the pruned conv train, then freeze."""
    lit, spy, cb = _lit_fit(tmp_path, lambda e: e == first, epochs=first + 3, permanent=False)
    live = spy.live
    assert live[first + 1] and not live[first + 2] and not any(live[: first + 1]), live
    assert not torch.equal(spy.var[first + 1], spy.var[first + 2])  # they moved in the epoch after pruning
    assert torch.equal(spy.var[first + 2], lit.net.bn.running_var)  # then frozen
    assert "changed after QAT started" in cb.plan.notes["net.c1"]


@pytest.mark.parametrize("permanent", [True, False])
def test_model_pruning_at_the_last_epoch_end_warns(tmp_path, permanent: bool) -> None:  # noqa: ANN001
    """Pruned at the last epoch end (made permanent at train end, or not): no epoch follows, the
    fit end says the folded statistics predate it; pruned earlier: no such warning."""
    with pytest.warns(UserWarning, match="predate"):
        _lit_fit(tmp_path, lambda e: e == 1, epochs=2, permanent=permanent)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _lit_fit(tmp_path, lambda e: e == 0, epochs=2, permanent=permanent)
    assert not [w for w in seen if "predate" in str(w.message)]
