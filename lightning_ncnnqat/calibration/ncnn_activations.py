"""The quantized layers' inputs as ncnn's float runtime computes them (``activations="ncnn"``).

ncnn2table (``tools/quantize/ncnn2table.cpp``) does not run PyTorch: it loads the float ncnn
model with ``num_threads=1`` and fp16 storage, packing and arithmetic off (its ``main``), and
extracts each quantized layer's bottom blob, one sample at a time. ncnn's float kernels (packed
layouts, Winograd, sgemm) round differently from PyTorch's, by a few ulp, and a KL search can
move its chosen bin on that. To get the tool's table to the printed digit, this module converts
the BN-folded float model with pnnx (``fp16=0``, float32 weights), finds each torch layer's
ncnn layer by its weights, and runs the model in ncnn's runtime in a child process
(:func:`~lightning_ncnnqat.ncnn.isolated.run_ncnn`) on the calibration batches,
handing back those bottom blobs. A crash inside ncnn is an error naming the model, never a dead
caller.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lightning_ncnnqat.errors import LayerError
from lightning_ncnnqat.conversion.graph_match import torch_wiring
from lightning_ncnnqat.ncnn.isolated import run_ncnn
from lightning_ncnnqat.conversion.model_io import FlatModel, input_tensor, model_io
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.conversion.pnnx import convert_with_pnnx
from lightning_ncnnqat.calibration.table import ncnn_names_by_weights

#: ncnn.Option values ncnn2table's ``main`` sets before loading the model (the rest: defaults).
NCNN2TABLE_OPTIONS = {
    "num_threads": 1,
    "lightmode": False,
    "use_fp16_packed": False,
    "use_fp16_storage": False,
    "use_fp16_arithmetic": False,
}


@dataclass
class NcnnFloatModel:
    """A float ncnn model of the folded model, with the blob each calibrated layer reads."""

    param: Path
    bin: Path
    input_blob: str
    bottom_blobs: dict[str, str]  # torch layer name -> ncnn bottom blob of its layer
    ncnn_names: dict[str, str]  # torch layer name -> ncnn layer name


def convert_float(folded: nn.Module, example: Tensor, layers: Sequence, work: Path) -> NcnnFloatModel:
    """Convert ``folded`` (BN-folded, eval) with pnnx into ``work`` and map ``layers`` to blobs.

    Args:
        folded: the float model calibrate measures (``_folded_copy``).
        example: one input ``[1, ...]`` float32 for tracing.
        layers: objects with ``name``, ``kind``, ``weight``, ``bias`` (the calibrated layers).
    Raises:
        LayerError: pnnx failed, or a layer's weights are found nowhere in the ncnn model.
        ValueError: the converted model has more than one input blob.
    """
    io = model_io(folded, example[:1])
    flat = FlatModel(folded, io)  # any output structure -> out0..outM
    pn = convert_with_pnnx(flat, example[:1])
    param_path, bin_path = work / "float.ncnn.param", work / "float.ncnn.bin"
    param_path.write_text(pn.param_text)
    bin_path.write_bytes(pn.bin_bytes)
    param = NcnnParam.parse(pn.param_text)
    inputs = [t for lay in param.layers if lay.type == "Input" for t in lay.tops]
    if len(inputs) != 1:
        raise ValueError(f"activations='ncnn' needs a model with one input; the ncnn model has inputs {inputs}")
    names = ncnn_names_by_weights(layers, param_path, bin_path, torch_wiring(folded, io, [example[:1]]))
    bottoms = {}
    for t, n in names.items():
        lay = param.layer(n)
        if not lay.bottoms:
            raise LayerError(t, f"layer '{t}' (ncnn '{n}') has no bottom blob in the converted model")
        bottoms[t] = lay.bottoms[0]
    return NcnnFloatModel(param_path, bin_path, inputs[0], bottoms, names)


#: Extracted blobs one child process may hand back (bytes): consecutive batches are grouped up to it.
CHUNK_BYTES = 256 * 2**20
#: Samples per child process at most (small batches are grouped: one process start per ~64 samples).
CHUNK_SAMPLES = 64


def ncnn_feed(
    model: NcnnFloatModel, batches: Callable[[], Iterable[Tensor]], timeout_s: float = 3600.0
) -> Callable[..., int]:
    """A layer-input feed (see :mod:`.histogram`) that runs ``model`` in ncnn on the batches.

    The feed calls ``fn(torch_name, input)`` with each layer's bottom blob ``[N, ...]`` float32
    (ncnn's unpacked layout, ``[C, H, W]`` per sample) and returns the samples seen;
    ``max_samples`` stops after that many. Consecutive batches are run in one child process up to
    :data:`CHUNK_SAMPLES` samples and :data:`CHUNK_BYTES` of extracted blobs (the first batch
    alone measures a sample's size); every sample is still one ncnn run, as in ncnn2table.

    Raises:
        NcnnRuntimeError: ncnn crashed, timed out or failed (from ``run_ncnn``).
    """
    blobs = sorted(set(model.bottom_blobs.values()))

    def feed(fn: Callable[[str, Tensor], None], max_samples: int | None = None) -> int:
        seen = 0
        per_sample: int | None = None  # bytes of the extracted blobs of one sample
        pending: list[np.ndarray] = []

        def flush() -> None:
            nonlocal per_sample
            arr = np.concatenate(pending) if len(pending) > 1 else pending[0]
            pending.clear()
            res = run_ncnn(model.param, model.bin, {model.input_blob: arr}, blobs, NCNN2TABLE_OPTIONS,
                           light_mode=False, timeout_s=timeout_s)
            per_sample = max(1, sum(res.outputs[b][:1].nbytes for b in blobs))
            for name, blob in model.bottom_blobs.items():
                fn(name, torch.from_numpy(np.ascontiguousarray(res.outputs[blob])))

        for x in batches():
            if max_samples is not None and seen >= max_samples:
                break
            if max_samples is not None:
                x = x[: max_samples - seen]
            arr = input_tensor(x).numpy()  # float32, or integer ids as run_ncnn feeds them
            if pending and arr.shape[1:] != pending[0].shape[1:]:
                flush()
            pending.append(arr)
            seen += int(arr.shape[0])
            n = sum(int(a.shape[0]) for a in pending)
            if per_sample is None or n >= min(CHUNK_SAMPLES, max(1, CHUNK_BYTES // per_sample)):
                flush()
        if pending:
            flush()
        return seen

    return feed


def workdir() -> tempfile.TemporaryDirectory:
    """A private folder for the converted model, removed when the calibration ends."""
    return tempfile.TemporaryDirectory(prefix="ncnnqat_calib_")
