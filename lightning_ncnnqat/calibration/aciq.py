"""ncnn2table's ACIQ clipping threshold (Gaussian prior), for activations and weights.

Source: Tencent/ncnn ``tools/quantize/ncnn2table.cpp``, ``compute_aciq_gaussian_clip`` and
``QuantNet::quantize_ACIQ``. For a tensor of ``N`` values with largest magnitude ``absmax``:

    std       = absmax * 2 * c / sqrt(2 * ln N),   c = 0.175 * (1 + sqrt(pi * ln 4))   (double)
    threshold = (float)(alpha[bits - 1] * std)      alpha: float32 constants per bit width

with ``alpha[7] = 3.92403714`` (8 bit) and ``alpha[5] = 3.28691474`` (6 bit). Activations use
8 bits and ``N`` = the elements of one sample's input blob; weights use ``N`` = the elements of
one output channel (one group for depthwise) and 6 bits for the 3x3 stride-1 dilation-1
``Convolution`` layers. Then ``scale = qmax / threshold`` in float (qmax 127, or 31 for 6 bit).
"""

from __future__ import annotations

import math

import numpy as np

_ALPHA = np.array([0, 1.71063519, 2.15159277, 2.55913646, 2.93620062, 3.28691474, 3.6151146, 3.92403714], dtype=np.float32)
_GAUSSIAN_CONST = (0.5 * 0.35) * (1 + math.sqrt(3.14159265358979323846 * math.log(4)))


def aciq_threshold(absmax: float, n: int, bits: int = 8) -> float:
    """The clipping threshold as ncnn2table computes it (float32 value, unit of ``absmax``).

    Raises:
        ValueError: ``n < 2`` (``ln 1 = 0``: the tool divides by zero) or ``bits`` not in 2..8.
    """
    if n < 2:
        raise ValueError(f"ACIQ needs at least 2 values per tensor, got n={n}")
    if not 2 <= bits <= 8:
        raise ValueError(f"`bits` must be in 2..8, got {bits}")
    a = float(np.float32(absmax)) * 2.0  # float * 2 is exact; promoted to double by the constant
    std = (a * _GAUSSIAN_CONST) / math.sqrt(2 * math.log(n))
    return float(np.float32(float(_ALPHA[bits - 1]) * std))
