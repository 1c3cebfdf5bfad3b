"""MobileViT-style blocks (patches folded into the batch axis) in their export form (qat/patch_forms.py).

The block below unfolds ``[B, C, H, W]`` into ``[B * P, N, C]`` as timm's ``MobileVitBlock`` does
(written for the test, no timm): pnnx drops that ``B * P`` "batch" and the Linears become
InnerProducts over the wrong rows. Inside ``export_form`` the block keeps P as an axis of one
sample: same values, and the export runs every Linear as an int8 Gemm and the attention as int8
SDPA, with no layer flagged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_ncnnqat import QATConfig, export, prepare_qat
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.qat.export_form import export_form
from lightning_ncnnqat.qat.patch_forms import PATCH_FORM_ATTR
from test_attention_forms import TimmAttention


class Block(nn.Module):
    """Pre-norm transformer block (timm's vision_transformer.Block, without layer scale)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = TimmAttention(dim, heads, qkv_bias=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MobileVitish(nn.Module):
    """timm MobileVitBlock's computation: local convs, unfold to [B*P, N, C], transformer, fold, fuse."""

    def __init__(self, chs: int = 8, dim: int = 16, patch: int = 2, depth: int = 1, fusion: bool = True) -> None:
        super().__init__()
        self.conv_kxk = nn.Sequential(nn.Conv2d(chs, chs, 3, padding=1), nn.BatchNorm2d(chs), nn.SiLU())
        self.conv_1x1 = nn.Conv2d(chs, dim, 1, bias=False)
        self.transformer = nn.Sequential(*[Block(dim, 2) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.conv_proj = nn.Conv2d(dim, chs, 1)
        self.conv_fusion = nn.Conv2d(2 * chs, chs, 3, padding=1) if fusion else None
        self.patch_size = (patch, patch)
        self.patch_area = patch * patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_1x1(self.conv_kxk(x))
        ph, pw = self.patch_size
        b, c, h, w = x.shape
        nh, nw = h // ph, w // pw
        x = x.reshape(b * c * nh, ph, nw, pw).transpose(1, 2)
        x = x.reshape(b, c, nh * nw, self.patch_area).transpose(1, 3).reshape(b * self.patch_area, nh * nw, -1)
        x = self.norm(self.transformer(x))
        x = x.contiguous().view(b, self.patch_area, nh * nw, -1).transpose(1, 3).reshape(b * c * nh, nw, ph, pw)
        x = self.conv_proj(x.transpose(1, 2).reshape(b, c, h, w))
        return self.conv_fusion(torch.cat((shortcut, x), 1)) if self.conv_fusion is not None else x


class Net(nn.Module):
    def __init__(self, **kw) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.block = MobileVitish(**kw)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("kw", [{}, {"patch": 4, "depth": 2, "fusion": False}])
def test_patch_form_computes_the_same_outputs(kw: dict) -> None:
    torch.manual_seed(6)
    m = Net(**kw).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = m(x)
        with export_form(m):
            assert m.block.__dict__.get(PATCH_FORM_ATTR)
            assert all("forward" in b.attn.__dict__ for b in m.block.transformer)
            got = m(x)
        assert torch.equal(m(x), want)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()
    assert all("forward" not in mod.__dict__ for mod in m.modules())


def test_patch_form_exports_gemms_and_sdpa_in_int8(tmp_path: Path) -> None:
    torch.manual_seed(7)
    m, x = Net(), torch.randn(4, 3, 16, 16)
    plan = prepare_qat(m, x[:1], QATConfig(prefer="int8"), targets=["x86"])  # int8 writing, not the speed decision
    assert {"block.transformer.0.attn.qkv", "block.transformer.0.mlp.0"} <= set(plan.gemm_layers)
    m.train()
    with torch.no_grad():
        for _ in range(2):
            m(torch.randn(4, 3, 16, 16))
    m.eval()
    report = export(m, tmp_path, x[:1], x, targets=["x86"], verbose=False, timing_runs=0, check_onnx=False)
    assert report.flagged_layers == [] and json.loads((tmp_path / "report.json").read_text())["flagged_layers"] == []
    param = NcnnParam.parse((tmp_path / "model.int8.param").read_text())
    assert [lay.get_int(18, 0) for lay in param.layers if lay.type == "SDPA"] == [2]
    assert sum(lay.type == "Gemm" and lay.get_int(18, 0) == 2 for lay in param.layers) == 4
    assert report.runtime["x86"]["int8_vs_qat"]["cosine"] > 0.999
