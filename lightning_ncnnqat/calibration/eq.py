"""EQ: ncnn2table's search of each scale for the best int8 cosine similarity, layer by layer.

Source: Tencent/ncnn ``tools/quantize/ncnn2table.cpp``, ``QuantNet::quantize_EQ``. It starts
from the KL table and, for each quantized layer in graph order:

1. for each weight scale ``s`` (one per output channel / group) in order, tries the 100 values
   ``lower + k * step`` (float: ``lower = s * 0.5f``, ``step = (s * 2.0f - lower) / 100``,
   ``k = 0..99``) with the other scales as they are now, runs the layer in int8 on each of the
   first ``min(N, 50)`` samples' float input, and keeps the value with the largest sum of
   cosine similarities between the int8 and the float output (the first one wins ties; if no
   sum is > 0 the scale stays);
2. then the input scale, the same way, with the new weight scales.

The int8 layer is ncnn's: ``q = clamp(round(v * scale), -127, 127)`` for the input and the
weights, an int32 accumulation, ``acc * (1 / (s_in * s_w)) + bias`` in float.

Two differences from the tool, both on purpose:

* the tool, as built from ncnn's source (checked at a4d2ea1d4), reads its inputs inside the
  search loops with the wrong indices (``shapes[j]`` / ``listspaths[j][i]`` with ``j`` the
  channel and ``i`` the layer, instead of the input and the sample): every model with a layer of
  more than one output channel reads out of bounds and crashes (SIGSEGV, measured), and the
  others compare one sample 50 times. We use the intended samples;
* the tool compares the layer's top blob, which includes an activation the converter fused
  into the layer (pnnx/onnx2ncnn fuse ReLU); we compare the layer's own (pre-activation)
  output, which is what the torch module returns.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ncnnqat.ops.reference import round_half_away

SEARCH_STEPS = 100
MAX_SAMPLES = 50
_F = np.float32


def candidates(scale: float) -> np.ndarray:
    """The 100 float32 scales the tool tries around ``scale``."""
    s = _F(scale)
    lower = s * _F(0.5)
    upper = s * _F(2.0)
    step = (upper - lower) / _F(SEARCH_STEPS)
    return np.array([lower + _F(k) * step for k in range(SEARCH_STEPS)], dtype=np.float32)


def quantize(v: Tensor, scale: Tensor) -> Tensor:
    """``clamp(round(v * scale), -127, 127)`` (float32 product, C ``round``), float32 result."""
    return torch.clamp(round_half_away(v.float() * scale), -127.0, 127.0)


class Int8Layer:
    """One Conv2d / Linear run as ncnn's int8 layer, on integer-valued float64 tensors."""

    def __init__(self, module: nn.Module, num_groups: int) -> None:
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                raise ValueError(f"EQ supports zero padding only, got padding_mode={module.padding_mode!r}")
            self.conv = True
        elif isinstance(module, nn.Linear):
            self.conv = False
        else:
            raise TypeError(f"EQ runs Conv2d and Linear layers, got {type(module).__name__}")
        self.m = module
        self.weight = module.weight.detach().float()
        self.bias = None if module.bias is None else module.bias.detach().float()
        self.num_groups = num_groups
        self.out = self.weight.shape[0]
        self.per_group = self.out // num_groups

    def channel_scales(self, group_scales: Tensor) -> Tensor:
        return group_scales.float().repeat_interleave(self.per_group)

    def accumulate(self, xq: Tensor, wq: Tensor, groups: int) -> Tensor:
        """Exact int32-style accumulation (float64 holds these sums exactly)."""
        if self.conv:
            m = self.m
            return F.conv2d(xq.double(), wq.double(), None, m.stride, m.padding, m.dilation, groups)
        return xq.double() @ wq.double().t()

    def dequantize(self, acc: Tensor, s_in: Tensor, s_w: Tensor, bias: Tensor | None) -> Tensor:
        """``acc * (1 / (s_in * s_w)) + bias`` in float32, ``s_w`` per output channel."""
        shape = (1, -1) + (1,) * (acc.dim() - 2)
        deq = torch.where(s_w > 0, 1.0 / (s_in * s_w), torch.zeros_like(s_w))
        out = acc.float() * deq.reshape(shape)
        return out if bias is None else out + bias.reshape(shape)

    def forward(self, xq: Tensor, s_in: Tensor, group_scales: Tensor) -> Tensor:
        s_w = self.channel_scales(group_scales)
        wq = quantize(self.weight, s_w.reshape((-1,) + (1,) * (self.weight.dim() - 1)))
        acc = self.accumulate(xq, wq, self.m.groups if self.conv else 1)
        return self.dequantize(acc, s_in, s_w, self.bias)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], t.shape[1], -1).double()


def _pick(sims: Tensor, values: np.ndarray, current: float) -> float:
    """First maximum of the summed similarities, if > 0 (the tool starts its max at 0.0)."""
    best, pick = 0.0, current
    for k, v in enumerate(sims.tolist()):
        if best < v:
            best, pick = v, float(values[k])
    return pick


def search_layer(layer: Int8Layer, x: Tensor, weight_scales: Tensor, input_scale: float) -> tuple[Tensor, float]:
    """EQ for one layer.

    Args:
        layer: the layer wrapper.
        x: float32 input samples ``[N, ...]`` (N <= 50).
        weight_scales: float32 ``[num_groups]`` start (KL) scales.
        input_scale: start (KL) input scale.
    Returns:
        (new weight scales float32 ``[num_groups]``, new input scale).
    """
    x = x.detach().float()
    with torch.no_grad():
        ref = _flat(layer.m(x).float())  # [N, C, S]
    sa = (ref * ref).sum(dim=(1, 2))
    norm_a = sa.sqrt()
    scales = weight_scales.clone().float()
    s_in = torch.tensor(input_scale, dtype=torch.float32)
    xq = quantize(x, s_in)
    cur = _flat(layer.forward(xq, s_in, scales))
    dot_all = (cur * ref).sum(dim=2)  # [N, C]
    e_all = (cur * cur).sum(dim=2)
    m, g = layer.per_group, layer.num_groups
    for n in range(g):
        oc = slice(n * m, (n + 1) * m)
        vals = candidates(float(scales[n]))
        cand = torch.from_numpy(vals)  # [K]
        w_n = layer.weight[oc]  # [m, ...]
        shape = (-1,) + (1,) * (w_n.dim() - 1)
        wq = torch.cat([quantize(w_n, c.reshape(())) for c in cand])  # [K*m, ...]
        if layer.conv and layer.m.groups > 1:
            cin = w_n.shape[1]
            grp = n * m // (layer.out // layer.m.groups)
            x_n = xq[:, grp * cin : (grp + 1) * cin]
        else:
            x_n = xq
        acc = layer.accumulate(x_n, wq, 1)  # [N, K*m, ...]
        s_w = cand.repeat_interleave(m)
        bias = None if layer.bias is None else layer.bias[oc].repeat(len(vals))
        out = _flat(layer.dequantize(acc, s_in, s_w, bias)).reshape(x.shape[0], len(vals), m, -1)
        r = ref[:, oc].unsqueeze(1)  # [N, 1, m, S]
        dot = (out * r).sum(dim=(2, 3))  # [N, K]
        e = (out * out).sum(dim=(2, 3))
        base_dot = dot_all.sum(dim=1) - dot_all[:, oc].sum(dim=1)
        base_e = e_all.sum(dim=1) - e_all[:, oc].sum(dim=1)
        sims = (base_dot[:, None] + dot) / norm_a[:, None] / (base_e[:, None] + e).sqrt()
        new = _pick(sims.sum(dim=0), vals, float(scales[n]))
        scales[n] = new
        k = int(np.flatnonzero(vals == np.float32(new))[0]) if np.float32(new) in vals else None
        if k is not None:
            dot_all[:, oc] = (out[:, k] * ref[:, oc]).sum(dim=2)
            e_all[:, oc] = (out[:, k] * out[:, k]).sum(dim=2)
    vals = candidates(input_scale)
    return scales, _pick(_input_scale_sims(layer, x, ref, norm_a, scales, vals), vals, input_scale)


def _input_scale_sims(
    layer: Int8Layer, x: Tensor, ref: Tensor, norm_a: Tensor, scales: Tensor, vals: np.ndarray, chunk: int = 25
) -> Tensor:
    """Summed cosine of each input-scale candidate (candidates batched ``chunk`` at a time)."""
    n = x.shape[0]
    s_w = layer.channel_scales(scales)
    wq = quantize(layer.weight, s_w.reshape((-1,) + (1,) * (layer.weight.dim() - 1)))
    groups = layer.m.groups if layer.conv else 1
    out_sims = []
    for i in range(0, len(vals), chunk):
        cand = torch.from_numpy(vals[i : i + chunk])  # [K]
        k = len(cand)
        cshape = (k,) + (1,) * x.dim()
        xq = quantize(x.unsqueeze(0), cand.reshape(cshape)).reshape((k * n,) + tuple(x.shape[1:]))
        acc = layer.accumulate(xq, wq, groups)  # [K*N, C, ...]
        s_in = cand.repeat_interleave(n).reshape((k * n, 1) + (1,) * (acc.dim() - 2))
        shape = (1, -1) + (1,) * (acc.dim() - 2)
        prod = s_in * s_w.reshape(shape)
        deq = torch.where(prod > 0, 1.0 / prod, torch.zeros_like(prod))
        out = acc.float() * deq
        if layer.bias is not None:
            out = out + layer.bias.reshape(shape)
        out = _flat(out).reshape(k, n, ref.shape[1], -1)
        dot = (out * ref.unsqueeze(0)).sum(dim=(2, 3))
        sims = dot / norm_a.unsqueeze(0) / (out * out).sum(dim=(2, 3)).sqrt()
        out_sims.append(sims.sum(dim=1))
    return torch.cat(out_sims)
