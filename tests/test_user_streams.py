"""The callback leaves the user's run as it was up to QAT (the same shuffled batches with and
without it), and an example the model cannot take stops the run when fit starts."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_ncnnqat import ConfigError, QATCallback, QATConfig, prepare_qat
from lightning_ncnnqat.qat.plan import get_plan
from lit_models import NetLit, digits, digits_cnn, quiet_trainer


class FirstLabels(L.Callback):
    """Records the labels of every epoch's first training batch (the shuffle order)."""

    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if batch_idx == 0:
            self.seen.append(batch[1][:12].tolist())


def _orders(tmp_path: Path, qat: QATCallback | None) -> list[list[int]]:
    torch.manual_seed(0)
    tr, va = digits(256, 64)
    model = NetLit(digits_cnn(), lr=0.02, example=tr.tensors[0][:1])
    rec = FirstLabels()
    trainer = quiet_trainer(max_epochs=3, callbacks=[rec] + ([qat] if qat else []), default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(tr, batch_size=32, shuffle=True), DataLoader(va, batch_size=32, shuffle=True))
    return rec.seen


@pytest.mark.parametrize("kw", [
    {},  # held-batch check at fit start, the export preflight at QAT start
    {"range_init": "aciq", "calibration_batches": 2},  # and a calibrated start reading training batches
])
def test_the_callback_leaves_the_shuffle_order_as_it_was(tmp_path: Path, kw: dict) -> None:
    plain = _orders(tmp_path / "plain", None)
    qat = _orders(tmp_path / "qat", QATCallback(start_epoch=1, export_dir=str(tmp_path / "export"), targets=["x86"],
                                                 verbose=False, **kw))
    assert len(plain) == 3 and len(set(map(tuple, plain))) == 3  # three different shuffles
    assert qat == plain


@pytest.mark.parametrize("where", ["example_input", "example_input_array"])
def test_an_example_the_model_cannot_take_is_refused_at_fit_start(tmp_path: Path, where: str) -> None:
    tr, va = digits(64, 32)
    wrong = torch.randn(1, 3, 8, 8)  # the model reads 1 channel
    model = NetLit(digits_cnn(), example=wrong if where == "example_input_array" else tr.tensors[0][:1])
    cb = QATCallback(start_epoch=1, export_dir=str(tmp_path / "export"), targets=["x86"], verbose=False,
                     example_input=wrong if where == "example_input" else None)
    trainer = quiet_trainer(max_epochs=2, callbacks=[cb], default_root_dir=tmp_path)
    with pytest.raises(ConfigError) as err:
        trainer.fit(model, DataLoader(tr, batch_size=32), DataLoader(va, batch_size=32))
    msg = str(err.value)
    assert trainer.global_step == 0 and "\n" not in msg
    assert f"`{where}`" in msg and "(1, 3, 8, 8) float32" in msg and "channels" in msg
    assert err.value.argument == where
    assert all(m.training for m in model.modules())  # the probe left the training flags as they were


@pytest.mark.parametrize("skip", [["backbone.*"], ["net.0", "nett.*"], ["net.9"]])
def test_a_skip_pattern_that_matches_nothing_is_named(skip: list[str]) -> None:
    """A typo in `skip` would leave in int8 the layers the user meant to keep float."""
    model = NetLit(digits_cnn())
    with pytest.raises(ConfigError, match=r"`skip` pattern") as err:
        prepare_qat(model, torch.randn(1, 1, 8, 8), QATConfig(skip=tuple(skip)))
    bad = [p for p in skip if p != "net.0"]
    assert err.value.value == bad and all(repr(p) in str(err.value) for p in bad)
    assert get_plan(model) is None  # nothing was changed


def test_a_skip_pattern_that_matches_nothing_stops_fit_before_the_first_step(tmp_path: Path) -> None:
    tr, va = digits(64, 32)
    model = NetLit(digits_cnn(), example=tr.tensors[0][:1])
    cb = QATCallback(start_epoch=1, export_dir=None, verbose=False, skip=["head.*"])
    trainer = quiet_trainer(max_epochs=2, callbacks=[cb], default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"QATCallback: `skip` pattern\(s\) \['head\.\*'\] match no module"):
        trainer.fit(model, DataLoader(tr, batch_size=32), DataLoader(va, batch_size=32))
    assert trainer.global_step == 0
    plan = prepare_qat(model, tr.tensors[0][:1], QATConfig(skip=("net.7",)))  # an existing name is taken (the Linear)
    assert "net.7" in plan.float_layers and "skip" in plan.float_layers["net.7"]


def test_parity_on_the_example_alone_is_warned_about(tmp_path: Path) -> None:
    """Without held data the export still measures parity, on the one example: never silently."""
    from lightning_ncnnqat import export

    tr, _ = digits(64, 0)
    x = tr.tensors[0]
    model = digits_cnn()
    prepare_qat(model, x[:1])
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    alone = export(model, tmp_path / "alone", x[:1], targets="x86", verbose=False, timing_runs=0)
    held = export(model, tmp_path / "held", x[:1], held_batch=x[:32], targets="x86", verbose=False, timing_runs=0)
    said = [w for w in alone.warnings if "example input alone (1 sample(s))" in w]
    assert alone.held_batch["n"] == 1 and len(said) == 1 and "held_batch=" in said[0]
    assert held.held_batch["n"] == 32 and not [w for w in held.warnings if "example input alone" in w]


def test_fast_dev_run_says_where_a_real_run_writes_and_names_no_removed_file(tmp_path: Path, capsys, caplog) -> None:  # noqa: ANN001,E501
    import logging

    tr, va = digits(64, 32)
    model = NetLit(digits_cnn(), example=tr.tensors[0][:1])
    cb = QATCallback(start_epoch=3, export_dir=str(tmp_path / "export"), targets=["x86"], verbose=True)
    trainer = quiet_trainer(max_epochs=5, callbacks=[cb], default_root_dir=tmp_path, fast_dev_run=True)
    with caplog.at_level(logging.INFO):
        trainer.fit(model, DataLoader(tr, batch_size=32), DataLoader(va, batch_size=32))
    printed = capsys.readouterr().out + caplog.text
    assert cb.export_report is not None and cb.export_report.ok
    assert "next: read" not in printed  # the summary would name files in the removed directory
    line = [ln for ln in printed.splitlines() if "the export chain ran in a temporary directory" in ln]
    assert len(line) == 1 and "ok=True" in line[0] and str(tmp_path / "export") in line[0]
    assert not (tmp_path / "export").exists()


class _Relaid(torch.utils.data.Dataset):
    """The digits with the input elsewhere than first: ``(y, x)`` or ``(meta, x, y)``."""

    def __init__(self, ds, layout: str) -> None:  # noqa: ANN001
        self.ds, self.layout = ds, layout

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):  # noqa: ANN204
        x, y = self.ds[i]
        return (y, x) if self.layout == "yx" else (torch.tensor([i, 7]), x, y)


class _RelaidLit(NetLit):
    def __init__(self, layout: str, example: torch.Tensor) -> None:
        super().__init__(digits_cnn(), example=example)
        self.layout = layout

    def _xy(self, batch):  # noqa: ANN001, ANN202
        return (batch[1], batch[0]) if self.layout == "yx" else (batch[1], batch[2])

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = self._xy(batch)
        return self.loss(self(x), y)

    def validation_step(self, batch, batch_idx) -> None:  # noqa: ANN001
        x, y = self._xy(batch)
        self.log("val_loss", self.loss(self(x), y))


@pytest.mark.parametrize("layout", ["yx", "meta_x_y"])
def test_the_held_batch_is_found_wherever_the_batch_keeps_the_input(tmp_path: Path, layout: str) -> None:
    tr, va = digits(128, 64)
    model = _RelaidLit(layout, tr.tensors[0][:1])
    cb = QATCallback(start_epoch=1, export_dir=str(tmp_path / "export"), targets=["x86"], verbose=False,
                     held_batch_size=48)
    trainer = quiet_trainer(max_epochs=2, callbacks=[cb], default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(_Relaid(tr, layout), batch_size=32), DataLoader(_Relaid(va, layout), batch_size=32))
    report = cb.export_report
    assert report.ok and report.held_batch["n"] == 48 and "validation" in report.held_batch["source"]
    assert not [w for w in report.warnings if "example input alone" in w]
