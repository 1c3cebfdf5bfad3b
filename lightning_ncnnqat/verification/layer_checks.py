"""Per-layer parity of every quantized layer in the ncnn int8 runtime, so a wrong layer is named.

Two numbers per layer:

* **isolated**: ncnn's own input blob of the layer, run through the layer's QAT math (input
  fake-quantized with its input scale, the fake-quantized folded weight), compared with ncnn's
  output blob: only this layer's error. The reference follows the CONVERTER's layer, not the
  torch module: its type (a 1x1 conv on a 1x1 map runs as InnerProduct), its own padding
  (pnnx moves reflect/replicate padding into a Padding layer before it), stride, dilation,
  groups and fused activation (param 9), so whatever the converter inserted or fused, the
  layer is judged on what ncnn computes.
* **chain**: ncnn's output blob vs the PyTorch QAT model's value at that point (captured with a
  forward hook and copied, so a later in-place op such as ResNet's ``out += identity`` cannot
  change it): accumulated drift.

A requantized (int8) blob holds ``round(y * s_out)``; it is compared in those units' float
value, ``q / s_out``, against the reference quantized with the same output scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat.ops import reference
from lightning_ncnnqat.errors import LayerError
from lightning_ncnnqat.policy import MAX_LAYER_REL_ERR, MIN_LAYER_COSINE, attention_layer_ok, layer_ok  # noqa: F401
from lightning_ncnnqat.ncnn.param import NcnnLayer, NcnnParam
from lightning_ncnnqat.verification import gemm_checks
from lightning_ncnnqat.verification.attention_checks import ATTENTION_TYPES, attention_isolated_reference
from lightning_ncnnqat.verification.parity import agreement


@dataclass
class LayerCheck:
    torch_name: str
    ncnn_name: str
    isolated_cosine: float
    isolated_max_rel_err: float
    chain_cosine: float
    chain_max_rel_err: float
    ok: bool | None  # None: not judged, ncnn's input to this layer was out of int8 conversion range
    ok_without_packing: bool | None = None  # set when flagged: rerun with use_packing_layout=False
    samples_checked: int = 0  # samples whose ncnn input blob could be judged (finite, |x * scale| < 2**30)
    # int8 (requantized) outputs only: fraction of values one or more int8 steps away from the
    # QAT reference on ncnn's own input; and the same with use_packing_layout=False
    int8_step_mismatch: float | None = None
    int8_step_mismatch_without_packing: float | None = None
    # True: the isolated cosine passes but the max error does not under default options, and the
    # layer is right with fp16 storage/arithmetic and packing off: the runtime's own approximation
    # (e.g. ARMv8.2's fp16 arithmetic quantizing an fp16-stored input), not a wrong layer
    runtime_approximation: bool | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QuantizedRef:
    """What the isolated reference needs of one quantized layer (float32 CPU tensors)."""

    torch_name: str
    ncnn_name: str
    weight_fq: torch.Tensor  # fake-quantized folded weight, as the QAT forward uses it
    bias: torch.Tensor | None
    input_scale: float


def ncnn_activation(lay: NcnnLayer, y: torch.Tensor) -> torch.Tensor:
    """Apply the activation fused into ``lay`` (param 9, params in 10) as ncnn does."""
    if lay.type == "Gemm":  # no fused activation (its param 9 is K)
        return y
    t = lay.get_int(9, 0)
    p = lay.get_array(10)
    if t == 0:
        return y
    if t == 1:
        return F.relu(y)
    if t == 2:
        return F.leaky_relu(y, p[0] if p else 0.0)
    if t == 3:
        return torch.clamp(y, p[0], p[1])
    if t == 4:
        return torch.sigmoid(y)
    if t == 5:
        return F.mish(y)
    if t == 6:
        alpha, beta = (p[0], p[1]) if len(p) >= 2 else (1 / 6, 0.5)
        return y * torch.clamp(y * alpha + beta, 0.0, 1.0)
    raise LayerError(lay.name, f"ncnn layer '{lay.name}': unknown fused activation type {t}")


def fake_quantize(y: torch.Tensor, scale: float) -> torch.Tensor:
    """Quantize-dequantize ``y`` with an ncnn scale (what an int8 blob holds, in float units)."""
    s = torch.tensor(scale, dtype=torch.float32)
    return reference.round_half_away(torch.clamp(y.float() * s, -127.0, 127.0)) / s


def _conv_pads(lay: NcnnLayer, h: int, w: int, kh: int, kw: int, sh: int, sw: int, dh: int, dw: int) -> tuple:
    left = lay.get_int(4, 0)
    right = lay.get_int(15, left)
    top = lay.get_int(14, left)
    bottom = lay.get_int(16, top)
    if left in (-233, -234):  # SAME_UPPER / SAME_LOWER (ncnn convolution.cpp make_padding)
        def same(size: int, k: int, s: int, d: int) -> tuple[int, int]:
            ke = d * (k - 1) + 1
            total = max(0, (-(-size // s) - 1) * s + ke - size)
            return (total // 2, total - total // 2) if left == -233 else (total - total // 2, total // 2)

        top, bottom = same(h, kh, sh, dh)
        left, right = same(w, kw, sw, dw)
    return left, right, top, bottom


def isolated_reference(lay: NcnnLayer, x_in: np.ndarray, ref: QuantizedRef) -> torch.Tensor:
    """The QAT math of ncnn layer ``lay`` applied to ncnn's own input blob ``x_in`` (float units)."""
    if lay.type == "Gemm":  # dynamic per-row input quantization: verification/gemm_checks.py
        return gemm_checks.gemm_isolated_reference(lay, x_in, ref)
    x = fake_quantize(torch.from_numpy(np.ascontiguousarray(x_in, dtype=np.float32)), ref.input_scale)
    w, b = ref.weight_fq.float(), None if ref.bias is None else ref.bias.float()
    if lay.type == "InnerProduct":
        y = F.linear(x.reshape(1, -1), w.reshape(lay.get_int(0, w.shape[0]), -1), b)
    elif lay.type in ("Convolution", "ConvolutionDepthWise"):
        kw = lay.get_int(1, 1)
        kh = lay.get_int(11, kw)
        dw = lay.get_int(2, 1)
        dh = lay.get_int(12, dw)
        sw = lay.get_int(3, 1)
        sh = lay.get_int(13, sw)
        groups = lay.get_int(7, 1) if lay.type == "ConvolutionDepthWise" else 1
        x4 = x.reshape(1, -1, *x.shape[-2:]) if x.dim() >= 2 else x.reshape(1, -1, 1, 1)
        left, right, top, bottom = _conv_pads(lay, x4.shape[2], x4.shape[3], kh, kw, sh, sw, dh, dw)
        x4 = F.pad(x4, (left, right, top, bottom), value=float(lay.get_float(18, 0.0)))
        y = F.conv2d(x4, w.reshape(w.shape[0], -1, kh, kw), b, (sh, sw), 0, (dh, dw), groups)
    else:
        raise LayerError(lay.name, f"ncnn layer '{lay.name}' is {lay.type}, not an int8 layer")
    return ncnn_activation(lay, y)


def blob_int8_scale(param: NcnnParam, blob: str, out_scales: dict[str, float]) -> float | None:
    """The scale of ``blob`` if a requantizing layer wrote it as int8 (through Splits)."""
    prod = param.producer(blob)
    while prod is not None and prod.type == "Split":
        prod = param.producer(prod.bottoms[0])
    if prod is None:
        return None
    return out_scales.get(prod.name)


def blobs_to_extract(param: NcnnParam, ncnn_names: Sequence[str]) -> list[str]:
    """Input and output blobs of the checked layers, each once."""
    out: list[str] = []
    for n in ncnn_names:
        lay = param.layer(n)
        out += [*(lay.bottoms if lay.type in ATTENTION_TYPES else lay.bottoms[:1]), lay.tops[0]]
    return list(dict.fromkeys(out))


def capture_outputs(model: nn.Module, names: Sequence[str], call) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Outputs of the named modules in one eval forward of ``model`` (``call()`` runs it), COPIED
    at the hook: a later in-place op on the same tensor does not change them."""
    outs: dict[str, torch.Tensor] = {}
    handles = []
    mods = dict(model.named_modules())
    for n in [n for n in names if n in mods]:  # an SDPA call has no module: no chain figure
        def hook(mod, args, out, n=n):  # noqa: ANN001
            out = out[0] if isinstance(out, tuple) else out  # nn.MultiheadAttention: (output, weights)
            outs[n] = out.detach().float().cpu().clone()

        handles.append(mods[n].register_forward_hook(hook))
    try:
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    return outs


def check_layers(
    param: NcnnParam,
    refs: Sequence[QuantizedRef],
    blobs: dict[str, np.ndarray],
    chain: dict[str, list[torch.Tensor]],
    out_scales: dict[str, float],
) -> list[LayerCheck]:
    """Judge every layer of ``refs`` on the extracted ``blobs`` (``[S, ...]`` per blob name).

    ``chain[torch_name]`` holds the PyTorch QAT model's output of that layer for each of the S
    samples; ``out_scales`` the output scale of every layer written with requantize fusion.
    A sample is judged only where ncnn's input to the layer is finite and small enough for
    ncnn's float->int conversion (``|x * scale| < 2**30``): garbage from a wrong upstream layer
    overflows it, which says nothing about this layer.
    """
    checks = []
    for ref in refs:
        lay = param.layer(ref.ncnn_name)
        x_all, y_all = blobs[lay.bottoms[0]], blobs[lay.tops[0]]
        s_in = blob_int8_scale(param, lay.bottoms[0], out_scales)
        iso_ref, chain_ref, got, keep, steps = [], [], [], [], []
        for s in range(len(x_all)):
            x_in = x_all[s] / np.float32(s_in) if s_in is not None else x_all[s]
            if lay.type in ATTENTION_TYPES:  # several inputs, quantized at run time (attention_checks.py)
                iso = attention_isolated_reference(lay, [blobs[b][s] for b in lay.bottoms], ref)
            else:
                iso = isolated_reference(lay, x_in, ref)
            ch = chain[ref.torch_name][s]
            ch = ncnn_activation(lay, ch) if ch is not None else torch.full(iso.shape, float("nan"))
            y = np.asarray(y_all[s], dtype=np.float32)
            if lay.name in out_scales:
                so = out_scales[lay.name]
                y = y / np.float32(so)
                iso, ch = fake_quantize(iso, so), fake_quantize(ch, so)
                steps.append(np.rint(y.ravel() * np.float32(so)) != np.rint(iso.numpy().ravel() * np.float32(so)))
            iso_ref.append(iso.numpy().ravel())
            chain_ref.append(ch.numpy().ravel())
            got.append(y.ravel())
            keep.append(bool(np.isfinite(x_in).all()) and float(np.abs(x_in).max(initial=0.0)) * ref.input_scale < 2.0**30)
        g = np.stack(got)
        try:
            c = agreement(np.stack(chain_ref), g)
            chain_cos, chain_rel = c.cosine, c.max_rel_err
        except ValueError:  # the torch module's output is not the ncnn layer's (shape differs)
            chain_cos, chain_rel = float("nan"), float("nan")
        k = np.array(keep)
        if k.any():
            iso_a = agreement(np.stack(iso_ref)[k], g[k])
            ok: bool | None = (attention_layer_ok if lay.type in ATTENTION_TYPES else layer_ok)(iso_a.cosine, iso_a.max_rel_err)
            iso_cos, iso_rel = iso_a.cosine, iso_a.max_rel_err
        else:
            ok, iso_cos, iso_rel = None, float("nan"), float("nan")
        mismatch = None
        if steps and k.any():
            mismatch = float(np.concatenate([st for st, kk in zip(steps, keep) if kk]).mean())
        checks.append(
            LayerCheck(ref.torch_name, ref.ncnn_name, iso_cos, iso_rel, chain_cos, chain_rel, ok, None, int(k.sum()), mismatch)
        )
    return checks
