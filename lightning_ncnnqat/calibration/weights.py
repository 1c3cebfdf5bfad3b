"""Per-channel weight scales as ncnn2table writes them (the ``<layer>_param_0`` rows).

Source: Tencent/ncnn ``tools/quantize/ncnn2table.cpp`` (``quantize_KL``, ``quantize_ACIQ``;
EQ starts from KL's). Per output channel (per group for ``ConvolutionDepthWise``), over the
float32 weights in ncnn's order (torch's ``weight.reshape(groups, -1)``):

* KL and EQ's start: ``scale = qmax / absmax``;
* ACIQ: ``scale = qmax / aciq_threshold(absmax, elements_per_channel, bits)``;
* ``qmax = 31`` (6 bit) for ``Convolution`` layers with a 3x3 kernel, stride 1 and dilation 1
  ("int8 winograd F43 needs weight data to use 6bit quantization"), else 127.

A channel whose weights are all zero gets scale 1 here; the tool writes ``inf`` (127 / 0),
which ncnn2int8 turns into a NaN dequantization (ncnn issue 1412).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lightning_ncnnqat.calibration.aciq import aciq_threshold

METHODS = ("kl", "aciq", "eq")


def weight_scales(weight: Tensor, num_groups: int, bits: int, method: str) -> Tensor:
    """float32 ``[num_groups]`` scales of a folded float weight.

    Args:
        weight: the layer's (BN-folded) weight, any float dtype, ``[out, ...]``.
        num_groups: number of scales (out channels; groups for depthwise).
        bits: 6 or 8 (the plan's weight bits; 6 only for 3x3 s1 d1 ``Convolution``).
        method: "kl", "aciq" or "eq".
    Raises:
        ValueError: unknown method, or a weight that does not split into ``num_groups`` rows.
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
    w = weight.detach().float().cpu()
    if num_groups <= 0 or w.numel() % num_groups:
        raise ValueError(f"a weight of {w.numel()} values does not split into {num_groups} channels")
    rows = w.reshape(num_groups, -1)
    absmax = rows.abs().amax(dim=1).numpy().astype(np.float32)
    qmax = np.float32(2 ** (bits - 1) - 1)
    if method == "aciq":
        per = rows.shape[1]
        thr = np.array([aciq_threshold(float(a), per, bits) for a in absmax], dtype=np.float32)
    else:
        thr = absmax
    with np.errstate(divide="ignore"):
        scales = np.where(thr > 0, qmax / np.where(thr > 0, thr, np.float32(1)), np.float32(1)).astype(np.float32)
    return torch.from_numpy(scales)
