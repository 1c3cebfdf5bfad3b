"""Token-grid modules in forms pnnx converts: strided subsampling, attention with bias tables.

LeViT-style networks (timm ``levit``) keep their features as tokens ``[B, N, C]`` on an R x R
grid and use two forms pnnx 20261020 cannot convert or cannot write as one ncnn layer:

* a **strided subsample** of the grid, ``x.view(B, R, R, C)[:, ::s, ::s]`` (timm
  ``levit.Downsample``): pnnx has no strided slice on these axes. The same values are a 1x1 max
  pool with stride s on ``[B, C, R, R]`` (ncnn ``Pooling``): :func:`subsample_forward`.
* a **Linear + BatchNorm1d over the tokens folded into the batch**,
  ``bn(linear(x).flatten(0, 1)).reshape_as(...)`` (timm ``levit.LinearNorm``): pnnx takes the
  merged ``B * N`` for the batch and writes the ``reshape_as`` back with one token (measured:
  ``Reshape 0=256 1=1`` on levit_128s, then the next SDPA gets 1 query against a 196 x 196 mask and
  ncnn's float run never returns). The same values are the BatchNorm1d on ``[B, C, N]``:
  :func:`linear_norm_forward`.
* **attention with a learned bias table**, ``softmax(q @ k^T * scale + B[:, idx]) @ v`` computed by
  hand (timm ``levit.Attention`` / ``AttentionDownsample``, q/k and v of different widths): it
  converts to float MatMul / Softmax layers. The same values are ONE
  ``F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)`` (ncnn ``SDPA`` with an
  additive ``[heads, Nq, Nk]`` mask, written in int8): :func:`biased_attention_forward`.

:func:`enter_grid_form` applies them for ``qat.export_form.export_form``'s block to modules with
those attributes (duck typing, no timm import) whose output the form reproduces on a random probe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ncnnqat.qat.checked_forms import checked_form, probe_output, seeded_probe

GRID_FORM_ATTR = "_ncnnqat_grid_form"


def _resolution(m: nn.Module) -> tuple[int, int] | None:
    r = getattr(m, "resolution", None)
    r = (r, r) if isinstance(r, int) else tuple(r) if isinstance(r, (tuple, list)) else ()
    return (int(r[0]), int(r[1])) if len(r) == 2 and all(isinstance(v, int) and v > 0 for v in r) else None


def is_subsample(m: nn.Module) -> bool:
    """A parameter-free token-grid subsample: int ``stride``, ``resolution``, ``pool`` None."""
    return (isinstance(getattr(m, "stride", None), int) and m.stride > 0 and _resolution(m) is not None
            and hasattr(m, "pool") and m.pool is None and not any(True for _ in m.parameters()))


def subsample_forward(m: nn.Module, x: Tensor) -> Tensor:
    """``[B, R0*R1, C]`` -> ``[B, ceil(R0/s)*ceil(R1/s), C]``: every s-th row and column of the grid."""
    r0, r1 = _resolution(m)  # type: ignore[misc]
    b, _, c = x.shape
    g = x.transpose(1, 2).reshape(b, c, r0, r1)
    return F.max_pool2d(g, kernel_size=1, stride=m.stride).flatten(2).transpose(1, 2)


def is_linear_norm(m: nn.Module) -> bool:
    """A ``linear`` (nn.Linear) then ``bn`` (BatchNorm1d) module, and nothing else with weights."""
    return (isinstance(getattr(m, "linear", None), nn.Linear) and isinstance(getattr(m, "bn", None), nn.BatchNorm1d)
            and {n for n, _ in m.named_children()} == {"linear", "bn"})


def linear_norm_forward(m: nn.Module, x: Tensor) -> Tensor:
    """``[B, N, C_in]`` -> ``[B, N, C_out]``: the BatchNorm1d over channels of ``[B, C, N]``."""
    return m.bn(m.linear(x).transpose(1, 2)).transpose(1, 2)


_ATTN = ("proj", "num_heads", "key_dim", "val_dim", "scale", "attention_biases", "attention_bias_idxs")


def is_biased_attention(m: nn.Module) -> bool:
    """LeViT's token attention (``use_conv`` False): fused ``qkv`` or ``q`` + ``kv``, bias table."""
    return all(hasattr(m, a) for a in _ATTN) and not getattr(m, "use_conv", False) and (
        hasattr(m, "qkv") or (hasattr(m, "q") and hasattr(m, "kv")))


def biased_attention_forward(m: nn.Module, x: Tensor) -> Tensor:
    """``[B, N, C]`` -> ``[B, Nq, C_out]``: the biased attention as one SDPA call (see module doc)."""
    b, n, _ = x.shape
    h, kd, vd = m.num_heads, m.key_dim, m.val_dim
    if hasattr(m, "qkv"):
        q, k, v = m.qkv(x).view(b, n, h, -1).split([kd, kd, vd], dim=3)
    else:
        k, v = m.kv(x).view(b, n, h, -1).split([kd, vd], dim=3)
        q = m.q(x).view(b, -1, h, kd)
    q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))  # [B, H, N, d]
    bias = m.attention_biases[:, m.attention_bias_idxs]  # [H, Nq, Nk], from the parameter (no cache)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=m.scale)
    return m.proj(y.transpose(1, 2).reshape(b, q.shape[2], h * vd))


def _in_features(m: nn.Module) -> int | None:
    lin = next((c for c in m.modules() if isinstance(c, nn.Linear)), None)
    return lin.in_features if lin is not None else None


def _rewritten(m: nn.Module, fn: Callable[..., Tensor], name: str, n_tokens: int, chs: int
               ) -> contextlib.AbstractContextManager[bool]:
    """``m.forward`` as ``fn`` for the block when a ``[2, n_tokens, chs]`` probe's output is the module's own."""
    return checked_form(m, fn, GRID_FORM_ATTR, name, lambda mod: probe_output(mod, seeded_probe(2, n_tokens, chs)))


def enter_grid_form(m: nn.Module, stack: contextlib.ExitStack) -> bool:
    """Enter the form of ``m`` (subsample or biased attention) on ``stack``; whether rewritten."""
    if "forward" in m.__dict__:
        return False
    if is_subsample(m):
        r0, r1 = _resolution(m)  # type: ignore[misc]
        return stack.enter_context(_rewritten(m, subsample_forward, "1x1 max pool, stride s", r0 * r1, 4))
    if is_linear_norm(m):
        return stack.enter_context(_rewritten(m, linear_norm_forward, "BatchNorm1d on [B, C, N]", 5,
                                              m.linear.in_features))
    if is_biased_attention(m):
        idx = m.attention_bias_idxs
        chs = _in_features(m)
        if not isinstance(idx, Tensor) or idx.dim() != 2 or chs is None:
            return False
        return stack.enter_context(_rewritten(m, biased_attention_forward, "SDPA, bias table as mask",
                                              int(idx.shape[1]), chs))
    return False
