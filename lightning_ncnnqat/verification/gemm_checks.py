"""The isolated per-layer reference of an int8 ``Gemm`` (Linear on a 3-D/4-D input).

ncnn's int8 Gemm has no input scale: every row of its input blob (``[M, K]``, pnnx's Reshape
before it) is quantized with its own ``127 / absmax`` at run time, B with one scale. So the
reference of one Gemm is :func:`lightning_ncnnqat.ops.reference.fake_quantize_gemm` on ncnn's own
input blob with the float weight and bias (``QuantizedRef.weight_fq`` holds the FLOAT weight for a
Gemm, the export's ``gemm_ref``): bit-exact where ncnn runs it in float32 storage (x86, and ARM with fp16
storage off), within fp16's rounding of the input and output under ARM's default options.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lightning_ncnnqat.ncnn.param import NcnnLayer
from lightning_ncnnqat.ops import reference


def gemm_isolated_reference(lay: NcnnLayer, x_in: np.ndarray, ref: Any) -> torch.Tensor:
    """ncnn's int8 Gemm ``lay`` (constant B ``[N, K]``, optional constant C per N) on its own input
    blob ``x_in`` (rows of K values), as float32 ``[M, N]``; ``ref`` is the layer's
    ``layer_checks.QuantizedRef`` whose ``weight_fq`` holds the float weight.

    Raises ValueError naming the layer when it is not a Gemm this package writes in int8 (a
    constant A or a transposed A) or the blob does not hold rows of K values."""
    g = lay.get_int
    if g(4, 0) or not g(5, 0) or g(2, 0):
        raise ValueError(f"ncnn layer '{lay.name}': Gemm with 2={g(2, 0)} 4={g(4, 0)} 5={g(5, 0)} has no int8 reference")
    w = ref.weight_fq.float().reshape(g(8, 0), -1)
    x = torch.from_numpy(np.ascontiguousarray(x_in, dtype=np.float32))
    if x.numel() % w.shape[1]:
        raise ValueError(f"ncnn layer '{lay.name}': its input blob {tuple(x.shape)} does not hold rows of K={w.shape[1]}")
    y = reference.fake_quantize_gemm(x.reshape(-1, w.shape[1]), w, ref.bias)
    return y.T.contiguous() if g(14, 0) else y  # output_transpose
