"""QATMultiheadAttention (qat/attention.py): nn.MultiheadAttention computed as ncnn's int8
MultiHeadAttention, checked against the reference and against ncnn itself (x86)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from attention_int8_cases import assert_matches
from lightning_ncnnqat.errors import LayerError
from lightning_ncnnqat.ncnn.int8_attention import write_mha_int8
from lightning_ncnnqat.ncnn.isolated import run_ncnn
from lightning_ncnnqat.ncnn.param import NcnnParam, bin_layout
from lightning_ncnnqat.ops.attention_reference import mha_int8
from lightning_ncnnqat.qat.attention import QATMultiheadAttention, mha_module_weights, to_float_attention, to_qat_attention


class Block(nn.Module):
    def __init__(self, embed: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(embed, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def test_qat_attention_equals_ncnn_int8_on_x86(tmp_path: Path) -> None:
    """The QAT forward of a swapped layer is what ncnn's int8 MultiHeadAttention computes from the
    float model pnnx converts (the layer the export would write)."""
    from lightning_ncnnqat.conversion.pnnx import convert_with_pnnx

    torch.manual_seed(2)
    net = Block(24, 3).eval()
    x = torch.randn(3, 7, 24)
    res = convert_with_pnnx(net, x[:1])
    param = NcnnParam.parse(res.param_text)
    entries = bin_layout(param, res.bin_bytes).by_index
    (i,) = [j for j, lay in enumerate(param.layers) if lay.type == "MultiHeadAttention"]
    chunks, _ = write_mha_int8(param.layers[i], entries[i], res.bin_bytes)
    (tmp_path / "i.param").write_text(param.to_text())
    (tmp_path / "i.bin").write_bytes(b"".join(chunks))
    (tmp_path / "f.param").write_text(res.param_text)
    (tmp_path / "f.bin").write_bytes(res.bin_bytes)
    to_qat_attention(net.attn, "attn")
    with torch.no_grad():
        qat = net(x).numpy()
    got = run_ncnn(tmp_path / "i.param", tmp_path / "i.bin", {"in0": x.numpy()}, ["out0"], target="x86").outputs["out0"]
    flt = run_ncnn(tmp_path / "f.param", tmp_path / "f.bin", {"in0": x.numpy()}, ["out0"], target="x86").outputs["out0"]
    assert_matches(got, qat, flt, "QATMultiheadAttention vs ncnn x86")


def test_swap_keeps_parameters_and_trains() -> None:
    torch.manual_seed(0)
    net = Block()
    params = list(net.parameters())
    x = torch.randn(2, 5, 16, requires_grad=True)
    with torch.no_grad():
        float_out = net(x)
    assert isinstance(to_qat_attention(net.attn, "attn"), QATMultiheadAttention)
    assert list(net.parameters()) == params and all(a is b for a, b in zip(net.parameters(), params))
    y = net(x)
    assert (y - float_out).abs().max() > 1e-4  # int8 values, not float
    y.square().mean().backward()
    assert net.attn.in_proj_weight.grad.abs().sum() > 0 and net.attn.out_proj.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0
    to_float_attention(net.attn)
    with torch.no_grad():
        torch.testing.assert_close(net(x), float_out)


def test_layouts_and_masks_agree() -> None:
    """batch_first False / unbatched inputs, kdim/vdim projections, bool and causal masks all give
    the reference's values."""
    torch.manual_seed(4)
    m = to_qat_attention(nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=False), "m")
    q, k, v = torch.randn(5, 2, 16), torch.randn(6, 2, 8), torch.randn(6, 2, 12)
    w = {"q_weight": m.q_proj_weight, "k_weight": m.k_proj_weight, "v_weight": m.v_proj_weight,
         "out_weight": m.out_proj.weight, "out_bias": m.out_proj.bias}
    w.update(zip(("q_bias", "k_bias", "v_bias"), m.in_proj_bias.chunk(3)))
    causal = torch.ones(5, 6, dtype=torch.bool).triu(1)
    with torch.no_grad():
        want = mha_int8(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), w, 2,
                        attn_mask=torch.zeros(5, 6).masked_fill(causal, float("-inf"))).transpose(0, 1)
        assert torch.equal(m(q, k, v, attn_mask=causal)[0], want)
        assert torch.equal(m(q, k, v, is_causal=True)[0], want)
        assert torch.equal(m(q[:, 1], k[:, 1], v[:, 1], attn_mask=causal)[0], want[:, 1])
        assert m(q, k, v)[1] is None


def test_unsupported_forms_are_named() -> None:
    with pytest.raises(LayerError, match="layer 'blk.attn'.*bias_k/bias_v"):
        to_qat_attention(nn.MultiheadAttention(8, 2, add_bias_kv=True), "blk.attn")
    with pytest.raises(LayerError, match="add_zero_attn"):
        to_qat_attention(nn.MultiheadAttention(8, 2, add_zero_attn=True), "a")
    m = to_qat_attention(nn.MultiheadAttention(8, 2, batch_first=True), "a")
    x = torch.randn(1, 3, 8)
    assert np.isfinite(m(x, x, x)[0].detach().numpy()).all()


@pytest.mark.parametrize("batch_first", [True, False])
def test_key_padding_mask_is_an_additive_mask_per_sample(batch_first: bool) -> None:
    """A key_padding_mask (bool, or float) is ncnn's mask input ``[1, S]`` of each sample, added
    to ``attn_mask``: the int8 layer on the same weights with that mask."""
    torch.manual_seed(9)
    m = to_qat_attention(nn.MultiheadAttention(8, 2, batch_first=batch_first), "a")
    x = torch.randn(2, 5, 8)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    w = {k: t.detach() for k, t in mha_module_weights(m).items()}
    with torch.no_grad():
        for i in range(2):
            add = torch.zeros(1, 5).masked_fill(pad[i : i + 1], float("-inf"))
            mask = add + torch.zeros(5, 5).masked_fill(causal, float("-inf"))
            want = mha_int8(x[i : i + 1], x[i : i + 1], x[i : i + 1], w, 2, None, mask)
            inp = x if batch_first else x.transpose(0, 1)
            for kpm in (pad, torch.zeros(2, 5).masked_fill(pad, float("-inf"))):
                got = m(inp, inp, inp, key_padding_mask=kpm, attn_mask=causal)[0]
                got = got if batch_first else got.transpose(0, 1)
                assert torch.equal(got[i], want[0]), (i, kpm.dtype)
