"""ultralytics-style feature-map attention (YOLO11's C2PSA) as one int8 SDPA (qat/conv_attention_forms.py).

The module below computes as ultralytics' ``nn.modules.block.Attention`` (written for the test, no
ultralytics): attention by hand on ``[B, C, H, W]``, which pnnx writes as float MatMuls. In the
export form it is one SDPA with the same values, the plan trains it as ncnn's int8 SDPA (in
training too: ``qat.training_forms``), and the export writes it in int8 with no layer flagged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_ncnnqat import QATConfig, export, prepare_qat
from lightning_ncnnqat.conversion.pnnx import convert_with_pnnx
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.qat.conv_attention_forms import CONV_ATTENTION_FORM_ATTR
from lightning_ncnnqat.qat.export_form import export_form
from lightning_ncnnqat.qat.prepare import unprepare
from lightning_ncnnqat.qat.training_forms import TRAIN_FORM


class ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class FeatureAttention(nn.Module):
    def __init__(self, dim: int, heads: int, attn_ratio: float = 0.5) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.key_dim = int(self.head_dim * attn_ratio)
        self.scale = self.key_dim ** -0.5
        self.qkv = ConvBN(dim, dim + 2 * self.key_dim * heads)
        self.proj = ConvBN(dim, dim)
        self.pe = ConvBN(dim, dim, 3, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).view(b, self.num_heads, 2 * self.key_dim + self.head_dim, h * w).split(
            [self.key_dim, self.key_dim, self.head_dim], dim=2)
        attn = ((q * self.scale).transpose(-2, -1) @ k).softmax(dim=-1)
        return self.proj((v @ attn.transpose(-2, -1)).view(b, c, h, w) + self.pe(v.reshape(b, c, h, w)))


class Net(nn.Module):
    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.SiLU())
        self.attn = FeatureAttention(16, heads)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x)
        return self.head((t + self.attn(t)).mean((2, 3)))


def _warm(m: nn.Module) -> None:
    m.train()
    with torch.no_grad():
        m(torch.randn(8, 3, 16, 16))
    m.eval()


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_conv_attention_form_computes_the_same_and_converts_to_sdpa(heads: int) -> None:
    torch.manual_seed(13)
    m = Net(heads)
    _warm(m)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = m(x)
        with export_form(m):
            assert m.attn.__dict__.get(CONV_ATTENTION_FORM_ATTR)
            got = m(x)
            types = [lay.type for lay in NcnnParam.parse(convert_with_pnnx(m, x[:1]).param_text).layers]
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()
    assert types.count("SDPA") == 1 and "MatMul" not in types, types
    assert "forward" not in m.attn.__dict__


def test_conv_attention_trains_and_exports_as_int8_sdpa(tmp_path: Path) -> None:
    torch.manual_seed(14)
    m, x = Net(), torch.randn(4, 3, 16, 16)
    _warm(m)
    plan = prepare_qat(m, x[:1], QATConfig(prefer="int8"), targets=["x86"])  # int8 writing, not the speed decision
    assert set(plan.sdpa_calls) == {"attn"} and m.attn.__dict__.get(TRAIN_FORM)
    m.train()
    with torch.no_grad():
        for _ in range(2):
            m(torch.randn(4, 3, 16, 16))
    m.eval()
    report = export(m, tmp_path, x[:1], x, targets=["x86"], verbose=False, timing_runs=0, check_onnx=False)
    assert report.flagged_layers == [] and json.loads((tmp_path / "report.json").read_text())["flagged_layers"] == []
    param = NcnnParam.parse((tmp_path / "model.int8.param").read_text())
    assert [lay.get_int(18, 0) for lay in param.layers if lay.type == "SDPA"] == [2]
    assert report.runtime["x86"]["int8_vs_qat"]["cosine"] > 0.999
    unprepare(m)
    assert "forward" not in m.attn.__dict__
