"""MobileViT-style blocks without patches folded into the batch axis, in a form pnnx converts.

MobileViT (timm ``MobileVitBlock``, apple/ml-cvnets, Hugging Face) unfolds a feature map
``[B, C, H, W]`` into ``[B * P, N, C]`` token sequences (P = pixels of a patch, N = patches),
runs a transformer on them and folds them back. ncnn has no batch axis: pnnx takes the leading
``B * P`` for the batch and drops it, so each Linear of the transformer becomes a 2-D
InnerProduct over the wrong rows (measured on timm ``mobilevit_xxs``: the export stops at its
Gemm check). The same values come out of a form that keeps the P groups as an axis of ONE sample:
``pixel_unshuffle`` (ncnn ``Reorg``) and a 4-D reshape/permute give ``[B, P, N, C]``, the
transformer runs on it (LayerNorm and Linear act on the last dim: Gemm; each attention module
computes P * heads independent matrices, ``qat.attention_forms``), and ``pixel_shuffle`` folds
back. No tensor above 4-D, batch first.

:func:`patch_form` applies it to a module with MobileViT's attributes (``conv_kxk``, ``conv_1x1``,
``transformer``, ``norm``, ``conv_proj``, ``conv_fusion``, square ``patch_size``), with the
attention modules inside in their form, when its output equals the module's own on a random probe
(checked numerically). Inputs whose size is not a multiple of the patch run the module's own
forward (its interpolation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ncnnqat.qat.attention_forms import enter_attention_form
from lightning_ncnnqat.qat.checked_forms import checked_form, probe_output, seeded_probe

PATCH_FORM_ATTR = "_ncnnqat_patch_form"
_REQUIRED = ("conv_kxk", "conv_1x1", "transformer", "norm", "conv_proj", "conv_fusion", "patch_size")


def _patch(m: nn.Module) -> int | None:
    ps = getattr(m, "patch_size", None)
    ps = (ps, ps) if isinstance(ps, int) else tuple(ps) if isinstance(ps, (tuple, list)) else ()
    return ps[0] if len(ps) == 2 and ps[0] == ps[1] and isinstance(ps[0], int) and ps[0] > 0 else None


def is_patch_block(m: nn.Module) -> bool:
    """``m`` has MobileViT block attributes with a square patch (see the module doc)."""
    return all(hasattr(m, a) for a in _REQUIRED) and _patch(m) is not None and any(
        isinstance(c, nn.Conv2d) for c in m.modules())


def patch_forward(m: nn.Module, x: Tensor) -> Tensor:
    """``MobileVitBlock.forward`` with the patches as an axis: ``[B, C, H, W]`` -> ``[B, C', H, W]``."""
    s = _patch(m)
    if x.shape[-2] % s or x.shape[-1] % s:
        return type(m).forward(m, x)  # the module's own interpolation
    shortcut = x
    x = m.conv_1x1(m.conv_kxk(x))
    b, c, h, w = x.shape
    n = (h // s) * (w // s)
    t = F.pixel_unshuffle(x, s).reshape(b, c, s * s, n).permute(0, 2, 3, 1)  # [B, P, N, C]
    t = m.norm(m.transformer(t))
    x = F.pixel_shuffle(t.permute(0, 3, 1, 2).reshape(b, -1, h // s, w // s), s)  # [B, C, H, W]
    x = m.conv_proj(x)
    if m.conv_fusion is not None:
        x = m.conv_fusion(torch.cat((shortcut, x), dim=1))
    return x


def _probe(m: nn.Module) -> Tensor | None:
    conv = next(c for c in m.modules() if isinstance(c, nn.Conv2d))
    s = _patch(m)
    return probe_output(m, seeded_probe(2, conv.in_channels, 2 * s, 3 * s))


@contextlib.contextmanager
def patch_form(m: nn.Module) -> Iterator[bool]:
    """``m``'s forward as :func:`patch_forward`, its attention modules in their form, for the
    block, when the probe's output is the module's own; yields whether it was rewritten. Instance
    attributes are removed on exit (also on error)."""
    if not is_patch_block(m):
        yield False
        return

    def inner(stack: contextlib.ExitStack) -> None:
        for sub in m.transformer.modules():
            enter_attention_form(sub, stack)

    with checked_form(m, patch_forward, PATCH_FORM_ATTR, "patches as an axis: pixel_unshuffle -> [B, P, N, C]",
                      _probe, inner) as same:
        yield same


def enter_patch_form(m: nn.Module, stack: contextlib.ExitStack) -> bool:
    """Enter :func:`patch_form` of ``m`` on ``stack``; whether ``m`` was rewritten."""
    if not is_patch_block(m):
        return False
    return stack.enter_context(patch_form(m))
