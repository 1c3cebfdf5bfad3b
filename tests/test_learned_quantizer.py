"""InputQuantizer(learned=True): a trainable log-threshold (TQT / LSQ) beside the moving average.

The threshold the table carries (``running_absmax``) must always be exactly the value the
training forward used, ``exp(log_threshold)`` in float32; the default quantizer must not change.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from lightning_ncnnqat.qat.modules import InputQuantizer, QATConv2d
from lightning_ncnnqat.ops import reference as R

torch.set_num_threads(1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_invariant(q: InputQuantizer) -> None:
    """running_absmax == exp(log_threshold) bit for bit (-1 while NaN)."""
    lt = q.log_threshold
    want = torch.where(torch.isnan(lt), torch.full_like(lt, -1.0), torch.exp(lt))
    assert torch.equal(q.running_absmax, want), (q.running_absmax, lt, want)


def test_default_quantizer_unchanged() -> None:
    q = InputQuantizer()
    assert list(q.state_dict()) == ["running_absmax"]
    assert not q.learned and "learned=False" in repr(q)
    x = torch.randn(4, 8, generator=gen(0)) * 3
    y = q(x)
    assert q.running_absmax.item() == R.finite_absmax(x).item()
    assert torch.equal(y, R.fake_quantize_per_tensor(x, q.running_absmax, 8))
    for method in (q.threshold_leaf, q.commit_threshold, lambda: q.set_threshold(1.0)):
        with pytest.raises(RuntimeError, match="not learned"):
            method()


def test_learned_buffers_and_repr() -> None:
    q = InputQuantizer(bits=6, learned=True)
    sd = q.state_dict()
    assert sorted(sd) == ["log_threshold", "running_absmax"]
    assert sd["log_threshold"].dtype == torch.float32 and sd["log_threshold"].shape == (1,)
    assert torch.isnan(sd["log_threshold"]).all() and sd["running_absmax"].item() == -1.0
    assert "learned=True" in repr(q) and "bits=6" in repr(q)
    leaf = q.threshold_leaf()
    assert leaf.is_leaf and leaf.requires_grad and leaf.dtype == torch.float32 and leaf.shape == (1,)
    assert leaf is q.threshold_leaf()
    assert not any(t is leaf for t in q.parameters()) and not any(t is leaf for t in q.buffers())


def test_set_threshold_keeps_exp_of_log() -> None:
    q = InputQuantizer(learned=True)
    leaf = q.threshold_leaf()
    for t in (0.37, 1.0, 6.25, 1e-3, 123.456, torch.tensor([2.5])):
        q.set_threshold(t)
        tv = torch.as_tensor(t, dtype=torch.float32).reshape(1)
        assert torch.equal(q.log_threshold, torch.log(tv))
        assert_invariant(q)
        assert q.threshold_leaf() is leaf and torch.equal(leaf.detach(), q.log_threshold)
        assert math.isclose(q.running_absmax.item(), float(tv), rel_tol=1e-6)
        assert q.scale() == pytest.approx(127.0 / float(tv), rel=1e-6)
    for bad in (0.0, -1.0, math.inf, math.nan, torch.tensor([1.0, 2.0])):
        with pytest.raises(ValueError, match="set_threshold: `t` must be one finite float > 0"):
            q.set_threshold(bad)


def test_first_training_batch_initialises_and_forward_uses_the_table_value() -> None:
    q = InputQuantizer(learned=True).train()
    x = torch.randn(2, 3, 8, 8, generator=gen(1)) * 2.5
    y = q(x)
    b = R.finite_absmax(x).reshape(1)
    assert torch.equal(q.log_threshold, torch.log(b))
    assert_invariant(q)
    assert y.requires_grad  # the threshold leaf is in the graph
    assert torch.equal(y.detach(), R.fake_quantize_per_tensor(x, q.running_absmax, 8))
    q.eval()
    assert torch.equal(q(x), y.detach())


def test_uninitialised_reader_all_zero_batch_and_eval_pass_through() -> None:
    q = InputQuantizer(learned=True).train()
    x = torch.randn(5, 7, generator=gen(2))
    assert torch.equal(q(x, update=False), x)  # a non-first reader never initialises
    assert q.running_absmax.item() == -1.0
    assert torch.equal(q(torch.zeros(3, 4)), torch.zeros(3, 4))  # an all-zero batch: stays uninitialised
    assert q.running_absmax.item() == -1.0 and torch.isnan(q.log_threshold).all()
    q.eval()
    assert torch.equal(q(x), x)
    q.train()
    q(x)
    assert q.running_absmax.item() > 0
    assert_invariant(q)


def test_commit_after_optimizer_step() -> None:
    q = InputQuantizer(learned=True).train()
    x = torch.randn(64, 16, generator=gen(3)) * 2
    q(x)
    leaf = q.threshold_leaf()
    opt = torch.optim.SGD([leaf], lr=0.05)
    before = q.running_absmax.clone()
    target = torch.randn(64, 16, generator=gen(4))
    loss = ((q(x) - target) ** 2).mean()
    loss.backward()
    assert leaf.grad is not None and leaf.grad.abs().item() > 0
    opt.step()
    assert torch.equal(q.running_absmax, before)  # nothing moves before the commit
    q.commit_threshold()
    assert torch.equal(q.log_threshold, leaf.detach())
    assert_invariant(q)
    assert not torch.equal(q.running_absmax, before)
    # The training forward (exp of the leaf) and the eval forward (the table value) agree bit for bit.
    y_train = q(x).detach()
    q.eval()
    assert torch.equal(q(x), y_train)


def test_commit_before_initialisation_keeps_uninitialised() -> None:
    q = InputQuantizer(learned=True)
    q.commit_threshold()  # no leaf yet: nothing
    q.threshold_leaf()
    q.commit_threshold()  # a NaN leaf: still -1
    assert q.running_absmax.item() == -1.0 and torch.isnan(q.log_threshold).all()


def test_shared_quantizer_every_reader_contributes_gradient() -> None:
    q = InputQuantizer(learned=True).train()
    x1 = torch.randn(32, 8, generator=gen(5)) * 2
    x2 = torch.randn(32, 8, generator=gen(6)) * 3
    g1 = torch.randn(32, 8, generator=gen(7))
    g2 = torch.randn(32, 8, generator=gen(8))
    q(x1)  # initialise
    leaf = q.threshold_leaf()
    grads = []
    for readers in ((True,), (False,), (True, False)):
        leaf.grad = None
        loss = 0
        if True in readers:
            loss = loss + (q(x1, update=True) * g1).sum()
        if False in readers:
            loss = loss + (q(x2, update=False) * g2).sum()
        loss.backward()
        grads.append(leaf.grad.clone())
    assert grads[0].abs().item() > 0 and grads[1].abs().item() > 0
    assert torch.allclose(grads[2], grads[0] + grads[1], rtol=1e-5, atol=1e-7)
    # A reader's gradient is exp(log t) * d/dt of the op.
    t = q.running_absmax
    _, gt = torch.ops.ncnnqat.fake_quantize_per_tensor_threshold_backward(g2, x2, t, 8)
    assert torch.allclose(grads[1], gt * t, rtol=1e-5)


class TinyNet(nn.Module):
    """conv (QAT layer with a learned input threshold) -> relu -> linear head on 16x16 inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        conv = nn.Conv2d(3, 8, 3, padding=1)
        conv.__class__ = QATConv2d  # the swap prepare does
        conv.input_quantizer = InputQuantizer(bits=4, learned=True)
        conv.weight_bits, conv.weight_groups, conv.updates_range = 8, 8, True
        self.conv = conv
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("optim", ["sgd", "adam"])
@pytest.mark.parametrize("start", [0.15, 6.0], ids=["clipping", "coarse"])
def test_training_moves_threshold_and_lowers_loss(start: float, optim: str) -> None:
    """Weights frozen, only the log-threshold trains (4-bit input) toward the float conv's output:
    from a threshold that clips most values it grows, from a far too coarse one it shrinks,
    and the quantization error falls either way."""
    conv = TinyNet().train().conv
    float_conv = nn.Conv2d(3, 8, 3, padding=1)
    float_conv.load_state_dict({k: v for k, v in conv.state_dict().items() if k in ("weight", "bias")})
    for p in conv.parameters():
        p.requires_grad_(False)
    x = torch.randn(16, 3, 16, 16, generator=gen(9))
    with torch.no_grad():
        target = float_conv(x)
    q = conv.input_quantizer
    conv(x)  # initialise from the batch absmax
    q.set_threshold(q.running_absmax * start)
    first = q.running_absmax.item()
    leaf = q.threshold_leaf()
    opt = torch.optim.SGD([leaf], lr=0.5) if optim == "sgd" else torch.optim.Adam([leaf], lr=0.1)
    losses = []
    for _ in range(25):
        loss = ((conv(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        q.commit_threshold()
        assert_invariant(q)
        losses.append(loss.item())
    final = ((conv(x) - target) ** 2).mean().item()
    last = q.running_absmax.item()
    assert (last > 1.5 * first) if start < 1 else (last < 0.5 * first), (first, last)
    assert final < 0.3 * losses[0], losses


def test_state_dict_round_trip_restores_the_same_forward() -> None:
    net = TinyNet().train()
    x = torch.randn(4, 3, 16, 16, generator=gen(10)) * 2
    net(x)
    q = net.conv.input_quantizer
    leaf = q.threshold_leaf()
    with torch.no_grad():
        leaf.add_(-0.3)
    q.commit_threshold()
    sd = copy.deepcopy(net.state_dict())
    assert "conv.input_quantizer.log_threshold" in sd
    other = TinyNet()
    other_leaf = other.conv.input_quantizer.threshold_leaf()  # made before the load: must stay valid
    other.load_state_dict(sd, strict=True)
    oq = other.conv.input_quantizer
    assert oq.threshold_leaf() is other_leaf and torch.equal(other_leaf.detach(), q.log_threshold)
    assert torch.equal(oq.running_absmax, q.running_absmax) and torch.equal(oq.log_threshold, q.log_threshold)
    for mode in ("train", "eval"):
        getattr(net, mode)()
        getattr(other, mode)()
        assert torch.equal(net(x), other(x)), mode
    # A fresh module (no leaf yet) loads too, and its leaf starts at the loaded value.
    fresh = TinyNet()
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.conv.input_quantizer.threshold_leaf().detach(), q.log_threshold)
    fresh.train()
    net.train()
    assert torch.equal(fresh(x), net(x))


def test_load_moving_average_checkpoint_into_learned() -> None:
    """A checkpoint without log_threshold (a moving-average run) starts the learned threshold from its range."""
    ma = InputQuantizer().train()
    ma(torch.randn(100, generator=gen(11)) * 3)
    learned = InputQuantizer(learned=True)
    learned.load_state_dict(ma.state_dict(), strict=True)
    assert torch.equal(learned.log_threshold, torch.log(ma.running_absmax))
    assert_invariant(learned)
    assert math.isclose(learned.running_absmax.item(), ma.running_absmax.item(), rel_tol=1e-6)
    fresh = InputQuantizer(learned=True)
    fresh.load_state_dict(InputQuantizer().state_dict())  # uninitialised stays uninitialised
    assert fresh.running_absmax.item() == -1.0 and torch.isnan(fresh.log_threshold).all()


def test_load_re_derives_running_absmax_from_log_threshold() -> None:
    q = InputQuantizer(learned=True)
    q.set_threshold(3.0)
    sd = q.state_dict()
    sd["running_absmax"] = torch.tensor([999.0])  # inconsistent: log_threshold is the truth
    other = InputQuantizer(learned=True)
    other.load_state_dict(sd)
    assert torch.equal(other.running_absmax, q.running_absmax)
    assert_invariant(other)


def test_leaf_recreated_when_buffer_replaced_and_deepcopy() -> None:
    q = InputQuantizer(learned=True)
    q.set_threshold(2.0)
    leaf = q.threshold_leaf()
    clone = copy.deepcopy(q)
    assert clone.threshold_leaf() is not leaf and torch.equal(clone.threshold_leaf().detach(), leaf.detach())
    q._apply(lambda t: t.clone())  # what a move to another device does to the buffers
    new = q.threshold_leaf()
    assert new is not leaf and torch.equal(new.detach(), q.log_threshold) and new.requires_grad
    x = torch.randn(50, generator=gen(12)) * 2
    q.train()
    y = q(x)
    y.sum().backward()
    assert new.grad is not None and leaf.grad is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_and_autocast(dtype: torch.dtype) -> None:
    """float16/bfloat16 activations: the output keeps their dtype, the leaf's gradient is float32."""
    conv = TinyNet().train().conv
    x = (torch.randn(2, 3, 16, 16, generator=gen(13)) * 2).to(dtype).requires_grad_()
    q = conv.input_quantizer
    y = q(x)
    assert y.dtype == dtype and torch.equal(y.detach(), R.fake_quantize_per_tensor(x.detach(), q.running_absmax, 4))
    (y.float() * torch.randn(y.shape, generator=gen(14))).sum().backward()
    leaf = q.threshold_leaf()
    assert leaf.grad.dtype == torch.float32 and torch.isfinite(leaf.grad).all() and leaf.grad.abs().item() > 0
    assert x.grad.dtype == dtype
    leaf.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x.detach().float())
    out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16 and leaf.grad.dtype == torch.float32 and leaf.grad.abs().item() > 0


def _boundary_inputs(scale: Tensor, qmax: float) -> Tensor:
    """Values x with float32(x * scale) exactly k + 0.5 or the float just below/above it (both signs):
    one ulp more or less in the scale rounds some of them the other way."""
    k = torch.arange(0, int(qmax), dtype=torch.float32) + 0.5
    targets = torch.cat([k, torch.nextafter(k, torch.zeros_like(k)), torch.nextafter(k, torch.full_like(k, 1e9))])
    targets = torch.cat([targets, -targets])
    x = (targets.double() / scale.double()).float()
    return x[(x * scale) == targets]


def test_torch_compile_uses_the_table_threshold_bit_for_bit() -> None:
    """Inductor's own exp differs from ATen's in the last bit for some inputs; the learned forward's
    exp is the opaque ncnnqat::threshold_from_log, so compiled it still quantizes with exactly the
    running_absmax the table carries."""
    plain = torch.compile(lambda t: t.exp())
    logs = torch.log(torch.rand(3000, generator=gen(20), dtype=torch.float64) * 20 + 0.05).float()
    differ = [
        v.reshape(1) for v in logs
        if not torch.equal(R.scale_from_absmax(plain(v.reshape(1)), 8), R.scale_from_absmax(v.reshape(1).exp(), 8))
    ][:6]
    if not differ:
        pytest.skip("inductor's exp gives ATen's scales on all 3000 inputs (nothing to tell apart)")
    q = InputQuantizer(learned=True).train()
    q(torch.randn(64, generator=gen(21)))
    compiled = torch.compile(q)
    told_apart = 0
    for v in differ:
        with torch.no_grad():
            q.threshold_leaf().copy_(v)
        q.commit_threshold()
        assert torch.equal(q.log_threshold, v)
        x = _boundary_inputs(R.scale_from_absmax(q.running_absmax, 8), 127.0)
        assert x.numel() > 200
        want = R.fake_quantize_per_tensor(x, q.running_absmax, 8)
        # Would the plain exp's threshold quantize some of these differently? (the test's power)
        told_apart += not torch.equal(R.fake_quantize_per_tensor(x, plain(v), 8), want)
        assert torch.equal(compiled(x).detach(), want), float(v)
    assert told_apart > 0
