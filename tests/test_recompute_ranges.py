"""Activation checkpointing changes memory, not QAT's numbers (D2).

``torch.utils.checkpoint`` runs the checkpointed blocks again during backward, in training mode;
the input ranges (and folded BatchNorm statistics under ``freeze_bn_after``) moved a second time
per step there. ``qat/recompute.py``: a forward inside autograd's backward updates nothing, so a
run with checkpointing (reentrant, non-reentrant, ``checkpoint_sequential``) ends with the
ranges, weights and statistics of the same run without it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

from lightning_ncnnqat import QATConfig, prepare_qat
from lightning_ncnnqat.qat.bn_fold import stats_live
from lightning_ncnnqat.qat.prepared import deepcopy_model, input_quantizers
from lightning_ncnnqat.qat.recompute import recomputing

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


class Block(nn.Module):
    def __init__(self, i: int, o: int, s: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(i, o, 3, s, 1, bias=False)
        self.bn = nn.BatchNorm2d(o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    """Blocks after the first run checkpointed in training per ``mode`` (the first block's input
    needs no grad, which the reentrant form requires of a checkpoint's inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = "none"
        self.blocks = nn.ModuleList([Block(3, 8, 1), Block(8, 16, 2), Block(16, 16, 1), Block(16, 16, 1)])
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks[0](x)
        rest = list(self.blocks[1:])
        if not self.training or self.mode == "none":
            for b in rest:
                x = b(x)
        elif self.mode == "sequential":
            x = checkpoint_sequential(rest, 3, x, use_reentrant=False)
        else:
            for b in rest:
                x = checkpoint(b, x, use_reentrant=self.mode == "reentrant")
        return self.fc(x.mean((2, 3)))


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 8, 8, generator=g) * (1 + i), torch.randint(0, 10, (8,), generator=g))
            for i in range(4)]


@pytest.fixture(scope="module")
def prepared() -> dict[str, nn.Module]:
    """One QAT-prepared model per config (moving-average ranges; and folded BN statistics still
    training, ``freeze_bn_after=1``), copied for each run so every run starts from the same state."""
    out = {}
    for key, cfg in (("ranges", QATConfig(prefer="int8")), ("bn_live", QATConfig(prefer="int8", freeze_bn_after=1))):
        torch.manual_seed(0)
        m = Net()
        prepare_qat(m, _data()[0][0][:2], cfg)
        out[key] = m
    return out


def _train(base: nn.Module, mode: str) -> tuple[nn.Module, list[int]]:
    """Three SGD steps of a copy of ``base`` with checkpointing ``mode``; the copy and how many
    times its input quantizers ran with ``recomputing()`` True (the recomputes)."""
    m = deepcopy_model(base)
    m.mode = mode
    recomputes = [0]
    for q in input_quantizers(m).values():
        q.register_forward_pre_hook(lambda *_: recomputes.__setitem__(0, recomputes[0] + recomputing()))
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    m.train()
    for x, y in _data()[1:]:
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    return m, recomputes


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items() if v.is_floating_point() or "num_batches" in k}


@pytest.mark.parametrize("mode", ["nonreentrant", "reentrant", "sequential"])
@pytest.mark.parametrize("key", ["ranges", "bn_live"])
def test_checkpointed_run_equals_the_plain_run(prepared: dict[str, nn.Module], key: str, mode: str) -> None:
    """Ranges, weights and (live) BN statistics after three steps equal the run without
    checkpointing, while the recomputes did run the quantizers."""
    base = prepared[key]
    assert any(stats_live(b.bn) for b in base.blocks) == (key == "bn_live")
    plain, plain_recomputes = _train(base, "none")
    ckpt, recomputes = _train(base, mode)
    # checkpoint_sequential runs its last segment plainly: 2 of the 3 blocks are checkpointed
    assert plain_recomputes == [0] and recomputes == [6 if mode == "sequential" else 9]
    before = {n: float(q.running_absmax) for n, q in input_quantizers(base).items()}
    after = {n: float(q.running_absmax) for n, q in input_quantizers(plain).items()}
    assert any(abs(after[n] - before[n]) > 1e-3 for n in before), (before, after)  # the ranges did move
    a, b = _state(plain), _state(ckpt)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=lambda s, k=k: f"{k}: {s}")


def test_recomputing_is_false_outside_backward_and_true_in_a_recompute() -> None:
    """The signal itself: False in a forward (training, no_grad, inference_mode), True inside a
    checkpoint's recompute of either form."""
    seen: list[bool] = []
    lin = nn.Linear(4, 4)
    lin.register_forward_pre_hook(lambda *_: seen.append(recomputing()))
    x = torch.randn(2, 4, requires_grad=True)
    lin(x)
    with torch.no_grad():
        lin(x)
    with torch.inference_mode():
        lin(x)
    assert seen == [False] * 3
    for reentrant in (False, True):
        seen.clear()
        checkpoint(lin, x, use_reentrant=reentrant).square().sum().backward()
        assert seen == [False, True], (reentrant, seen)
