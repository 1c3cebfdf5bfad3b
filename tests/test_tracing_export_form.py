"""Export forms are entered before a trace starts, never inside it.

A form checks itself numerically on random probes when it is entered (``qat/checked_forms.py``)
and a user's ``ncnn_export_form()`` may compute anything. Entered inside the traced forward
(``FlatModel.forward`` enters the form too) those probes were recorded into the graph: timm's
mobilevit_xxs traced with 24 ``randn`` and 45 SDPA nodes instead of 0 and 9, and the QAT start's
pnnx probe (``export/attention_fusion.py``) worked on that graph for its whole time limit.
``conversion/tracing.traceable`` (every trace: pnnx, ONNX) enters the form first.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from lightning_ncnnqat.conversion.model_io import FlatModel, model_io
from lightning_ncnnqat.conversion.tracing import traceable
from lightning_ncnnqat.export.attention_fusion import find_converter_units
from test_attention_forms_patches import Net as PatchNet

torch.set_num_threads(1)


class ProbingForm(nn.Module):
    """A user's module whose ``ncnn_export_form()`` runs a random probe when entered."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.entered = 0

    @contextlib.contextmanager
    def ncnn_export_form(self):  # noqa: ANN201
        probe = torch.randn(1, 3, 4, 4)
        assert torch.isfinite(self.conv(probe)).all()
        self.entered += 1
        yield

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean((2, 3))


def _traced_kinds(model: nn.Module, x: torch.Tensor) -> list[str]:
    flat = FlatModel(model, model_io(model, x))
    with torch.no_grad(), traceable(flat):
        traced = torch.jit.trace(flat, (x,), check_trace=False)
    return [n.kind() for n in traced.inlined_graph.nodes()]


def test_a_user_form_with_a_probe_is_not_traced() -> None:
    m = ProbingForm().eval()
    kinds = _traced_kinds(m, torch.randn(1, 3, 8, 8))
    assert "aten::randn" not in kinds and m.entered >= 1
    assert kinds.count("aten::_convolution") == 1


def test_checked_patch_forms_trace_only_the_model() -> None:
    for kw in ({}, {"patch": 4, "depth": 2, "fusion": False}):
        torch.manual_seed(0)
        m = PatchNet(**kw).eval()
        kinds = _traced_kinds(m, torch.randn(1, 3, 16, 16))
        assert "aten::randn" not in kinds and "aten::rand" not in kinds
        assert kinds.count("aten::scaled_dot_product_attention") == kw.get("depth", 1)


def test_fusion_probe_on_a_form_model_takes_seconds() -> None:
    torch.manual_seed(0)
    m = PatchNet(depth=2).eval()
    t0 = time.perf_counter()
    units = find_converter_units(m, torch.randn(2, 3, 16, 16))
    assert units == {}  # timm-style fused qkv: nothing pnnx turns into a MultiHeadAttention here
    assert time.perf_counter() - t0 < 120
