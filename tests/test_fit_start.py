"""What QATCallback knows when fit starts is refused (or warned) then, never after training:
an unreachable ``start_epoch``, ``fast_dev_run``, a held batch the model cannot take, options
whose preflight needs state the first step creates, and one-line errors."""

from __future__ import annotations

import json
import os
import warnings

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ncnnqat import QATCallback
from lightning_ncnnqat.errors import ConfigError
from lightning_ncnnqat.qat.plan import get_plan
from test_precision import LitTiny, TinyNet, _loaders, _trainer


def _data(n: int, size: int = 8, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    return TensorDataset(torch.randn(n, 1, size, size, generator=g) + (y.float()[:, None, None, None] - 1.5) / 2, y)


# ---- whether QAT starts at all -------------------------------------------------------------


@pytest.mark.parametrize(
    "start_epoch, trainer_kw, n_train, shown",
    [
        (1, dict(max_steps=4), 64, "`max_steps`=4"),  # 4 batches an epoch: epoch 1 starts at step 4
        (3, dict(max_steps=5, limit_train_batches=2), 64, "`limit_train_batches`=2"),
        (2, dict(max_steps=3, accumulate_grad_batches=2), 64, "`accumulate_grad_batches`=2"),
        (2, dict(max_steps=2, overfit_batches=1), 64, "`overfit_batches`=1"),
        (5, dict(max_steps=7, max_epochs=-1), 48, "`max_steps`=7"),  # 3 batches an epoch
    ],
)
def test_unreachable_start_epoch_refused_before_the_first_step(tmp_path, start_epoch, trainer_kw, n_train, shown) -> None:  # noqa: ANN001,E501
    m = LitTiny()
    cb = QATCallback(start_epoch=start_epoch, export_dir=None, verbose=False)
    t = _trainer(tmp_path, callbacks=[cb], **{"max_epochs": None, **trainer_kw})
    with pytest.raises(ConfigError) as info:
        t.fit(m, DataLoader(_data(n_train), batch_size=16))
    msg = str(info.value)
    assert "\n" not in msg and f"`start_epoch`={start_epoch}" in msg and shown in msg
    assert f"`max_steps`={trainer_kw['max_steps']}" in msg and info.value.argument == "start_epoch"
    assert m.steps == 0 and t.global_step == 0 and get_plan(m) is None


@pytest.mark.parametrize("name, value", [("max_steps", 0), ("limit_train_batches", 0), ("limit_train_batches", 0.0)])
def test_fit_without_training_steps_refused_in_setup(tmp_path, name, value) -> None:  # noqa: ANN001
    m = LitTiny()
    t = _trainer(tmp_path, callbacks=[QATCallback(start_epoch=0, export_dir=None, verbose=False)], **{name: value})
    with pytest.raises(ConfigError, match=rf"^QATCallback: the Trainer's `{name}`={value!r} runs no training step"):
        t.fit(m, DataLoader(_data(32), batch_size=16))
    assert m.steps == 0


@pytest.mark.parametrize("start_epoch, trainer_kw", [(1, dict(max_steps=5)), (2, dict(max_steps=5, limit_train_batches=2))])
def test_reachable_start_epoch_under_max_steps_starts_qat(tmp_path, start_epoch, trainer_kw) -> None:  # noqa: ANN001
    m = LitTiny()
    cb = QATCallback(start_epoch=start_epoch, export_dir=None, verbose=False)
    t = _trainer(tmp_path, callbacks=[cb], **{"max_epochs": None, **trainer_kw})
    t.fit(m, DataLoader(_data(64), batch_size=16))
    assert cb.active and t.global_step == 5


def test_max_time_warns_at_fit_start(tmp_path) -> None:  # noqa: ANN001
    m = LitTiny()
    cb = QATCallback(start_epoch=1, export_dir=None, verbose=False)
    t = _trainer(tmp_path, callbacks=[cb], max_epochs=2, max_time={"seconds": 600})
    with pytest.warns(UserWarning, match=r"`max_time`=600.0 may end fit before `start_epoch`=1") as rec:
        t.fit(m, DataLoader(_data(32), batch_size=16))
    assert cb.active
    assert sum("max_time" in str(w.message) for w in rec) == 1


# ---- fast_dev_run: QAT runs at once, nothing is written to export_dir ---------------------


@pytest.mark.parametrize("fast_dev_run, example, existing", [(True, True, True), (2, False, False)])
def test_fast_dev_run_exercises_qat_and_never_touches_export_dir(tmp_path, fast_dev_run, example, existing) -> None:  # noqa: ANN001,E501
    tr, va = _loaders()
    export_dir = tmp_path / "export"
    if existing:  # a real export from an earlier run must survive a debug run
        export_dir.mkdir()
        (export_dir / "model.int8.param").write_text("the real export")
    m = LitTiny(example)
    cb = QATCallback(start_epoch=5, export_dir=str(export_dir), targets=["x86"], verbose=False)
    t = _trainer(tmp_path, callbacks=[cb], max_epochs=10, fast_dev_run=fast_dev_run)
    t.fit(m, tr, va)  # not refused for a `max_epochs=1` the user never set
    assert cb.active and m.steps == int(fast_dev_run)  # QAT from the first batch, whatever start_epoch
    assert cb.export_report is not None and cb.export_report.ok  # the whole export chain ran
    if existing:
        assert os.listdir(export_dir) == ["model.int8.param"]
        assert (export_dir / "model.int8.param").read_text() == "the real export"
    else:
        assert not export_dir.exists()


# ---- the held batch the export compares on --------------------------------------------------


class Generator(L.LightningModule):
    """A GAN-style generator under manual optimization: forward takes a noise vector [N, 16];
    the loaders hold images [N, 1, 8, 8] (the discriminator's real samples)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 64))
        self.disc = TinyNet()
        self.example_input_array = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.gen(z).reshape(-1, 1, 8, 8)

    def training_step(self, batch, batch_idx) -> None:  # noqa: ANN001
        opt_g, opt_d = self.optimizers()
        x, _ = batch
        fake = self(torch.randn(len(x), 16))
        d_loss = F.softplus(-self.disc(x)[:, 0]).mean() + F.softplus(self.disc(fake.detach())[:, 0]).mean()
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = F.softplus(-self.disc(fake)[:, 0]).mean()
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()

    def validation_step(self, batch, batch_idx) -> None:  # noqa: ANN001
        self.log("d_real", self.disc(batch[0])[:, 0].mean())

    def configure_optimizers(self):  # noqa: ANN201
        return [torch.optim.Adam(self.gen.parameters(), 1e-3), torch.optim.Adam(self.disc.parameters(), 1e-3)]


def test_manual_optimization_held_batch_that_does_not_fit_warns_at_fit_start(tmp_path) -> None:  # noqa: ANN001
    tr, va = _loaders()
    m = Generator()
    cb = QATCallback(start_epoch=1, export_dir="export", targets=["x86"], verbose=False, skip=["disc.*"])
    seen: list[int] = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            seen.append(trainer.global_step)

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _trainer(tmp_path, callbacks=[cb, Spy()], num_sanity_val_steps=0).fit(m, tr, va)
    held = [str(w.message) for w in rec if "no dataloader holds inputs the model takes" in str(w.message)]
    assert len(held) == 1 and "validation batches' inputs" in held[0] and "[16, 1, 8, 8]" in held[0]
    report = json.loads((tmp_path / "export" / "report.json").read_text())
    assert report["ok"], report.get("failures")  # no failure after training
    assert report["held_batch"]["source"].startswith("example input")


class CropModel(LitTiny):
    """Trained on 8x8 inputs, validated on 6x6 crops it cannot take in this export's shape."""

    def validation_step(self, batch, batch_idx) -> None:  # noqa: ANN001
        self.log("mean", batch[0].mean())


def test_held_batch_falls_back_to_training_loader_when_validation_does_not_fit(tmp_path) -> None:  # noqa: ANN001
    tr, _ = _loaders()
    va = DataLoader(_data(32, size=6), batch_size=16)
    m = CropModel()
    cb = QATCallback(start_epoch=1, export_dir="export", targets=["x86"], verbose=False, preflight=False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _trainer(tmp_path, callbacks=[cb]).fit(m, tr, va)
    assert not [w for w in rec if "no dataloader holds inputs" in str(w.message)]
    report = json.loads((tmp_path / "export" / "report.json").read_text())
    assert report["ok"] and report["held_batch"] == {"source": "first 32 inputs of the training dataloader", "n": 32}


# ---- options whose preflight needs state the first training step creates -------------------


@pytest.mark.parametrize(
    "kw, start_epoch",
    [
        (dict(ranges="learned"), 0),  # range_init="first_batch": no step has initialised a threshold yet
        (dict(ranges="fixed"), 1),  # after a float epoch; thresholds that no step moves
    ],
)
def test_preflight_sets_ranges_from_real_inputs_not_a_zero_example(tmp_path, kw, start_epoch) -> None:  # noqa: ANN001
    tr, va = _loaders()
    m = LitTiny()
    m.example_input_array = torch.zeros(1, 1, 8, 8)  # the common all-zero example: no threshold starts from it
    cb = QATCallback(start_epoch=start_epoch, export_dir="export", targets=["x86"], verbose=False, **kw)
    _trainer(tmp_path, callbacks=[cb]).fit(m, tr, va)
    report = json.loads((tmp_path / "export" / "report.json").read_text())
    assert report["ok"], report.get("failures")


# ---- one-line errors -----------------------------------------------------------------------


@pytest.mark.parametrize("make_bad", ["file_in_path", "read_only"])
def test_unwritable_export_dir_is_one_line_naming_the_argument(tmp_path, make_bad) -> None:  # noqa: ANN001
    if make_bad == "file_in_path":
        (tmp_path / "a_file").write_text("x")
        bad = tmp_path / "a_file" / "export"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        bad = ro / "export"
    m = LitTiny()
    t = _trainer(tmp_path, callbacks=[QATCallback(export_dir=str(bad), targets=["x86"], verbose=False)])
    with pytest.raises(ConfigError) as info:
        t.fit(m, DataLoader(_data(32), batch_size=16))
    e = info.value
    assert "\n" not in str(e) and str(e).startswith(f"`export_dir`={str(bad)!r}: cannot be written")
    assert e.argument == "export_dir" and e.value == str(bad)
    assert e.__cause__ is None and e.__suppress_context__  # no chained OSError traceback
    assert m.steps == 0


class TwoInputs(LitTiny):
    """forward(x, mask): two required inputs; a calibrated start reads one tensor per batch."""

    def __init__(self) -> None:
        super().__init__(example=False)
        self.example_input_array = (torch.randn(1, 1, 8, 8), torch.ones(1, 1, 8, 8))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.net(x * mask)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        self.steps += 1
        x, y = batch
        return F.cross_entropy(self(x, torch.ones_like(x)), y)


@pytest.mark.parametrize("range_init", ["aciq", "kl"])
def test_calibrated_start_on_two_inputs_is_one_line_at_fit_start(tmp_path, range_init) -> None:  # noqa: ANN001
    m = TwoInputs()
    cb = QATCallback(start_epoch=1, export_dir=None, verbose=False, range_init=range_init)
    with pytest.raises(ConfigError) as info:
        _trainer(tmp_path, callbacks=[cb]).fit(m, DataLoader(_data(32), batch_size=16))
    e = info.value
    assert "\n" not in str(e) and f"range_init={range_init!r}" in str(e) and "forward takes 2 (x, mask)" in str(e)
    assert e.argument == "range_init" and e.value == range_init and e.__cause__ is None and m.steps == 0
