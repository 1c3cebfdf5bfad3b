"""QAT under every Trainer precision: works (export in float32, parity) or is refused in ``setup``."""

from __future__ import annotations

import json

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ncnnqat import QATCallback
from lightning_ncnnqat.errors import ConfigError
from lightning_ncnnqat.qat.modules import InputQuantizer
from lightning_ncnnqat.qat.plan import get_plan
from lightning_ncnnqat.qat.prepared import input_quantizers
from lightning_ncnnqat.start import prepare_qat
from lit_models import NetLit, quiet_trainer


class TinyNet(nn.Module):
    """conv-bn-relu (stride 2) and a linear head on 1x8x8 inputs: 2 int8 layers, 1 folded BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.relu(self.bn(self.conv(x))), 1))


class LitTiny(NetLit):
    """TinyNet trained with cross-entropy (SGD, momentum 0.9), counting its training steps."""

    def __init__(self, example: bool = True) -> None:
        ex = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(3)) if example else None
        super().__init__(TinyNet(), lr=0.05, momentum=0.9, example=ex)
        self.steps = 0

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        self.steps += 1
        return super().training_step(batch, batch_idx)


def _loaders(n: int = 32, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (2 * n,), generator=g)
    x = torch.randn(2 * n, 1, 8, 8, generator=g) + (y.float()[:, None, None, None] - 1.5) / 2
    tr, va = TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])
    return DataLoader(tr, batch_size=16), DataLoader(va, batch_size=16)


def _trainer(tmp_path, **kw) -> L.Trainer:  # noqa: ANN001
    args = dict(accelerator="cpu", devices=1, max_epochs=2, default_root_dir=str(tmp_path))
    args.update(kw)
    return quiet_trainer(**args)


@pytest.mark.parametrize(
    "precision, example, dtype, options",
    [
        ("bf16-true", True, torch.bfloat16, {}),
        # traced on the first batch, which Lightning cast to float16; calibrated on cast batches
        ("16-true", False, torch.float16, {"range_init": "aciq", "calibration_batches": 1}),
        # a learned threshold is initialised inside the training step, where the default dtype is bf16
        ("bf16-true", True, torch.bfloat16, {"ranges": "learned"}),
        ("bf16", True, torch.float32, {}),  # short form of bf16-mixed: autocast, float32 weights
    ],
)
def test_precision_trains_and_exports_with_parity(tmp_path, precision, example, dtype, options) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    tr, va = _loaders()
    m = LitTiny(example)
    cb = QATCallback(start_epoch=1, export_dir="export", targets=["x86"], verbose=False,
                     preflight=dtype != torch.float32, **options)  # the preflight's float32 copy matters under *-true
    _trainer(tmp_path, callbacks=[cb], precision=precision).fit(m, tr, va)
    assert cb.active and m.steps == 4
    assert m.net.conv.weight.dtype == dtype  # the user's model keeps its training dtype
    for q in input_quantizers(m).values():  # thresholds are float32 and set by training
        assert q.running_absmax.dtype == torch.float32 and float(q.running_absmax) > 0
    report = json.loads((tmp_path / "export" / "report.json").read_text())
    assert report["ok"], report.get("failures")
    parity = report["int8_vs_qat"]
    assert parity["n"] == 32 and parity["top1_agreement"] == 1.0 and parity["cosine"] > 0.9999
    # the table holds exactly the thresholds the QAT forward used (float32, no 16-bit rounding)
    scales = {r["torch_name"]: r["input_scale"] for r in report["layers"]}
    for name, q in input_quantizers(m).items():
        assert scales[name] == pytest.approx(127.0 / float(q.running_absmax), rel=1e-6)


@pytest.mark.parametrize("precision", ["64-true", 64, "64"])
def test_double_precision_refused_in_setup_before_any_step(tmp_path, precision) -> None:  # noqa: ANN001
    tr, va = _loaders()
    m = LitTiny()
    cb = QATCallback(start_epoch=1, export_dir="export", targets=["x86"], verbose=False)
    t = _trainer(tmp_path, callbacks=[cb], precision=precision)
    with pytest.raises(ConfigError) as info:
        t.fit(m, tr, va)
    msg = str(info.value)
    assert "\n" not in msg and "`precision`='64-true'" in msg and "'32-true'" in msg and "'bf16-mixed'" in msg
    assert info.value.argument == "precision" and info.value.__cause__ is None
    assert m.steps == 0 and t.global_step == 0 and get_plan(m) is None
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("cast", [torch.nn.Module.half, torch.nn.Module.double,
                                  lambda m: m.to(torch.bfloat16)])
def test_thresholds_stay_float32_bit_exact_under_module_casts(cast) -> None:  # noqa: ANN001
    net = TinyNet()
    prepare_qat(net, torch.randn(2, 1, 8, 8))
    net.train()
    net(torch.randn(4, 1, 8, 8) * 3.3)  # sets the ranges
    before = {n: q.running_absmax.clone() for n, q in input_quantizers(net).items()}
    cast(net)
    assert net.conv.weight.dtype != torch.float32  # the weights were cast
    for n, q in input_quantizers(net).items():
        assert q.running_absmax.dtype == torch.float32
        assert torch.equal(q.running_absmax, before[n])  # bit-exact, not rounded through 16 bits


def test_learned_threshold_stays_float32_under_bf16_cast() -> None:
    q = InputQuantizer(learned=True)
    q.set_threshold(1.2345678)
    q.to(torch.bfloat16)
    assert q.log_threshold.dtype == torch.float32 and q.running_absmax.dtype == torch.float32
    assert float(q.running_absmax) == pytest.approx(1.2345678, rel=1e-7)


def test_qat_checkpoint_resumes_under_bf16_true(tmp_path) -> None:  # noqa: ANN001
    """A QAT checkpoint re-applies its plan before Lightning casts the module to bfloat16: the
    thresholds stay the checkpoint's float32 values and training goes on."""
    tr, va = _loaders()
    cb = QATCallback(start_epoch=0, export_dir=None, verbose=False)
    t = _trainer(tmp_path, callbacks=[cb], max_epochs=1)
    m = LitTiny()
    t.fit(m, tr, va)
    ckpt = tmp_path / "qat.ckpt"
    t.save_checkpoint(ckpt)
    saved = {n: q.running_absmax.clone() for n, q in input_quantizers(m).items()}

    seen = {}

    class Spy(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            seen.update({n: q.running_absmax.clone() for n, q in input_quantizers(pl_module).items()})

    m2 = LitTiny()
    t2 = _trainer(tmp_path, callbacks=[QATCallback(start_epoch=0, export_dir=None, verbose=False), Spy()],
                  max_epochs=2, precision="bf16-true")
    t2.fit(m2, tr, va, ckpt_path=str(ckpt))
    assert m2.net.conv.weight.dtype == torch.bfloat16 and m2.steps == 2
    assert seen.keys() == saved.keys() and all(torch.equal(seen[n], saved[n]) for n in saved)
