"""The QAT plan of attention (issue 18): nn.MultiheadAttention and F.scaled_dot_product_attention
trained as ncnn's dynamic int8 MultiHeadAttention / SDPA (qat/attention_plan.py), without ncnn.

Each planned layer's QAT forward equals the int8 reference (ops/attention_reference.py) on the
same tensors, gradients reach the weights, ``unprepare`` gives the float model back, the plan
round-trips through its dict and the state dict, and layers ncnn cannot compute stay float with
the reason in the plan summary.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat.ops.attention_reference import mha_int8, sdpa_int8
from lightning_ncnnqat.qat.attention import QATMultiheadAttention
from lightning_ncnnqat.qat.config import QATConfig
from lightning_ncnnqat.qat.plan import QATPlan, get_plan
from lightning_ncnnqat.qat.plan_state import PLAN_KEY
from lightning_ncnnqat.qat.prepare import apply_plan, plan_and_apply, unprepare


class MhaNet(nn.Module):
    """Conv stem -> tokens -> residual nn.MultiheadAttention -> Linear head."""

    def __init__(self, heads: int, **mha_kw) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 2, 2)
        self.attn = nn.MultiheadAttention(16, heads, batch_first=True, **mha_kw)
        self.head = nn.Linear(16, 5)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x).flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        return self.head((t + self.attn(t, t, t, need_weights=False)[0]).mean(1))


class SdpaAttn(nn.Module):
    """timm-like attention written with F.scaled_dot_product_attention (pnnx: one SDPA layer)."""

    def __init__(self, dim: int, heads: int, mask: str | None = None) -> None:
        super().__init__()
        self.heads, self.mask = heads, mask
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, n, c = x.shape
        return tuple(t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))

    def attn_mask(self, n: int) -> torch.Tensor | None:
        if self.mask == "bool":
            return torch.ones(n, n, dtype=torch.bool).tril()
        if self.mask == "float":
            return torch.linspace(-2, 0, n * n).reshape(n, n)
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_heads(x)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.attn_mask(x.shape[1]))
        return self.proj(o.transpose(1, 2).reshape(x.shape))


class SdpaNet(nn.Module):
    def __init__(self, mask: str | None = None) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 2, 2)
        self.block = SdpaAttn(16, 2, mask)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)
        return self.head((t + self.block(t)).mean(1))


def _mha_weights(m: nn.MultiheadAttention) -> dict[str, torch.Tensor]:
    w = dict(zip(("q_weight", "k_weight", "v_weight"), m.in_proj_weight.chunk(3)))
    w.update(zip(("q_bias", "k_bias", "v_bias"), m.in_proj_bias.chunk(3)))
    return {**w, "out_weight": m.out_proj.weight, "out_bias": m.out_proj.bias}


@pytest.mark.parametrize("heads", [1, 4])
def test_mha_is_planned_and_computes_ncnn_int8(heads: int) -> None:
    torch.manual_seed(heads)
    net, x = MhaNet(heads), torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        before = net(x)
    params = list(net.parameters())
    plan = plan_and_apply(net, x[:1], QATConfig())
    assert plan.attention_layers == {"attn": "MultiHeadAttention"} and plan.sdpa_calls == {}
    assert "attn.out_proj" not in plan.float_layers  # read as the attention's weight, never called
    assert "MultiHeadAttention" in plan.summary() and isinstance(net.attn, QATMultiheadAttention)
    assert all(a is b for a, b in zip(net.parameters(), params))
    with torch.no_grad():
        t = net.tokens(x)
        want = mha_int8(t, t, t, _mha_weights(net.attn), heads)
        torch.testing.assert_close(net.attn(t, t, t)[0], want, rtol=0, atol=0)
    net.train()
    net(x).square().mean().backward()
    assert net.attn.in_proj_weight.grad.abs().sum() > 0 and net.stem.weight.grad.abs().sum() > 0
    unprepare(net)
    assert type(net.attn) is nn.MultiheadAttention
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), before)


@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_sdpa_calls_run_int8_and_unprepare_restores_float(mask: str | None) -> None:
    torch.manual_seed(7)
    net, x = SdpaNet(mask), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = net(x)
    plan = plan_and_apply(net, x[:1], QATConfig())
    assert plan.sdpa_calls == {"block": 1} and plan.gemm_layers == {"block.qkv": 3, "block.proj": 3}
    seen = {}
    net.block.register_forward_hook(lambda m, a, out: seen.update(x=a[0], out=out))
    with torch.no_grad():
        qat = net(x)
        q, k, v = net.block.qkv_heads(seen["x"])  # the QAT Gemm's q/k/v, as the SDPA call read them
        m = net.block.attn_mask(q.shape[2])
        if m is not None and m.dtype == torch.bool:
            m = torch.zeros(m.shape).masked_fill(~m, float("-inf"))
        o = sdpa_int8(q, k, v, m)
        want = net.block.proj(o.transpose(1, 2).reshape(seen["x"].shape))
    torch.testing.assert_close(seen["out"], want, rtol=0, atol=0)
    assert (qat - before).abs().max() > 1e-5  # not the float forward
    net.train()
    net(x).sum().backward()
    assert net.block.qkv.weight.grad.abs().sum() > 0
    unprepare(net)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), before)


def test_unsupported_attention_stays_float_with_its_reason() -> None:
    torch.manual_seed(3)
    net, x = MhaNet(2, add_bias_kv=True), torch.randn(2, 3, 8, 8)
    plan = plan_and_apply(net, x[:1], QATConfig())
    assert plan.attention_layers == {} and "add_bias_kv" in plan.float_layers["attn"]
    assert plan.sdpa_calls == {}  # the SDPA call inside a float MultiheadAttention is its own, not planned
    assert "add_bias_kv" in plan.summary() and type(net.attn) is nn.MultiheadAttention
    skipped = plan_and_apply(MhaNet(2), x[:1], QATConfig(skip=("attn",)))
    assert skipped.float_layers["attn"] == "kept in float by `skip`" and skipped.attention_layers == {}


class PaddedMha(MhaNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        pad = torch.zeros(t.shape[:2], dtype=torch.bool)
        pad[:, -1] = True
        return self.head(self.attn(t, t, t, key_padding_mask=pad, need_weights=False)[0].mean(1))


class WeightsReadMha(MhaNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        out, w = self.attn(t, t, t)
        return self.head(out.mean(1)) + w.mean()


def test_calls_ncnn_cannot_compute_stay_float() -> None:
    plan = plan_and_apply(WeightsReadMha(2), torch.randn(2, 3, 8, 8)[:1], QATConfig())
    assert plan.attention_layers == {} and "attention weights are read" in plan.float_layers["attn"]


def test_key_padding_mask_is_planned_int8() -> None:
    """pnnx writes a constant key_padding_mask as the MultiHeadAttention's mask input
    (tests/test_attention_masks.py exports it), so the module trains as ncnn's int8 layer."""
    plan = plan_and_apply(PaddedMha(2), torch.randn(2, 3, 8, 8)[:1], QATConfig())
    assert plan.attention_layers == {"attn": "MultiHeadAttention"}


def test_plan_travels_in_dict_and_state_dict() -> None:
    torch.manual_seed(5)
    net, x = SdpaNet("bool"), torch.randn(2, 3, 8, 8)
    net.add_module("attn", nn.MultiheadAttention(16, 2, batch_first=True))
    plan = plan_and_apply(net, x[:1], QATConfig())
    assert plan.sdpa_calls == {"block": 1} and plan.attention_layers == {}  # not called: float
    again = QATPlan.from_dict(plan.to_dict())
    assert again.sdpa_calls == plan.sdpa_calls and again == plan
    torch.manual_seed(5)
    mnet = MhaNet(4)
    mplan = plan_and_apply(mnet, x[:1], QATConfig())
    sd = mnet.state_dict()
    assert PLAN_KEY in sd
    fresh = MhaNet(4)
    apply_plan(fresh, QATPlan.from_dict(mplan.to_dict()))
    fresh.load_state_dict(sd)
    assert isinstance(fresh.attn, QATMultiheadAttention) and get_plan(fresh).attention_layers == {"attn": "MultiHeadAttention"}
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), mnet(x), rtol=0, atol=0)


def test_attention_a_target_measured_wrong_is_replanned_float() -> None:
    """The export preflight's measured re-plan covers MultiheadAttention as the other int8 layers."""
    from lightning_ncnnqat.qat.prepare import measured_float_reasons, replan_as_float

    torch.manual_seed(8)
    net, x = MhaNet(2), torch.randn(2, 3, 8, 8)
    plan_and_apply(net, x[:1], QATConfig())
    reasons = measured_float_reasons(net, {"arm64-a53": {"attn": 0.42}})
    assert "arm64-a53 (cosine 0.420)" in reasons["attn"]
    new = replan_as_float(net, x[:1], reasons)
    assert new.attention_layers == {} and new.float_layers["attn"] == reasons["attn"]
    assert type(net.attn) is nn.MultiheadAttention


def test_transformer_encoder_layer_eval_fast_path_stays_off() -> None:
    """nn.TransformerEncoderLayer's eval fast path reads the attention weights itself; with the QAT
    attention swapped in it must call it, so no-grad evaluation computes what training does."""
    torch.manual_seed(9)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    net = nn.Sequential(nn.Linear(16, 16), layer)
    x = torch.randn(2, 6, 16)
    net.eval()
    with torch.no_grad():
        before = net(x)
    plan = plan_and_apply(net, x[:1], QATConfig())
    assert plan.attention_layers == {"1.self_attn": "MultiHeadAttention"}
    net.eval()
    with torch.no_grad():
        fast = net(x)
    slow = net(x).detach()  # grad enabled: torch's fast path is off anyway
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)
    assert (fast - before).abs().max() > 1e-5
    unprepare(net)
    assert not net[1].self_attn._forward_pre_hooks


def test_skip_naming_an_sdpa_module_keeps_every_sdpa_call_float() -> None:
    torch.manual_seed(10)
    net, x = SdpaNet(), torch.randn(2, 3, 8, 8)
    plan = plan_and_apply(net, x[:1], QATConfig(skip=("block",)))
    assert plan.sdpa_calls == {} and "all together" in plan.float_layers["block:sdpa"]
    assert plan.gemm_layers == {"block.qkv": 3, "block.proj": 3}  # `skip` names the module, not its children
    t = torch.randn(2, 16, 16)
    with torch.no_grad():
        q, k, v = net.block.qkv_heads(t)
        o = F.scaled_dot_product_attention(q, k, v)  # float SDPA between the int8 Gemms
        want = net.block.proj(o.transpose(1, 2).reshape(t.shape))
        torch.testing.assert_close(net.block(t), want, rtol=0, atol=0)
        assert (sdpa_int8(q, k, v) - o).abs().max() > 1e-6  # the int8 call would differ
