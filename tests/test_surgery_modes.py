"""Training-mode vs eval-mode graphs: eval-only layers stay float (no range), training-only are not exported."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat import prepare_qat
from lightning_ncnnqat.qat.graph import trace_call
from lightning_ncnnqat.qat.prepare import EVAL_ONLY
from lightning_ncnnqat.qat.prepared import check_ranges


class DetectLike(nn.Module):
    """Like a YOLO head: training returns raw maps; eval also decodes them through a fixed conv
    (ultralytics' DFL) and a Linear, and an auxiliary head runs only in training."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, 16, 1)
        self.dfl = nn.Conv2d(16, 1, 1, bias=False).requires_grad_(False)
        self.decode_fc = nn.Linear(16, 4)
        self.aux = nn.Conv2d(8, 2, 1)
        self.drop = nn.Dropout(0.5)
        self.unused = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor):  # noqa: ANN201
        f = self.stem(x)
        y = self.head(self.drop(f))
        if self.training:
            return y, self.aux(f)
        return self.dfl(y.softmax(1)), self.decode_fc(y.mean((2, 3)))


def test_eval_only_layers_stay_float_and_training_only_layers_are_not_exported() -> None:
    torch.manual_seed(0)
    m = DetectLike()
    plan = prepare_qat(m, torch.randn(2, 3, 8, 8))
    assert set(plan.layers) == {"stem.0", "head"}
    assert plan.float_layers["dfl"] == EVAL_ONLY and plan.float_layers["decode_fc"] == EVAL_ONLY
    assert "runs only in training" in plan.float_layers["aux"]
    assert plan.float_layers["unused"] == "not called in the traced forward"
    assert "runs only in eval mode" in plan.summary()
    # every quantized layer gets its range from a training step, so the export never meets an
    # uninitialised range
    m.train()
    m(torch.randn(4, 3, 8, 8))
    check_ranges(m, require_initialized=True)


def test_training_trace_leaves_no_trace() -> None:
    torch.manual_seed(0)
    m = DetectLike()
    m.stem[1].momentum = 0.9
    m.eval()
    buffers = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    rng = torch.get_rng_state()
    flow = trace_call(m, (x,), {}, training=True)
    assert flow.module_calls("aux") and not flow.module_calls("dfl")
    assert torch.equal(torch.get_rng_state(), rng)  # dropout consumed nothing
    assert not m.training and not m.stem[1].training
    for k, v in m.state_dict().items():
        assert torch.equal(v, buffers[k]), k  # BN statistics and counters untouched


def test_training_trace_failure_is_a_note_not_an_error() -> None:
    class EvalOnlyForward(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                raise RuntimeError("needs targets in training")
            return F.relu(self.c(x))

    plan = prepare_qat(EvalOnlyForward(), torch.randn(2, 3, 4, 4))
    assert set(plan.layers) == {"c"}
    assert "training-mode forward failed" in plan.notes["(training forward)"]
    assert "needs targets" in plan.summary()
