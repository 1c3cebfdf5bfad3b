"""LeViT-style token grids in their export form (qat/grid_forms.py), without timm.

The modules below compute as timm's ``levit.Attention`` (attention by hand with a learned bias
table), ``levit.AttentionDownsample`` (queries from a strided subsample) and ``levit.Downsample``
(``x.view(B, R, R, C)[:, ::s, ::s]``): pnnx cannot convert the strided slice, and writes the
attention as float MatMuls. Inside ``export_form`` they compute the same values as a 1x1 strided
max pool and one SDPA with the bias as its mask, which the export writes in int8, no layer flagged.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_ncnnqat import QATConfig, export, prepare_qat
from lightning_ncnnqat.conversion.pnnx import convert_with_pnnx
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.qat.export_form import export_form
from lightning_ncnnqat.qat.grid_forms import GRID_FORM_ATTR


def _bias_idxs(rq: int, rk: int, stride: int) -> torch.Tensor:
    """LeViT's bias index: one table entry per (|dy|, |dx|) offset between a query and a key."""
    offsets: dict[tuple[int, int], int] = {}
    idxs = []
    for qy, qx in itertools.product(range(0, rk, stride), range(0, rk, stride)):
        for ky, kx in itertools.product(range(rk), range(rk)):
            idxs.append(offsets.setdefault((abs(qy - ky), abs(qx - kx)), len(offsets)))
    return torch.tensor(idxs).view(rq * rq, rk * rk)


class Subsample(nn.Module):
    def __init__(self, stride: int, resolution: int) -> None:
        super().__init__()
        self.stride, self.resolution, self.pool = stride, resolution, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        return x.view(b, self.resolution, self.resolution, c)[:, :: self.stride, :: self.stride].reshape(b, -1, c)


class BiasedAttention(nn.Module):
    """levit.Attention (use_conv=False), or AttentionDownsample when ``stride`` > 1."""

    def __init__(self, dim: int, heads: int, key_dim: int, resolution: int, stride: int = 1) -> None:
        super().__init__()
        self.num_heads, self.key_dim, self.val_dim = heads, key_dim, 2 * key_dim
        self.scale, self.use_conv = key_dim ** -0.5, False
        if stride == 1:
            self.qkv = nn.Linear(dim, heads * (2 * key_dim + self.val_dim))
        else:
            self.kv = nn.Linear(dim, heads * (key_dim + self.val_dim))
            self.q = nn.Sequential(Subsample(stride, resolution), nn.Linear(dim, heads * key_dim))
        self.proj = nn.Sequential(nn.Hardswish(), nn.Linear(heads * self.val_dim, dim))
        rq = (resolution - 1) // stride + 1
        idxs = _bias_idxs(rq, resolution, stride)
        self.attention_biases = nn.Parameter(torch.randn(heads, int(idxs.max()) + 1) * 0.5)
        self.register_buffer("attention_bias_idxs", idxs, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], 3)
            q = q.permute(0, 2, 1, 3)
        else:
            k, v = self.kv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.val_dim], 3)
            q = self.q(x).view(b, -1, self.num_heads, self.key_dim).permute(0, 2, 1, 3)
        attn = q @ k.permute(0, 2, 3, 1) * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        y = attn.softmax(-1) @ v.permute(0, 2, 1, 3)
        return self.proj(y.transpose(1, 2).reshape(b, -1, self.num_heads * self.val_dim))


class LinearNorm(nn.Module):
    """levit.LinearNorm: Linear, then BatchNorm1d over the tokens folded into the batch."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


class NormedTokens(nn.Module):
    """Stem -> tokens -> LinearNorm MLP with a residual -> biased attention over LinearNorm qkv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, 4)
        self.ln1, self.ln2 = LinearNorm(16, 32), LinearNorm(32, 16)
        self.attn = BiasedAttention(16, 2, 8, 4)
        self.attn.qkv = LinearNorm(16, self.attn.qkv.out_features)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)
        t = t + self.ln2(nn.functional.hardswish(self.ln1(t)))
        return self.head((t + self.attn(t)).mean(1))


class LeVitish(nn.Module):
    """Conv stem -> 4x4 token grid -> biased attention -> attention downsample -> subsample -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 4, 4), nn.Hardswish())
        self.attn = BiasedAttention(16, 2, 8, 4)
        self.down = BiasedAttention(16, 2, 8, 4, stride=2)
        self.sub = Subsample(2, 2)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)
        t = t + self.attn(t)
        return self.head(self.sub(self.down(t)).mean(1))


def test_grid_forms_compute_the_same_outputs() -> None:
    torch.manual_seed(8)
    m = LeVitish().eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = m(x)
        with export_form(m):
            assert all(mod.__dict__.get(GRID_FORM_ATTR) for mod in (m.attn, m.down, m.down.q[0], m.sub))
            got = m(x)
        assert torch.equal(m(x), want)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()
    assert all("forward" not in mod.__dict__ for mod in m.modules())


@pytest.mark.parametrize("stride, resolution", [(2, 5), (3, 4)])
def test_subsample_form_on_other_grids(stride: int, resolution: int) -> None:
    m = Subsample(stride, resolution)
    x = torch.randn(2, resolution * resolution, 6)
    want = m(x)
    with export_form(m):
        assert torch.equal(m(x), want)


def test_pnnx_converts_the_grid_forms() -> None:
    torch.manual_seed(9)
    m, x = LeVitish().eval(), torch.randn(1, 3, 16, 16)
    # the strided slice pnnx refuses as written: the converter enters the export form itself
    for entered in (False, True):
        if entered:
            with export_form(m):
                res = convert_with_pnnx(m, x)
        else:
            res = convert_with_pnnx(m, x)
        types = [lay.type for lay in NcnnParam.parse(res.param_text).layers]
        assert types.count("SDPA") == 2 and types.count("Pooling") == 2 and "MatMul" not in types, types
    assert all("forward" not in mod.__dict__ for mod in m.modules())


def test_grid_forms_export_int8_sdpa_with_no_flagged_layer(tmp_path: Path) -> None:
    torch.manual_seed(10)
    m, x = LeVitish(), torch.randn(4, 3, 16, 16)
    plan = prepare_qat(m, x[:1], QATConfig(prefer="int8"), targets=["x86"])  # int8 writing, not the speed decision
    assert set(plan.sdpa_calls) == {"attn", "down"}
    m.train()
    with torch.no_grad():
        for _ in range(2):
            m(torch.randn(4, 3, 16, 16))
    m.eval()
    report = export(m, tmp_path, x[:1], x, targets=["x86"], verbose=False, timing_runs=0, check_onnx=False)
    assert report.flagged_layers == [] and json.loads((tmp_path / "report.json").read_text())["flagged_layers"] == []
    param = NcnnParam.parse((tmp_path / "model.int8.param").read_text())
    assert [lay.get_int(18, 0) for lay in param.layers if lay.type == "SDPA"] == [2, 2]
    assert report.runtime["x86"]["int8_vs_qat"]["cosine"] > 0.999


def test_linear_norm_form_converts_to_the_same_float_model(tmp_path: Path) -> None:
    """pnnx writes ``bn(x.flatten(0, 1)).reshape_as(x)`` with one token (then ncnn's SDPA never
    returns); in the form, ncnn's float model computes what PyTorch does."""
    import ncnn
    import numpy as np

    torch.manual_seed(11)
    m = NormedTokens().train()
    with torch.no_grad():
        m(torch.randn(8, 3, 16, 16))  # BatchNorm statistics off their init
    m.eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad(), export_form(m):
        assert all(mod.__dict__.get(GRID_FORM_ATTR) for mod in (m.ln1, m.ln2, m.attn.qkv, m.attn))
        want = m(x).numpy().ravel()
        res = convert_with_pnnx(m, x)
    (tmp_path / "f.param").write_text(res.param_text)
    (tmp_path / "f.bin").write_bytes(res.bin_bytes)
    net = ncnn.Net()
    net.opt.num_threads, net.opt.use_packing_layout = 1, False
    net.load_param(str(tmp_path / "f.param"))
    net.load_model(str(tmp_path / "f.bin"))
    ex = net.create_extractor()
    image = x[0].numpy().copy()  # ncnn.Mat shares this memory: it must outlive the extraction
    ex.input("in0", ncnn.Mat(image))
    got = np.array(ex.extract("out0")[1]).ravel()
    cos = float(got @ want / np.linalg.norm(got) / np.linalg.norm(want))
    assert cos > 0.99999 and np.abs(got - want).max() < 1e-3 * np.abs(want).max(), (cos, got, want)


def test_attention_by_hand_trains_as_its_int8_sdpa_and_unprepare_restores_it() -> None:
    """The plan runs LeViT's attention as ncnn's int8 SDPA (its export form); training runs the
    same form, so QAT trains what ncnn runs. ``unprepare`` gives back the module's own forward."""
    from lightning_ncnnqat.qat.prepare import unprepare
    from lightning_ncnnqat.qat.training_forms import TRAIN_FORM

    torch.manual_seed(12)
    m, x = LeVitish(), torch.randn(4, 3, 16, 16)
    t = m.stem(x).flatten(2).transpose(1, 2).detach()
    with torch.no_grad():
        float_out = m.attn(t)
    plan = prepare_qat(m, x[:1])
    assert set(plan.sdpa_calls) == {"attn", "down"} and m.attn.__dict__.get(TRAIN_FORM)
    m.train()
    y = m.attn(t)
    y.square().mean().backward()
    assert m.attn.attention_biases.grad is not None and m.attn.attention_biases.grad.abs().sum() > 0
    diff = (y.detach() - float_out).abs().max()
    assert 0 < diff < 0.05 * float_out.abs().max(), diff  # int8 SDPA values: close to float, not equal
    unprepare(m)
    assert "forward" not in m.attn.__dict__ and TRAIN_FORM not in m.attn.__dict__
    with torch.no_grad():
        assert torch.allclose(m.attn(t), float_out, atol=1e-6)
