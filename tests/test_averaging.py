"""Weight averaging composes with QAT (issue 19 item 1).

Lightning's StochasticWeightAveraging, EMAWeightAveraging, a user's callback around
``torch.optim.swa_utils.AveragedModel``, and a plain ``AveragedModel`` + ``update_bn`` without a
Trainer: the averaged model is a QAT model with the same plan, its folded BN statistics are the
frozen ones (never reset to mean 0 / var 1), its accuracy stays near the run without averaging,
and the export is made from the averaged weights. Tiny CNN on sklearn's 8x8 digits.
"""

from __future__ import annotations

import copy
import itertools

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn
from torch.utils.data import DataLoader

from lightning_ncnnqat import QATCallback, export, prepare_qat, restore_from_checkpoint
from lightning_ncnnqat.qat.bn_fold import is_folded
from lightning_ncnnqat.qat.modules import QATConv2d
from lightning_ncnnqat.qat.plan import get_plan
from lightning_ncnnqat.qat.plan_state import PLAN_KEY, same_plan
from lightning_ncnnqat.qat.prepared import input_quantizers, quantized_layers
from lit_models import NetLit, digits, digits_cnn, quiet_trainer

torch.set_num_threads(1)


TRAIN, VAL = digits(384, 128)


class Net(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, padding=1, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * c)
        self.fc = nn.Linear(2 * c * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


class Lit(NetLit):
    def __init__(self) -> None:
        super().__init__(Net(), lr=0.05, momentum=0.9, example=torch.zeros(1, 1, 8, 8), log_acc=True)


def accuracy(model: nn.Module) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        x, y = VAL.tensors
        acc = float((model(x).argmax(1) == y).float().mean())
    model.train(was)
    return acc


def bn_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}


class StatsAtQATStart(Callback):
    """The folded BN statistics at the end of the first QAT epoch (frozen from then on)."""

    def __init__(self) -> None:
        self.stats: dict[str, torch.Tensor] | None = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        if self.stats is None and get_plan(pl_module) is not None:
            self.stats = bn_stats(pl_module)


def fit(callbacks: list, tmp_path, epochs: int = 4, export_dir: str | None = None) -> tuple[Lit, QATCallback]:
    torch.manual_seed(0)
    model = Lit()
    qat = QATCallback(start_epoch=1, export_dir=export_dir, targets=["x86"], verbose=False)
    trainer = quiet_trainer(max_epochs=epochs, accelerator="cpu", devices=1, default_root_dir=str(tmp_path),
                            callbacks=[qat, *callbacks])
    trainer.fit(model, DataLoader(TRAIN, batch_size=32), DataLoader(VAL, batch_size=64))
    return model, qat


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Accuracy, folded statistics and weights of the same QAT run without averaging."""
    model, _ = fit([], tmp_path_factory.mktemp("base"))
    return accuracy(model), bn_stats(model), {k: v.clone() for k, v in model.state_dict().items()}


def _assert_frozen_stats(model: nn.Module, expected: dict[str, torch.Tensor], exact: bool = True) -> None:
    """Statistics as ``expected``: bit-equal, or (an EMA of equal values rounds) to float32 precision."""
    now = bn_stats(model)
    assert now.keys() == expected.keys() and now
    for k, v in now.items():
        assert torch.equal(v, expected[k]) if exact else torch.allclose(v, expected[k], rtol=1e-5, atol=1e-7), k
        if k.endswith("running_var"):
            assert not torch.allclose(v, torch.ones_like(v)), f"{k} was reset to 1"


def _assert_export_is_model(model: Lit, qat: QATCallback) -> None:
    """The export was made from ``model`` as it is now (the averaged weights): int8 follows it."""
    rep = qat.export_report
    assert rep is not None and rep.ok, rep.warnings
    assert rep.int8_vs_qat is not None and rep.int8_vs_qat.cosine > 0.999
    ranges = {n: float(q.running_absmax) for n, q in input_quantizers(model).items()}
    by_name = {lr.torch_name.removeprefix("net."): lr for lr in rep.layers}
    for name, r in ranges.items():
        assert by_name[name.removeprefix("net.")].input_scale == pytest.approx(127.0 / r, rel=1e-5)


def test_lightning_swa_keeps_the_fold_and_exports_the_average(tmp_path, baseline) -> None:
    base_acc, base_stats, base_state = baseline
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=3, annealing_epochs=1)
    stats = StatsAtQATStart()
    model, qat = fit([swa, stats], tmp_path, export_dir=str(tmp_path / "export"))
    # SWA's reset of every _BatchNorm (mean 0 / var 1) no longer reaches the folded ones
    assert stats.stats is not None
    _assert_frozen_stats(model, stats.stats)
    _assert_frozen_stats(model, base_stats)  # the same frozen statistics as without averaging
    assert all(is_folded(model.net.get_submodule(n)) for n in ("bn1", "bn2"))
    # SWA's copy is a QAT model of the same plan, and the model holds its averaged weights
    assert same_plan(get_plan(swa._average_model), get_plan(model))
    for a, b in zip(swa._average_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(model.state_dict()["net.conv2.weight"], base_state["net.conv2.weight"])
    assert accuracy(model) >= base_acc - 0.08
    _assert_export_is_model(model, qat)


def test_ema_weight_averaging_follows_the_plan(tmp_path, baseline) -> None:
    callbacks = pytest.importorskip("lightning.pytorch.callbacks")
    if not hasattr(callbacks, "EMAWeightAveraging"):
        pytest.skip("EMAWeightAveraging needs lightning >= 2.5")
    base_acc, base_stats, _ = baseline
    ema = callbacks.EMAWeightAveraging(decay=0.9)
    model, qat = fit([ema], tmp_path, epochs=3, export_dir=str(tmp_path / "export"))
    avg = ema._average_model.module
    assert same_plan(get_plan(avg), get_plan(model))
    assert isinstance(avg.net.conv1, QATConv2d) and is_folded(avg.net.bn1)
    # the average's ranges started from the model's first QAT step, never from the unset -1
    for name, q in input_quantizers(avg).items():
        assert float(q.running_absmax) > 0.05, name
    # on_train_end copied the average (parameters and buffers, in the same order) into the model
    for a, b in zip(itertools.chain(avg.parameters(), avg.buffers()),
                    itertools.chain(model.parameters(), model.buffers())):
        assert torch.equal(a, b)
    _assert_frozen_stats(model, base_stats, exact=False)  # buffers are averaged too (use_buffers=True)
    assert accuracy(model) >= base_acc - 0.08
    _assert_export_is_model(model, qat)


class AverageNet(Callback):
    """A user's averaging callback: an AveragedModel of the inner network, made at fit start
    (a float copy), updated after every step, copied into the model at the end."""

    def on_fit_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.avg = AveragedModel(pl_module.net, use_buffers=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.current_epoch >= 2:
            self.avg.update_parameters(pl_module.net)

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        for a, b in zip(itertools.chain(self.avg.module.parameters(), self.avg.module.buffers()),
                        itertools.chain(pl_module.net.parameters(), pl_module.net.buffers())):
            b.data.copy_(a.data)


def test_user_averaged_model_of_a_submodule(tmp_path, baseline) -> None:
    base_acc, base_stats, _ = baseline
    cb = AverageNet()
    model, qat = fit([cb], tmp_path, export_dir=str(tmp_path / "export"))
    sub = get_plan(cb.avg.module)
    assert sub is not None and set(sub.layers) == {n.removeprefix("net.") for n in get_plan(model).layers}
    assert sub.layers["conv2"].bn == "bn2"
    _assert_frozen_stats(model, base_stats, exact=False)
    assert accuracy(model) >= base_acc - 0.08
    _assert_export_is_model(model, qat)


def test_averaged_model_and_update_bn_without_trainer(tmp_path) -> None:
    torch.manual_seed(0)
    net = Net()
    x, y = TRAIN.tensors
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):  # float epochs
        for i in range(0, len(x), 32):
            opt.zero_grad()
            F.cross_entropy(net(x[i:i + 32]), y[i:i + 32]).backward()
            opt.step()
    plan = prepare_qat(net, x[:1])
    frozen = bn_stats(net)
    avg = None
    for epoch in range(3):
        for i in range(0, len(x), 32):
            opt.zero_grad()
            F.cross_entropy(net(x[i:i + 32]), y[i:i + 32]).backward()
            opt.step()
            if epoch >= 1:
                avg = AveragedModel(net) if avg is None else avg  # a deep copy of the QAT model
                avg.update_parameters(net)
    assert avg is not None
    update_bn(DataLoader(TRAIN, batch_size=64), avg)  # resets and re-estimates every _BatchNorm
    m = avg.module
    # the deep copy is a QAT model of its own: plan, classes, fold links and quantizers its own
    assert same_plan(get_plan(m), plan)
    assert m.conv1.folded_bn is m.bn1 and m.conv1.folded_bn is not net.bn1
    assert m.conv1.input_quantizer is not net.conv1.input_quantizer
    _assert_frozen_stats(m, frozen)
    net.eval()
    assert accuracy(m) >= accuracy(net) - 0.08
    # the export is made from the averaged weights: its layers' folded weights are the average's
    infos = {i.name: i for i in quantized_layers(m)}
    with torch.no_grad():
        w, _ = m.conv2.folded_weight_bias()
    assert torch.equal(infos["conv2"].weight, w.float())
    assert not torch.equal(w, net.conv2.folded_weight_bias()[0])
    rep = export(m, tmp_path / "avg", example_input=x[:1], held_batch=x[:32], targets=["x86"], verbose=False)
    assert rep.ok and rep.int8_vs_qat is not None and rep.int8_vs_qat.cosine > 0.999
    copy.deepcopy(m)  # a copy of the copy still works (export made one already)


@pytest.mark.parametrize("kind", ["swa", "ema"])
def test_resume_from_a_qat_checkpoint_with_an_averaging_callback(tmp_path, kind) -> None:
    """A checkpoint saved during QAT holds the averaging callback's copy with QAT keys; on resume
    the copy (a float deepcopy made in setup) takes the plan before the callback loads it."""
    callbacks = pytest.importorskip("lightning.pytorch.callbacks")
    if kind == "ema" and not hasattr(callbacks, "EMAWeightAveraging"):
        pytest.skip("EMAWeightAveraging needs lightning >= 2.5")

    def averaging() -> Callback:
        if kind == "swa":
            return StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=2, annealing_epochs=1)
        return callbacks.EMAWeightAveraging(decay=0.9)

    def run(epochs: int, ckpt: str | None) -> tuple[Lit, Callback, L.Trainer]:
        torch.manual_seed(0)
        model, avg = Lit(), averaging()
        trainer = quiet_trainer(
            max_epochs=epochs, accelerator="cpu", devices=1, enable_checkpointing=True,
            default_root_dir=str(tmp_path), num_sanity_val_steps=0,
            callbacks=[QATCallback(start_epoch=1, export_dir=None, verbose=False), avg,
                       callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)],
        )
        trainer.fit(model, DataLoader(TRAIN, batch_size=32), DataLoader(VAL, batch_size=64), ckpt_path=ckpt)
        return model, avg, trainer

    run(3, None)
    model, avg, trainer = run(4, str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.current_epoch == 4 and get_plan(model) is not None
    copy_ = avg._average_model.module if kind == "ema" else avg._average_model
    assert same_plan(get_plan(copy_), get_plan(model))
    assert accuracy(model) > 0.5


def test_swa_window_that_averages_pre_qat_weights_is_warned_about(tmp_path) -> None:
    """SWA from epoch 1 (swa_epoch_start=2) averages the weights QAT starts from (start_epoch=1)."""
    from lightning_ncnnqat.callbacks._averaging import averaging_window_warnings

    def trainer(swa: StochasticWeightAveraging, epochs: int = 4) -> L.Trainer:
        return L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, callbacks=[swa],
                         default_root_dir=str(tmp_path), enable_progress_bar=False)

    (line,) = averaging_window_warnings(trainer(StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=2)), 1)
    assert "swa_epoch_start=2" in line and "start_epoch=1" in line and ">= 3" in line
    assert averaging_window_warnings(trainer(StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=3)), 1) == []
    # a float is a fraction of max_epochs: 0.5 of 8 epochs starts averaging at epoch 3
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=0.5)
    assert averaging_window_warnings(trainer(swa, 8), 3) and not averaging_window_warnings(trainer(swa, 8), 2)


def test_only_averaged_copies_follow_the_plan() -> None:
    """A callback's other model of the same class (a distillation teacher) stays float; an
    AveragedModel under any name and a bare copy named as an average follow."""
    from types import SimpleNamespace

    from lightning_ncnnqat.callbacks._averaging import AveragedCopies

    torch.manual_seed(0)
    model = Lit()
    float_copy = copy.deepcopy(model)
    cb = SimpleNamespace(teacher=copy.deepcopy(model), ema_model=copy.deepcopy(model), slow=AveragedModel(model.net))
    prepare_qat(model, model.example_input_array)
    where = AveragedCopies().follow(SimpleNamespace(callbacks=[cb]), model, None, sync=True)
    assert sorted(where) == ["SimpleNamespace.ema_model", "SimpleNamespace.slow"]
    assert get_plan(cb.teacher) is None and get_plan(cb.ema_model) is not None
    assert get_plan(cb.slow.module) is not None and isinstance(cb.slow.module.conv1, QATConv2d)
    # the copies keep their own parameters (the average), and take the model's folded statistics
    assert torch.equal(cb.ema_model.net.conv1.weight, float_copy.net.conv1.weight)
    assert torch.equal(cb.ema_model.net.bn1.inv_std, model.net.bn1.inv_std)


class DeepcopyEma(Callback):
    """A user's EMA callback (timm ``ModelEmaV2`` logic): a deep copy of ``pl_module.net`` (or of
    the whole LightningModule with ``whole``) made at fit start (a float model), updated by zipping
    the two state dicts' values, loaded back with ``load_state_dict`` at train end."""

    def __init__(self, whole: bool = False, decay: float = 0.9) -> None:
        self.whole, self.decay = whole, decay

    def _src(self, pl_module: L.LightningModule) -> nn.Module:
        return pl_module if self.whole else pl_module.net

    def on_fit_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.ema = copy.deepcopy(self._src(pl_module)).eval()

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        mine, theirs = self.ema.state_dict(), self._src(pl_module).state_dict()
        assert list(mine) == list(theirs)  # the same layout: zipping the values pairs the same tensors
        for e, m in zip(mine.values(), theirs.values()):
            e.copy_(self.decay * e + (1.0 - self.decay) * m if e.is_floating_point() else m)

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._src(pl_module).load_state_dict(self.ema.state_dict())


@pytest.mark.parametrize("whole", [False, True], ids=["net", "lightning_module"])
def test_user_deepcopy_ema_has_the_keys_of_what_it_copies(tmp_path, baseline, whole) -> None:
    """A copy of ``pl_module.net`` has net's keys (no plan entry at its root: the model's entry
    is at the model's root); a copy of the whole LightningModule keeps the entry; both load back."""
    base_acc, base_stats, _ = baseline
    cb = DeepcopyEma(whole=whole)
    model, qat = fit([cb], tmp_path, epochs=3, export_dir=str(tmp_path / "export"))
    src = model if whole else model.net
    assert list(cb.ema.state_dict()) == list(src.state_dict())
    assert any(k.endswith(PLAN_KEY) for k in cb.ema.state_dict()) == whole
    assert PLAN_KEY in model.state_dict()  # the model's own entry is unchanged
    assert isinstance(get_plan(cb.ema).layers, dict) and len(get_plan(cb.ema).layers) == len(get_plan(model).layers)
    for k, v in cb.ema.state_dict().items():  # train end loaded the EMA into the model
        assert torch.equal(v, src.state_dict()[k]), k
    _assert_frozen_stats(model, base_stats, exact=False)
    assert accuracy(model) >= base_acc - 0.1
    _assert_export_is_model(model, qat)


class TimmEma(nn.Module):
    """timm ``ModelEmaV3`` logic: a deep copy, lerped parameters, copied buffers (zipped in order)."""

    def __init__(self, model: nn.Module, decay: float = 0.9) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        torch._foreach_lerp_(list(self.module.parameters()), list(model.parameters()), 1.0 - self.decay)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)


class LitInnerEma(NetLit):
    """The EMA held inside the LightningModule (never called by forward): ``timm`` style as
    ``self.ema``, or an ``AveragedModel`` under a neutral name; validation and train end use it."""

    def __init__(self, kind: str) -> None:
        torch.manual_seed(0)
        super().__init__(digits_cnn(), lr=0.05, momentum=0.9, example=torch.zeros(1, 1, 8, 8), log_acc=True)
        self.kind = kind
        if kind == "timm":
            self.ema = TimmEma(self.net)
        else:
            self.slow = AveragedModel(self.net, use_buffers=True)

    def averaged(self) -> nn.Module:
        return self.ema.module if self.kind == "timm" else self.slow.module

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if self.kind == "timm":
            self.ema.update(self.net)
        else:
            self.slow.update_parameters(self.net)

    def on_train_end(self) -> None:
        self.net.load_state_dict(self.averaged().state_dict())


@pytest.mark.parametrize("kind", ["timm", "averaged_model"])
def test_average_inside_the_lightning_module_follows_the_plan(tmp_path, kind) -> None:
    model = LitInnerEma(kind)
    qat = QATCallback(start_epoch=1, export_dir=str(tmp_path / "export"), targets=["x86"], verbose=False)
    trainer = quiet_trainer(max_epochs=3, accelerator="cpu", devices=1, default_root_dir=str(tmp_path), callbacks=[qat])
    trainer.fit(model, DataLoader(TRAIN, batch_size=32), DataLoader(VAL, batch_size=64))
    plan, avg = get_plan(model), model.averaged()
    # the plan is traced from forward: the average's own layers are not the model's
    assert plan is not None and plan.layers and all(n.startswith("net.") for n in plan.layers)
    sub = get_plan(avg)
    assert sub is not None and set(sub.layers) == {n.removeprefix("net.") for n in plan.layers}
    assert isinstance(avg[0], QATConv2d) and is_folded(avg[1])
    for name, q in input_quantizers(avg).items():
        assert float(q.running_absmax) > 0.05, name
    # one plan entry, at the model's root; the average's keys are net's
    assert [k for k in model.state_dict() if k.endswith(PLAN_KEY)] == [PLAN_KEY]
    assert list(avg.state_dict()) == list(model.net.state_dict())
    for k, v in avg.state_dict().items():
        assert torch.equal(v, model.net.state_dict()[k]), k
    assert accuracy(model) >= 0.7
    _assert_export_is_model(model, qat)
    # a fresh (float) model restores the state: the average inside it takes the plan first
    fresh = LitInnerEma(kind)
    restore_from_checkpoint(fresh, model.state_dict())
    assert same_plan(get_plan(fresh.averaged()), sub)
    state = fresh.state_dict()
    assert list(state) == list(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("kind", ["timm", "averaged_model"])
def test_prepare_qat_without_trainer_makes_the_inner_average_follow(kind) -> None:
    """``prepare_qat`` is the same QAT start: an average inside the model takes the plan, and
    timm's zipped update pairs the same tensors (it crashed on a misaligned buffer before)."""
    model = LitInnerEma(kind)
    prepare_qat(model, model.example_input_array)
    avg = model.averaged()
    sub = get_plan(avg)
    assert sub is not None and set(sub.layers) == {n.removeprefix("net.") for n in get_plan(model).layers}
    assert [k for k in model.state_dict() if k.endswith(PLAN_KEY)] == [PLAN_KEY]
    assert [tuple(b.shape) for b in avg.buffers()] == [tuple(b.shape) for b in model.net.buffers()]
    x = TRAIN.tensors[0][:32]
    model.train()
    model(x)  # the model's ranges and BN statistics move
    model.on_train_batch_end(None, None, 0)
    # the first update copies (AveragedModel) or lerps from equal weights and copies buffers (timm)
    assert torch.allclose(avg(x), model.net.eval()(x), atol=1e-5)
