"""ONE QAT start for every entry point: ``prepare_qat(..., targets=...)`` without a Trainer makes
the measured int8 decisions, the calibrated start and the preflight exactly as ``QATCallback``
does at ``start_epoch``; a failed start leaves the model float. Real export chain and real ncnn
(x86)."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import re
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_ncnnqat
from lightning_ncnnqat import QATCallback, QATConfig, prepare_qat
from lightning_ncnnqat.errors import ExportError
from lightning_ncnnqat.qat.plan import get_plan
from lightning_ncnnqat.qat.plan_state import same_plan
from lightning_ncnnqat.qat.prepared import input_quantizers
from lit_models import LitMixed, loader, make_data
from test_measured_decisions import TwoGrouped
from test_surgery_preflight import NoOnnx

ROOT = Path(__file__).resolve().parents[1]


class _Stop(Exception):
    """Raised by the first training step: the QAT start has run, nothing after it is needed."""


class LitOf(L.LightningModule):
    """Any net as a LightningModule; its first training step stops the fit."""

    def __init__(self, net: nn.Module, example: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.example_input_array = example

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        raise _Stop

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _callback_start(module: L.LightningModule, tmp_path: Path, data: torch.utils.data.DataLoader, **kw) -> QATCallback:  # noqa: ANN003
    """Fit with QATCallback(start_epoch=0, targets=["x86"]) up to the first training step."""
    cb = QATCallback(start_epoch=0, export_dir=str(tmp_path / "export"), targets=["x86"], verbose=False,
                     log_every_n_steps=0, **kw)
    trainer = L.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    with pytest.raises(_Stop):
        trainer.fit(module, data)
    return cb


def _two_grouped() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return TwoGrouped(), torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_prepare_qat_with_targets_keeps_a_wrongly_computed_grouped_conv_float(tmp_path: Path) -> None:
    model, ex = _two_grouped()
    twin = LitOf(copy.deepcopy(model), ex)
    plan = prepare_qat(model, ex, targets=["x86"])
    assert "g" in plan.float_layers and "g" not in plan.layers
    assert "computes it wrongly" in plan.float_layers["g"] and "x86 (cosine" in plan.float_layers["g"]
    assert plan.layers["g2"].kind == "ConvolutionDepthWise"  # requantized into the next conv: right, int8
    assert type(model.g) is nn.Conv2d and get_plan(model) is plan
    # the callback, on the same weights and example, decides the same
    data = loader(torch.utils.data.TensorDataset(torch.randn(16, 3, 16, 16), torch.zeros(16, dtype=torch.long)))
    cb = _callback_start(twin, tmp_path, data)
    assert set(cb.plan.layers) == {f"net.{n}" for n in plan.layers}
    assert set(cb.plan.float_layers) == {f"net.{n}" for n in plan.float_layers}
    assert "computes it wrongly" in cb.plan.float_layers["net.g"]


def test_without_targets_prepare_qat_warns_of_unmeasured_grouped_convs() -> None:
    model, ex = _two_grouped()
    with pytest.warns(UserWarning, match=r"2 grouped conv\(s\) run in int8 unmeasured \(g, g2\).*targets="):
        plan = prepare_qat(model, ex)
    assert {"g", "g2"} <= set(plan.layers)
    with pytest.raises(ValueError, match="unknown target"):
        prepare_qat(TwoGrouped(), ex, targets=["riscv"])


def test_callback_and_prepare_qat_give_the_same_plan(tmp_path: Path) -> None:
    """Another architecture (depthwise, grouped, shared input, residual, BN folds): one plan.
    prefer="int8": the start's timed keep-float choice depends on this machine's noise from one
    run to the next (tests/test_speed_decide.py covers it); every other decision is compared."""
    torch.manual_seed(0)
    lit = LitMixed()
    twin = copy.deepcopy(lit)
    ex = lit.example_input_array
    plan = prepare_qat(twin, ex, QATConfig(prefer="int8"), targets=["x86"])
    cb = _callback_start(LitOf(lit.net, ex), tmp_path, loader(make_data(16)), config=QATConfig(prefer="int8"))
    assert set(cb.plan.layers) == set(plan.layers)  # the measured decisions included
    assert set(cb.plan.float_layers) == set(plan.float_layers)
    assert all(cb.plan.layers[n] == p for n, p in plan.layers.items())  # bits, scales, BN folds, owners


def test_calibrated_start_runs_again_after_the_replan(tmp_path: Path) -> None:
    model, ex = _two_grouped()
    data = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    config = QATConfig(range_init="aciq", ranges="fixed", calibration_batches=2)
    twin = LitOf(copy.deepcopy(model), ex)
    plan = prepare_qat(model, ex, config, calibration_data=[data[:16], data[16:]], targets=["x86"])
    assert "g" in plan.float_layers
    ranges = {n: q.running_absmax.item() for n, q in input_quantizers(model).items()}
    assert ranges and all(r > 0 for r in ranges.values())  # every owner of the new plan calibrated
    cb = _callback_start(twin, tmp_path, loader(torch.utils.data.TensorDataset(data, torch.zeros(32, dtype=torch.long))),
                         range_init="aciq", ranges="fixed", calibration_batches=2)
    cb_ranges = {n.removeprefix("net."): q.running_absmax.item() for n, q in input_quantizers(twin).items()}
    assert cb_ranges.keys() == ranges.keys()
    assert all(abs(cb_ranges[n] - r) <= 1e-6 * r for n, r in ranges.items())  # same batches, same thresholds


def test_a_failed_start_leaves_the_model_float(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = NoOnnx()
    params = dict(model.named_parameters())
    with pytest.raises(ExportError, match="onnx"):
        prepare_qat(model, torch.randn(2, 3, 16, 16), targets=["x86"])
    assert get_plan(model) is None and type(model.c) is nn.Conv2d and not hasattr(model.c, "input_quantizer")
    assert dict(model.named_parameters()) == params
    # the callback's start is the same sequence: float after its failure too
    lit = LitOf(NoOnnx(), torch.randn(2, 3, 16, 16))
    cb = QATCallback(start_epoch=0, export_dir=str(tmp_path / "e"), targets=["x86"], verbose=False)
    trainer = L.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, default_root_dir=str(tmp_path))
    with pytest.raises(ExportError):
        trainer.fit(lit, loader(make_data(16)))
    assert get_plan(lit) is None and not cb.active and type(lit.net.c) is nn.Conv2d


def test_same_plan_from_prepare_qat_is_what_a_checkpoint_restores() -> None:
    model, ex = _two_grouped()
    plan = prepare_qat(model, ex, targets=["x86"])
    fresh = TwoGrouped()
    lightning_ncnnqat.restore_from_checkpoint(fresh, model.state_dict())
    assert same_plan(get_plan(fresh), plan) and "g" in get_plan(fresh).float_layers


def test_documented_dotted_paths_resolve() -> None:
    """Every ``lightning_ncnnqat.a.b(...)`` call the README and docs/ show works as written
    (``lightning_ncnnqat.export`` is the export function: a dotted path through it fails)."""
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    paths = {m for t in texts if t.exists() for m in re.findall(r"lightning_ncnnqat(?:\.\w+)+(?=\()", t.read_text())}
    assert paths
    for path in sorted(paths):
        parts = path.split(".")
        # the longest importable module prefix (the docs' `import` line), then attributes
        k = max(i for i in range(1, len(parts)) if importlib.util.find_spec(".".join(parts[:i])) is not None)
        obj = importlib.import_module(".".join(parts[:k]))
        for part in parts[k:]:
            assert hasattr(obj, part), f"{path}: {part!r} is not an attribute of {obj!r}"
            obj = getattr(obj, part)
        assert callable(obj), path
