"""BatchNorm-like modules: folded when their eval math is BN, else the layer before stays float."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat import folded_float_model, prepare_qat
from lightning_ncnnqat.qat.graph import trace_dataflow
from lightning_ncnnqat.qat.plan_state import PLAN_KEY
from lightning_ncnnqat.qat.modules import FoldedBatchNorm, FoldedFrozenBatchNorm, QATConv2d
from lightning_ncnnqat.qat.plan import QATPlan, get_plan
from lightning_ncnnqat.qat.prepare import apply_plan, unprepare


class MyBN(nn.BatchNorm2d):
    """A bare subclass: BN math."""


class BNAct(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: batch_norm, then its own ``drop`` and ``act`` submodules."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


class FrozenBN(nn.Module):
    """Like torchvision's FrozenBatchNorm2d: not a _BatchNorm, gamma/beta are buffers."""

    def __init__(self, c: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        for name, v in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((c,), v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + bias[None, :, None, None]


class ScaledBN(nn.BatchNorm2d):
    """A BN subclass whose forward is not BN math: must not be folded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class Block(nn.Module):
    def __init__(self, norm: nn.Module, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.norm = norm
        self.head = nn.Linear(c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.norm(self.conv(x)), 1).flatten(1))


def _randomise_stats(m: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(m.norm, name)
            t.copy_(torch.rand(t.shape, generator=g) + (0.5 if name in ("weight", "running_var") else -0.5))


@pytest.mark.parametrize("norm_cls, folded_cls, tail", [
    (MyBN, FoldedBatchNorm, []),
    (nn.SyncBatchNorm, FoldedBatchNorm, []),
    (BNAct, FoldedBatchNorm, ["drop", "act"]),
    (FrozenBN, FoldedFrozenBatchNorm, []),
])
def test_bn_like_modules_are_folded(norm_cls, folded_cls, tail) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    m = Block(norm_cls(8)).eval()
    _randomise_stats(m)
    x = torch.randn(4, 3, 8, 8)
    ref = m(x)
    keys = list(m.state_dict())
    plan = prepare_qat(m, x[:1])
    assert plan.layers["conv"].bn == "norm" and plan.layers["conv"].bn_tail == tail
    assert type(m.norm) is folded_cls and isinstance(m.conv, QATConv2d)
    assert "conv" not in plan.float_layers
    # checkpoint keys stay the user's (plus the quantizer buffers and the one plan entry)
    new_keys = list(m.state_dict())
    assert [k for k in new_keys if "input_quantizer" not in k and k != PLAN_KEY] == keys
    assert new_keys.count(PLAN_KEY) == 1
    # the folded float model (what the converters see) computes the float model's outputs
    m.train()
    m(x)
    m.eval()
    f = folded_float_model(m)
    assert torch.allclose(f(x), ref, atol=1e-5)
    # the fold is the QAT forward's: the conv's folded weight quantizes close to the BN model
    assert F.cosine_similarity(m(x).flatten(), ref.flatten(), dim=0) > 0.99
    # the plan rebuilds the same fold on a fresh model without tracing
    fresh = Block(norm_cls(8)).eval()
    apply_plan(fresh, QATPlan.from_dict(plan.to_dict()))
    fresh.load_state_dict(m.state_dict())
    assert type(fresh.norm) is folded_cls and torch.equal(fresh(x), m(x))
    # unprepare: the user's class back, BN running again, the same float outputs
    unprepare(m)
    assert type(m.norm) is norm_cls and type(m.conv) is nn.Conv2d and get_plan(m) is None
    assert list(m.state_dict()) == keys
    m.eval()
    assert torch.allclose(m(x), ref, atol=1e-6)


def test_frozen_bn_without_eps_attribute_matches_its_math() -> None:
    class NoEps(FrozenBN):
        def __init__(self, c: int) -> None:
            super().__init__(c, eps=0.0)
            del self.eps

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scale = self.weight * self.running_var.rsqrt()
            return x * scale[None, :, None, None] + (self.bias - self.running_mean * scale)[None, :, None, None]

    m = Block(NoEps(8)).eval()
    _randomise_stats(m)
    plan = prepare_qat(m, torch.randn(1, 3, 8, 8))
    assert plan.layers["conv"].bn == "norm" and plan.layers["conv"].bn_eps == 0.0


@pytest.mark.parametrize("norm, why", [
    (ScaledBN(8), "not batch_norm"),
    (nn.BatchNorm2d(8, track_running_stats=False), "running statistics"),
])
def test_unfoldable_bn_keeps_the_layer_before_in_float(norm, why) -> None:  # noqa: ANN001
    m = Block(norm).eval()
    plan = prepare_qat(m, torch.randn(2, 3, 8, 8))
    assert "conv" not in plan.layers and set(plan.layers) == {"head"}
    reason = plan.float_layers["conv"]
    assert "'norm'" in reason and "converters fold" in reason and why in reason
    assert type(m.norm) is type(norm) and type(m.conv) is nn.Conv2d  # both untouched
    assert "conv" in plan.summary() and why in plan.summary()


def test_bn_called_twice_keeps_its_layer_in_float() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(3, 8, 1)
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.a(x)) + self.bn(self.b(x))
            return self.fc(y.mean((2, 3)))

    plan = prepare_qat(Shared().eval(), torch.randn(2, 3, 4, 4))
    assert "called 2 times" in plan.float_layers["a"] and "called 2 times" in plan.float_layers["b"]
    assert set(plan.layers) == {"fc"}


def test_bn_act_is_one_node_in_the_trace() -> None:
    m = Block(BNAct(8)).eval()
    flow = trace_dataflow(m, torch.randn(1, 3, 8, 8))
    (conv,) = flow.module_calls("conv")
    (bn,) = flow.module_calls("norm")
    assert flow.consumers[conv.outputs[0]] == [bn.index]
    assert not flow.module_calls("norm.act")  # inside the BN-like node


def test_linear_batchnorm1d_subclass_folds() -> None:
    class MyBN1d(nn.BatchNorm1d):
        pass

    m = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), MyBN1d(6), nn.ReLU(), nn.Linear(6, 2)).eval()
    with torch.no_grad():
        m[2].running_var.uniform_(0.5, 2.0)
        m[2].running_mean.uniform_(-1, 1)
    x = torch.randn(3, 3, 2, 2)
    ref = m(x)
    plan = prepare_qat(m, x[:1])  # a batch of one: the training-mode trace retries with two
    assert plan.layers["1"].bn == "2" and not plan.notes
    m.train()
    m(x)
    assert torch.allclose(folded_float_model(m)(x), ref, atol=1e-5)
