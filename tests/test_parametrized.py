"""Weights computed by parametrizations or forward pre-hooks (issue 19, item 4).

prune (``weight_orig * weight_mask``), the old hook-based ``weight_norm`` / ``spectral_norm`` and
the new ``torch.nn.utils.parametrizations`` ones: QAT fake-quantizes the weight the layer computes
with, gradients reach its sources, the plan names true reasons and the export writes that weight.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, prune

from lightning_ncnnqat import prepare_qat
from lightning_ncnnqat.export import export
from lightning_ncnnqat.ops import fake_quantize_per_channel
from lightning_ncnnqat.qat.prepared import folded_float_model
from lightning_ncnnqat.qat.prepare import unprepare
from lightning_ncnnqat.qat.prepared import deepcopy_model

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

KINDS = ["prune", "weight_norm_hook", "weight_norm", "spectral_norm_hook", "spectral_norm"]


def _wrap(kind: str, layer: nn.Module) -> nn.Module:
    if kind == "prune":
        return prune.l1_unstructured(layer, "weight", amount=0.4)
    if kind == "weight_norm_hook":
        return nn.utils.weight_norm(layer)
    if kind == "weight_norm":
        return parametrizations.weight_norm(layer)
    if kind == "spectral_norm_hook":
        return nn.utils.spectral_norm(layer)
    return parametrizations.spectral_norm(layer)


def _sources(kind: str, m: nn.Module) -> list[torch.Tensor]:
    """The tensors the computed weight is made from (what the optimizer trains)."""
    if kind == "weight_norm":
        return [m.parametrizations.weight.original0, m.parametrizations.weight.original1]
    if kind == "spectral_norm":
        return [m.parametrizations.weight.original]
    if kind == "weight_norm_hook":
        return [m.weight_g, m.weight_v]
    return [m.weight_orig]


def _effective(kind: str, m: nn.Module) -> torch.Tensor:
    """The weight the layer computes with in eval mode, by hand from its sources."""
    with torch.no_grad():
        if kind == "prune":
            return m.weight_orig * m.weight_mask
        if kind in ("weight_norm", "weight_norm_hook"):
            g, v = _sources(kind, m)
            return g * v / v.flatten(1).norm(dim=1).reshape(-1, *[1] * (v.dim() - 1))
        if kind == "spectral_norm_hook":
            w, u, v = m.weight_orig, m.weight_u, m.weight_v
        else:
            p = m.parametrizations.weight[0]
            w, u, v = m.parametrizations.weight.original, p._u, p._v
        sigma = torch.dot(u, w.flatten(1) @ v)
        return w / sigma


class Net(nn.Module):
    """conv (wrapped) -> BN -> ReLU -> conv -> ReLU -> pool -> Linear (wrapped)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.c1 = _wrap(kind, nn.Conv2d(3, 8, 3, padding=1))
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = _wrap(kind, nn.Linear(8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c2(torch.relu(self.bn(self.c1(x))))).mean((2, 3)))


def _trained(kind: str, steps: int = 3) -> tuple[Net, torch.Tensor]:
    torch.manual_seed(0)
    m = Net(kind)
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    plan = prepare_qat(m, x[:2])
    assert set(plan.layers) == {"c1", "c2", "fc"}, plan.summary()  # none "not called in the traced forward"
    assert "computed weight by" in plan.notes["c1"] and "computed weight by" in plan.notes["fc"]
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    m.train()
    for _ in range(steps):
        loss = F.mse_loss(m(x), torch.ones(16, 5))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m, x


@pytest.mark.parametrize("kind", KINDS)
def test_qat_quantizes_the_computed_weight_and_trains_its_sources(kind: str) -> None:
    m, x = _trained(kind)
    m.eval()
    m(x[:2])  # an eval call: hook-computed weights are recomputed from the sources (no power iteration)
    wq, _ = m.fc.quantized_weight_bias()
    want = fake_quantize_per_channel(_effective(kind, m.fc), m.fc.weight_groups, m.fc.weight_bits)[0]
    torch.testing.assert_close(wq.detach(), want, rtol=0, atol=1e-6)
    # the stored weight tensor before the wrap is not what QAT quantizes: the sources are trained
    m.train()
    for t in _sources(kind, m.fc) + _sources(kind, m.c1):
        t.grad = None
    F.mse_loss(m(x), torch.zeros(16, 5)).backward()
    for t in _sources(kind, m.fc) + _sources(kind, m.c1):
        assert t.grad is not None and float(t.grad.abs().sum()) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_float_copy_holds_the_current_computed_weight(kind: str) -> None:
    m, _ = _trained(kind)
    # after the last optimizer step a hook-computed attribute is one step old; the export must not
    # write it. (eval-mode value from the current sources, the BN of c1 folded in)
    m.eval()
    folded = folded_float_model(m)
    torch.testing.assert_close(folded.fc.weight, _effective(kind, m.fc), rtol=1e-5, atol=1e-6)
    assert type(folded.c1) is nn.Conv2d and type(folded.fc) is nn.Linear
    assert not folded.fc._forward_pre_hooks and "parametrizations" not in folded.fc._modules
    assert sorted(n for n, _ in folded.fc.named_parameters()) == ["bias", "weight"]
    deepcopy_model(m)  # the package's copies work after a training step (plain deepcopy refuses the hooked forms)


@pytest.mark.parametrize("kind", ["prune", "weight_norm", "spectral_norm_hook"])
def test_export_parity_on_computed_weights(kind: str, tmp_path) -> None:  # noqa: ANN001
    m, x = _trained(kind)
    rep = export(m, tmp_path, x[:1], x, targets=["x86"], verbose=False, timing_runs=0)
    assert rep.ok, rep.summary()
    assert {r.torch_name for r in rep.layers} == {"c1", "c2", "fc"}
    assert rep.int8_vs_qat.cosine > 0.999 and rep.float_vs_torch.cosine > 0.9999


def test_unprepare_restores_the_parametrized_class() -> None:
    m, x = _trained("weight_norm", steps=1)
    cls = m.c1.__dict__["_ncnnqat_orig_class"]
    unprepare(m)
    assert type(m.c1) is cls and type(m.c1).__name__ == "ParametrizedConv2d"
    m.eval()
    torch.testing.assert_close(m.c1.weight, _effective("weight_norm", m.c1))


def test_pruned_float_layer_is_baked_and_pruned_bias_is_written(tmp_path) -> None:  # noqa: ANN001
    """A pruned bias (a computed attribute too) on a quantized layer, and a pruned layer kept in float."""
    torch.manual_seed(0)
    m = Net("prune")
    prune.l1_unstructured(m.c2, "bias", amount=0.5)
    x = torch.randn(8, 3, 8, 8)
    from lightning_ncnnqat import QATConfig

    prepare_qat(m, x[:2], QATConfig(skip=["fc"]))
    m.train()
    m(x).sum().backward()
    m.eval()
    folded = folded_float_model(m)
    torch.testing.assert_close(folded.c2.bias, m.c2.bias_orig * m.c2.bias_mask)
    torch.testing.assert_close(folded.fc.weight, m.fc.weight_orig * m.fc.weight_mask)
    assert not hasattr(folded.fc, "weight_orig") and not folded.fc._forward_pre_hooks


@pytest.mark.parametrize("permanent", [False])
def test_lightning_model_pruning_composes_with_qat(tmp_path, permanent: bool) -> None:  # noqa: ANN001
    """Lightning's ModelPruning (prune's hooks, added at each epoch end, after QAT started here)
    in a short fit with the preflight: the export writes the pruned weights, with parity."""
    import json
    import sys
    from pathlib import Path

    from lightning.pytorch.callbacks import ModelPruning

    from lightning_ncnnqat import QATCallback

    sys.path.insert(0, str(Path(__file__).parent))
    from lit_models import NetLit, loader, make_data, quiet_trainer

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )
    lit = NetLit(net, lr=0.05, example=torch.randn(2, 3, 16, 16))
    cb = QATCallback(start_epoch=1, export_dir=str(tmp_path / "export"), targets=["x86"], verbose=False)
    pruning = ModelPruning("l1_unstructured", amount=0.3, make_pruning_permanent=permanent, verbose=0)
    trainer = quiet_trainer(max_epochs=3, callbacks=[pruning, cb], limit_train_batches=2)
    trainer.fit(lit, loader(make_data(64, 16)))
    assert hasattr(lit.net[0], "weight_orig") is not permanent
    assert hasattr(lit.net[1], "weight_orig") is not permanent  # the BN folded into net.0 is pruned too
    report = json.loads((tmp_path / "export" / "report.json").read_text())
    assert report["ok"], report.get("failures")
    folded = folded_float_model(lit)
    zeros = float((folded.net[0].weight == 0).float().mean())
    assert zeros > 0.25  # at least one pruning of 30% at an epoch end, and so exported
    with torch.no_grad():
        lit.eval()
        effective = lit.net[0].weight_orig * lit.net[0].weight_mask if not permanent else lit.net[0].weight
        assert torch.equal(folded.net[0].weight == 0, effective == 0)
