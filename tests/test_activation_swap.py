"""swap_activations: chain-breaking activation modules replaced before QAT; functional ones counted;
the exported int8 model's requantize chains counted before and after (real pnnx + ncnn)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat import export, prepare_qat
from lightning_ncnnqat.speed.activation_swap import DEFAULT_SWAPS, functional_breakers, swap_activations
from lightning_ncnnqat.speed.plan import count_chains


class Block(nn.Module):
    def __init__(self, c: int, act: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Net(nn.Module):
    """SiLU stem, a GELU block, a Hardswish block sharing ONE module instance twice, a functional
    F.silu in forward, a Linear head."""

    def __init__(self, functional: bool = True) -> None:
        super().__init__()
        shared = nn.Hardswish()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU())
        self.b1 = Block(8, nn.GELU())
        self.b2 = Block(8, shared)
        self.b3 = Block(8, shared)
        self.functional = functional
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b3(self.b2(self.b1(self.stem(x))))
        if self.functional:
            x = F.silu(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_default_swaps_modules_and_counts_functional() -> None:
    torch.manual_seed(0)
    m = Net()
    x = torch.randn(2, 3, 8, 8)
    rep = swap_activations(m, example_input=x[:1])
    assert rep.swapped == {"stem.1": ("SiLU", "ReLU"), "b1.act": ("GELU", "ReLU"), "b2.act": ("Hardswish", "ReLU"),
                           "b3.act": ("Hardswish", "ReLU")}
    assert m.b2.act is m.b3.act and type(m.b2.act) is nn.ReLU  # one instance stays one instance
    assert not any(type(mod) in DEFAULT_SWAPS for mod in m.modules())
    assert rep.functional == {"F.silu": 1}  # the call in forward is counted, not swapped
    assert "F.silu x1" in rep.summary() and "SiLU -> ReLU: 1" in rep.summary()
    assert m.training  # the counting forward restored the training flag
    out = m(x)
    assert out.shape == (2, 4) and torch.isfinite(out).all()


def test_custom_mapping_matches_what_a_module_computes() -> None:
    class MySiLU(nn.SiLU):
        pass

    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SiLU(), nn.Conv2d(4, 4, 1), MySiLU(), nn.GELU())
    rep = swap_activations(m, {nn.SiLU: nn.ReLU6, nn.GELU: nn.LeakyReLU})
    # a subclass computes SiLU: it takes nn.SiLU's entry (tests/test_swap_forms.py: other forms)
    assert rep.swapped == {"1": ("SiLU", "ReLU6"), "3": ("MySiLU", "ReLU6"), "4": ("GELU", "LeakyReLU")}
    assert rep.functional == {}


@pytest.mark.parametrize("act", [nn.Hardswish, nn.SiLU, nn.GELU])
def test_inplace_consumer_after_swap_trains(act: type[nn.Module]) -> None:
    """torchvision MobileNetV3's head: act -> Dropout(inplace=True). ReLU's backward reads its
    output, so the in-place Dropout must be made out-of-place, or backward raises."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), act(), nn.Dropout(0.2, inplace=True), nn.Linear(16, 3))
    rep = swap_activations(m)
    assert rep.not_inplace == ["3"] and m[3].inplace is False and "set inplace=False" in rep.summary()
    m.train()
    m(torch.randn(4, 3, 2, 2)).sum().backward()
    assert m[1].weight.grad is not None and torch.isfinite(m[1].weight.grad).all()


def test_functional_breakers_ignore_module_calls() -> None:
    """A remaining nn.SiLU module calls F.silu inside: that is a module, not a functional use."""
    m = Net(functional=False)
    assert functional_breakers(m, torch.randn(1, 3, 8, 8)) == {}
    m.functional = True
    assert functional_breakers(m, torch.randn(1, 3, 8, 8)) == {"F.silu": 1}


@pytest.mark.parametrize(
    ("model", "swaps", "match"),
    [
        ("not a module", None, "`model` must be an nn.Module"),
        (nn.Sequential(nn.SiLU()), {nn.SiLU: "ReLU"}, "nn.Module class"),
        (nn.Sequential(nn.SiLU()), {F.silu: nn.ReLU}, "nn.Module class"),
        (nn.Sequential(nn.SiLU()), {nn.SiLU: nn.Conv2d}, "without arguments"),
    ],
)
def test_bad_arguments_named(model: object, swaps: object, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        swap_activations(model, swaps)  # type: ignore[arg-type]
    if isinstance(model, nn.Sequential):
        assert type(model[0]) is nn.SiLU  # nothing changed before the error


def _chains(model: nn.Module, tmp: Path, size: int) -> tuple[int, int, dict[str, int]]:
    x = torch.randn(4, 3, size, size)
    prepare_qat(model, x[:1])
    model.train()
    model(x)
    model.eval()
    rep = export(model, tmp, x[:1], x, verbose=False, targets=["x86"], timing_runs=0, check_onnx=False,
                 layer_check_samples=1)
    assert not rep.failures
    c = count_chains((tmp / "model.int8.param").read_text())
    return c.requantized, c.int8_convs, c.breakers


@pytest.mark.parametrize("act", [nn.SiLU, nn.GELU])
def test_swap_restores_int8_chains_in_export(act: type[nn.Module], tmp_path: Path) -> None:
    """conv-act-conv-act-conv: the breaker leaves 0 requantized convs; after the swap the
    exported int8 model requantizes both producers (ReLU folded into the conv by pnnx).
    (Hardswish no longer breaks chains: the export folds it, tests/test_chains.py.)"""

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), act(), nn.Conv2d(8, 8, 3, padding=1), act(),
                             nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 36, 3))

    before = _chains(net(), tmp_path / "before", 6)
    m = net()
    swap_activations(m)
    after = _chains(m, tmp_path / "after", 6)
    assert before[:2] == (0, 3) and sum(before[2].values()) == 2
    assert after == (2, 3, {})
