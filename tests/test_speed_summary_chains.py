"""``chain_activations`` is reported once whatever the speed step keeps float (a new user's trial,
H-SUMMARY): with prefer='speed' keeping every conv float the swap happened but no line said so
(``ChainStart.note`` returned early when no int8 conv was left). And a "does NOT pay" line shows
once, as the warning, not also as a log line. Real prepare_qat / QATCallback / ncnn timing on a
tiny depthwise-separable SiLU net (3 x 16 x 16 input)."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ncnnqat import QATCallback, QATConfig, prepare_qat
from lightning_ncnnqat.qat.plan import get_plan
from lightning_ncnnqat.speed.choice import SpeedMeasurement
from lightning_ncnnqat.speed.decide import SpeedDecision, keep_slow_layers_float
from lightning_ncnnqat.speed.chains import NOTE_KEY

from test_speed_summary import _m

CONVS = ["stem.0", "dw", "pw"]


class DwSilu(nn.Module):
    """Conv-BN-SiLU stem, a depthwise-separable SiLU block, a Linear head: every activation breaks
    ncnn's int8 chains until ``chain_activations`` swaps it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False)
        self.act1 = nn.SiLU()
        self.pw = nn.Conv2d(16, 32, 1, bias=False)
        self.act2 = nn.SiLU()
        self.fc = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.pw(self.act1(self.dw(self.stem(x)))))
        return self.fc(y.mean((2, 3)))


def _x() -> torch.Tensor:
    return torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _swap_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if "SiLU -> ReLU" in ln and ln.startswith("int8 chains")]


@pytest.mark.parametrize("kind", ["relu", "hardswish"])
def test_the_swap_is_noted_when_no_int8_conv_is_left(capsys, kind: str) -> None:
    """Every conv float (as prefer='speed' may leave them): the swap is still in the plan and the log."""
    torch.manual_seed(0)
    model = DwSilu()
    plan = prepare_qat(model, _x(), QATConfig(chain_activations=kind, skip=tuple(CONVS)), verbose=True)
    new = "ReLU" if kind == "relu" else "Hardswish"  # torch's class names
    assert f"SiLU -> {new} x3" in plan.notes[NOTE_KEY] and "no int8 conv left" in plan.notes[NOTE_KEY], plan.notes
    out = capsys.readouterr().out
    assert sum(f"SiLU -> {new}" in ln for ln in out.splitlines() if ln.startswith("int8 chains")) == 1, out
    assert not any(isinstance(m, nn.SiLU) for m in model.modules())


def test_off_with_no_int8_conv_says_nothing_of_chains() -> None:
    plan = prepare_qat(DwSilu(), _x(), QATConfig(skip=tuple(CONVS)))
    assert NOTE_KEY not in plan.notes  # nothing swapped, nothing to chain: no line


@pytest.mark.parametrize("prefer", ["speed", "int8"])
def test_prepare_qat_with_timing_notes_the_swap_once(capsys, prefer: str) -> None:
    """The real QAT start on x86 (timed, re-planned where prefer='speed' finds losers): whatever
    it keeps float, the swap is said once in the log and is in the plan's notes, and no chain
    line comes as a warning."""
    torch.manual_seed(0)
    model = DwSilu()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = prepare_qat(model, _x(), QATConfig(chain_activations="relu", prefer=prefer), targets=["x86"], verbose=True)
    assert "SiLU -> ReLU x3" in plan.notes[NOTE_KEY], plan.summary()
    assert len(_swap_lines(capsys.readouterr().out)) == 1
    assert not any("SiLU" in str(w.message) for w in caught), [str(w.message) for w in caught]


class Lit(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = DwSilu()
        self.example_input_array = _x()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def test_the_callback_notes_the_swap_with_every_conv_float(tmp_path, caplog) -> None:
    torch.manual_seed(0)
    lit = Lit()
    cb = QATCallback(start_epoch=0, config=QATConfig(chain_activations="relu", skip=tuple(f"net.{n}" for n in CONVS)),
                     export=False, verbose=True)  # no preflight, no export: the QAT start alone
    trainer = L.Trainer(max_steps=1, callbacks=[cb], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with caplog.at_level("INFO"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(lit, DataLoader(TensorDataset(torch.randn(2, 3, 16, 16), torch.zeros(2)), batch_size=2))
    assert "SiLU -> ReLU x3" in cb.plan.notes[NOTE_KEY]
    logged = [r.getMessage() for r in caplog.records if "SiLU -> ReLU" in r.getMessage()]
    assert sum(m.startswith("QATCallback: int8 chains") for m in logged) == 1, logged
    assert not any("SiLU" in str(w.message) for w in caught)


@pytest.mark.parametrize("prefer", ["int8", "speed"])
def test_a_does_not_pay_line_shows_once_as_the_warning(prefer: str) -> None:
    """int8 slower than float: the verdict line goes to ``warn`` once and not also to ``log``."""
    model = DwSilu()
    prepare_qat(model, _x(), QATConfig(prefer=prefer, skip=("dw",)))
    m: SpeedMeasurement = _m({"float": 0.8, "int8": 1.0, "split": 0.95, "loose": 0.93, "floor": 0.92})
    m.models = {k: v for k, v in m.models.items() if k in ("float", "int8")}  # no plan to fall back on
    m.check = {k: v for k, v in m.check.items() if k in ("float", "int8")}
    decision = SpeedDecision(prefer, m, "int8")
    logged: list[str] = []
    warned: list[str] = []
    keep_slow_layers_float(model, _x(), None, lambda _name, _fn: decision, logged.append, warned.append)
    assert len(warned) == 1 and "int8 does NOT pay on x86" in warned[0], warned
    assert not any("does NOT pay" in ln for ln in logged) and logged, logged
    assert get_plan(model) is not None
