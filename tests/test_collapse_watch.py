"""QAT at the user's learning rate (issue 19 item 11 a, b): a validation collapse across the QAT
start is warned about with the fix, and a divergence error names the learning rate and start_epoch."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_ncnnqat import QATCallback
from lightning_ncnnqat.callbacks._watch import CollapseWatch, watched_keys
from lightning_ncnnqat.errors import DivergedError
from lightning_ncnnqat.policy import collapsed
from lit_models import NetLit, digits, digits_cnn, quiet_trainer

torch.set_num_threads(1)


def _trainer(metrics: dict, epoch: int, step: int, lr: float = 0.05, callbacks: list | None = None) -> SimpleNamespace:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    return SimpleNamespace(callback_metrics={k: torch.tensor(v) for k, v in metrics.items()}, current_epoch=epoch,
                           global_step=step, optimizers=[opt], callbacks=callbacks or [], sanity_checking=False)


def test_policy_rule() -> None:
    assert collapsed(0.705, 0.098, True)  # the run
    assert not collapsed(0.90, 0.86, True)  # QAT's usual small loss
    assert collapsed(0.40, 2.30, False)  # a loss going to chance
    assert not collapsed(0.05, 0.12, False)  # a tiny loss doubling is not a collapse
    assert collapsed(0.40, float("nan"), False) and collapsed(0.9, float("nan"), True)


def test_watch_compares_last_float_with_first_qat_validation() -> None:
    w = CollapseWatch()
    assert w.on_validation_end(_trainer({"val_acc": 0.30, "val_loss": 1.9}, 0, 10), False, 2) is None
    assert w.on_validation_end(_trainer({"val_acc": 0.70, "val_loss": 0.9}, 1, 20), False, 2) is None  # last float
    w.qat_started(_trainer({}, 2, 20))
    assert w.on_validation_end(_trainer({"val_acc": 0.1}, 2, 20), True, 2) is None  # no QAT step yet
    msg = w.on_validation_end(_trainer({"val_acc": 0.098, "val_loss": 2.3}, 2, 30, lr=0.05), True, 2)
    assert msg is not None
    for part in ("`val_acc` 0.7 -> 0.098", "`val_loss` 0.9 -> 2.3", "0.05", "0.005", "start_epoch=2", "epoch 1"):
        assert part in msg, (part, msg)
    assert w.on_validation_end(_trainer({"val_acc": 0.0}, 3, 40), True, 2) is None  # judged once


def test_watch_uses_the_monitored_key_and_its_mode() -> None:
    es = SimpleNamespace(monitor="val_top5_error", mode="min")
    metrics = {"val_top5_error": 0.1, "val_acc": 0.9, "train_loss": 0.2}
    assert watched_keys(_trainer(metrics, 0, 1, callbacks=[es]), metrics) == {"val_top5_error": False}
    assert watched_keys(_trainer(metrics, 0, 1), metrics) == {"val_top5_error": False, "val_acc": True}
    w = CollapseWatch()
    w.on_validation_end(_trainer(metrics, 0, 5, callbacks=[es]), False, 1)
    w.qat_started(_trainer({}, 1, 5))
    # the accuracy fell, but the monitored key held: no warning (the user's own measure decides)
    held = {"val_top5_error": 0.12, "val_acc": 0.3}
    assert w.on_validation_end(_trainer(held, 1, 9, callbacks=[es]), True, 1) is None


def _fit(lr: float, epochs: int = 2) -> list[str]:
    tr, va = digits(512, 256)
    torch.manual_seed(0)
    trainer = quiet_trainer(max_epochs=epochs, accelerator="cpu", devices=1, num_sanity_val_steps=0,
                            callbacks=[QATCallback(start_epoch=1, export_dir=None, verbose=False)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            lit = NetLit(digits_cnn(), lr, momentum=0.9, example=torch.zeros(1, 1, 8, 8), log_acc=True)
            trainer.fit(lit, DataLoader(tr, batch_size=32), DataLoader(va, batch_size=128))
        finally:
            _fit.messages = [str(w.message) for w in caught]  # type: ignore[attr-defined]
    return _fit.messages  # type: ignore[attr-defined]


def test_qat_at_a_float_learning_rate_that_diverges_is_named() -> None:
    """lr 0.6 trains the float CNN for an epoch (val_acc 0.79) and wrecks QAT from epoch 1: the
    first QAT validation is warned about with the fix, then the divergence error names lr and
    start_epoch."""
    with pytest.raises(DivergedError) as info:
        _fit(0.6)
    msg = str(info.value)
    assert "learning rate 0.6" in msg and "start_epoch=1" in msg and "0.06" in msg and info.value.layer
    collapse = [m for m in _fit.messages if "validation collapsed" in m]  # type: ignore[attr-defined]
    assert len(collapse) == 1 and "`val_acc`" in collapse[0] and "0.06" in collapse[0]


def test_a_healthy_qat_start_is_not_warned_about() -> None:
    messages = _fit(0.02)
    assert not [m for m in messages if "validation collapsed" in m]


def test_the_export_report_names_a_collapse(tmp_path) -> None:
    import json

    from lightning_ncnnqat.callbacks._watch import note_collapse
    from lightning_ncnnqat.export import ExportReport

    report = ExportReport(export_dir=str(tmp_path))
    (tmp_path / "report.json").write_text(json.dumps(report.to_dict()))
    w = CollapseWatch()
    note_collapse(report, w)  # nothing collapsed: nothing added
    assert report.warnings == []
    w.on_validation_end(_trainer({"val_acc": 0.705}, 0, 10), False, 1)
    w.qat_started(_trainer({}, 1, 10))
    assert w.on_validation_end(_trainer({"val_acc": 0.098}, 1, 20), True, 1)
    note_collapse(report, w)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert any("validation collapsed" in m and "0.705 -> 0.098" in m for m in saved["warnings"])
