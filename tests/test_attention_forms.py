"""Fused-qkv attention (timm's ``Attention`` form) in a form pnnx converts (qat/attention_forms.py).

The module below is written like timm's (fused qkv Linear, 5-D reshape + ``unbind``, SDPA, proj),
without timm: pnnx fails on its 5-D reshape; inside ``export_form`` its forward is the 4-D chunk
form, which computes the same values, converts to one ``SDPA`` layer, and exports with
report.json and no layer flagged. Modules of other computations sharing the attribute names are
left alone (the probe check), and the class's forward is back after the block.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat import QATConfig, export, prepare_qat
from lightning_ncnnqat.conversion.pnnx import convert_with_pnnx
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.qat.attention_forms import FORM_ATTR
from lightning_ncnnqat.qat.export_form import export_form
from lightning_ncnnqat.qat.plan import get_plan


class TimmAttention(nn.Module):
    """timm.layers.attention.Attention's computation (fused or by hand), written for the test."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = False, qk_norm: bool = False, fused: bool = True,
                 twist: float = 1.0) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = fused
        self.twist = twist  # != 1: a different function with the same attributes
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            y = F.scaled_dot_product_attention(q, k * self.twist, v)
        else:
            y = (q * self.scale @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(self.norm(y.transpose(1, 2).reshape(b, n, c)))


class ViTish(nn.Module):
    """Patch stem -> tokens -> pre-norm attention + MLP blocks -> mean -> head."""

    def __init__(self, depth: int = 2, **attn_kw) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, 4)
        self.norms = nn.ModuleList(nn.LayerNorm(16) for _ in range(depth))
        self.attns = nn.ModuleList(TimmAttention(16, 4, **attn_kw) for _ in range(depth))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(depth))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)
        for norm, attn, mlp in zip(self.norms, self.attns, self.mlps):
            t = t + attn(norm(t))
            t = t + mlp(t)
        return self.head(t.mean(1))


@pytest.mark.parametrize("kw", [{}, {"qkv_bias": True}, {"qk_norm": True, "qkv_bias": True}])
def test_form_computes_the_same_outputs_and_is_undone(kw: dict) -> None:
    torch.manual_seed(3)
    m = ViTish(**kw).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = m(x)
        with export_form(m):
            assert all(a.__dict__.get(FORM_ATTR) for a in m.attns)
            got = m(x)
        after = m(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()
    assert torch.equal(after, want)
    assert all("forward" not in a.__dict__ and FORM_ATTR not in a.__dict__ for a in m.attns)


@pytest.mark.parametrize("kw", [{"fused": False}, {"twist": 0.5}])
def test_other_computations_are_left_alone(kw: dict) -> None:
    """By hand (pnnx: MatMul/Softmax, what QAT trains) or a different function: not rewritten."""
    m = ViTish(**kw).eval()
    with export_form(m):
        assert not any("forward" in a.__dict__ for a in m.attns)


def test_pnnx_converts_the_module_in_its_form() -> None:
    """pnnx refuses timm's fused-qkv ``unbind`` attention as written; every trace enters the
    export form first (``conversion/tracing.traceable``), so the converter gets the form whether
    or not the caller entered it, and the module is left as it was."""
    torch.manual_seed(4)
    m = ViTish(qkv_bias=True).eval()
    x = torch.randn(1, 3, 16, 16)
    for res in (convert_with_pnnx(m, x), _in_form(m, x)):
        types = [lay.type for lay in NcnnParam.parse(res.param_text).layers]
        assert types.count("SDPA") == 2 and types.count("Gemm") >= 2, types
    assert all("forward" not in mod.__dict__ for mod in m.modules())


def _in_form(m: nn.Module, x: torch.Tensor):  # noqa: ANN202
    with export_form(m):
        return convert_with_pnnx(m, x)


def test_export_has_int8_sdpa_and_no_flagged_layer(tmp_path: Path) -> None:
    torch.manual_seed(5)
    m, x = ViTish(qk_norm=True), torch.randn(4, 3, 16, 16)
    plan = prepare_qat(m, x[:1], QATConfig(prefer="int8"), targets=["x86"])  # int8 writing, not the speed decision
    assert {"attns.0.qkv", "attns.1.proj"} <= set(plan.gemm_layers) | set(plan.float_layers)
    m.train()
    with torch.no_grad():
        for _ in range(2):
            m(torch.randn(4, 3, 16, 16))
    m.eval()
    report = export(m, tmp_path, x[:1], x, targets=["x86"], verbose=False, timing_runs=0, check_onnx=False)
    assert report.flagged_layers == []
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["flagged_layers"] == []
    param = NcnnParam.parse((tmp_path / "model.int8.param").read_text())
    sdpa = [lay for lay in param.layers if lay.type == "SDPA"]
    assert len(sdpa) == 2 and all(lay.get_int(18, 0) == 2 for lay in sdpa)  # ncnn's int8 SDPA
    assert set(get_plan(m).sdpa_calls) == {"attns.0", "attns.1"}  # QAT trained the calls as ncnn's int8
    assert report.runtime["x86"]["int8_vs_qat"]["cosine"] > 0.999
