"""ops/attention_reference.py in PyTorch alone: the float path is nn.MultiheadAttention /
F.scaled_dot_product_attention, and the straight-through forms give int8 values with float
gradients (no ncnn needed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_ncnnqat.ops.attention_reference import mha_float, mha_int8, mha_int8_ste, sdpa_int8, sdpa_int8_ste


def _mha_weights(m: nn.MultiheadAttention) -> dict[str, torch.Tensor]:
    wq, wk, wv = m.in_proj_weight.chunk(3)
    bq, bk, bv = m.in_proj_bias.chunk(3)
    return {"q_weight": wq, "k_weight": wk, "v_weight": wv, "q_bias": bq, "k_bias": bk, "v_bias": bv,
            "out_weight": m.out_proj.weight, "out_bias": m.out_proj.bias}


@pytest.mark.parametrize("embed, heads, masked", [(16, 2, False), (24, 4, True)])
def test_mha_float_is_torch_multiheadattention(embed: int, heads: int, masked: bool) -> None:
    torch.manual_seed(embed)
    m = nn.MultiheadAttention(embed, heads, batch_first=True).eval()
    x = torch.randn(2, 5, embed)
    mask = torch.randn(5, 5) if masked else None
    with torch.no_grad():
        want = m(x, x, x, attn_mask=mask, need_weights=False)[0]
        got = mha_float(x, x, x, _mha_weights(m), heads, attn_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_mha_ste_values_are_int8_and_gradients_float() -> None:
    torch.manual_seed(1)
    m = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(3, 6, 16, requires_grad=True)
    y = mha_int8_ste(x, x, x, _mha_weights(m), 4)
    with torch.no_grad():
        want = mha_int8(x, x, x, _mha_weights(m), 4)
        flt = mha_float(x, x, x, _mha_weights(m), 4)
    assert torch.equal(y.detach(), want)
    assert (want - flt).abs().max() > 1e-4  # the int8 value is not the float one
    g = torch.randn_like(y)
    (gx, gw) = torch.autograd.grad(y, (x, m.in_proj_weight), g)
    x2 = x.detach().clone().requires_grad_(True)
    (fx, fw) = torch.autograd.grad(mha_float(x2, x2, x2, _mha_weights(m), 4), (x2, m.in_proj_weight), g)
    torch.testing.assert_close(gx, fx)
    torch.testing.assert_close(gw, fw)
    assert gx.abs().sum() > 0 and gw.abs().sum() > 0


@pytest.mark.parametrize("heads, groups", [(2, 2), (4, 2)])
def test_sdpa_ste_values_are_int8_and_gradients_float(heads: int, groups: int) -> None:
    g = torch.Generator().manual_seed(heads + groups)
    q = torch.randn(2, heads, 5, 8, generator=g, requires_grad=True)
    k = torch.randn(2, groups, 7, 8, generator=g, requires_grad=True)
    v = torch.randn(2, groups, 7, 4, generator=g, requires_grad=True)
    y = sdpa_int8_ste(q, k, v)
    assert torch.equal(y.detach(), sdpa_int8(q.detach(), k.detach(), v.detach()))
    grads = torch.autograd.grad(y.square().sum(), (q, k, v))
    r = heads // groups
    f = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1))
    fgrads = torch.autograd.grad(f.square().sum(), (q, k, v), retain_graph=True)
    # the upstream gradient differs (2*y vs 2*f): compare with the float one fed y's upstream
    fgrads_y = torch.autograd.grad(f, (q, k, v), 2 * y.detach())
    for a, b, c in zip(grads, fgrads_y, fgrads):
        torch.testing.assert_close(a, b)
        assert not torch.equal(a, c)  # the straight-through gradient sees the int8 values


def test_head_counts_are_checked() -> None:
    w = {"q_weight": torch.randn(6, 6), "k_weight": torch.randn(6, 6), "v_weight": torch.randn(6, 6),
         "out_weight": torch.randn(6, 6)}
    x = torch.randn(1, 3, 6)
    with pytest.raises(ValueError, match="num_heads=4 does not divide embed_dim=6"):
        mha_int8(x, x, x, w, 4)
    with pytest.raises(ValueError, match=r"key/value heads \(2\) do not divide query heads \(3\)"):
        sdpa_int8(torch.randn(1, 3, 2, 4), torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4))
