"""Running ncnn models from Python: outputs, intermediate blobs, timing.

Every input is handed to ncnn as an ncnn-owned copy (:func:`owned_mat`, as ``worker.py``
does): ``ncnn.Mat(array)`` borrows the numpy array's memory without a reference count, and a
first layer that works in place (BatchNorm, BinaryOp, ReLU on the input) then dereferences that
missing count (``src/net.cpp``, the light-mode in-place check ``*bottom_blob.refcount != 1``): a
segfault however long the array stays referenced. An owned Mat held here has a count of 2
there, so ncnn clones it before writing: the caller's input is never changed.

Options are set before loading. A blob written by a layer with requantize fusion holds int8
values; ``extract`` casts them to float32 WITHOUT dequantizing (``src/net.cpp``:
``cast_int8_to_float32``), so the caller divides by the scale it wrote.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lightning_ncnnqat.ncnn.param import NcnnParam


def owned_mat(arr: np.ndarray) -> "ncnn.Mat":  # noqa: F821 - ncnn is imported when called
    """An ncnn-owned float32 copy of ``arr`` (see the module doc for why never a borrowed Mat)."""
    import ncnn

    borrowed = ncnn.Mat(np.ascontiguousarray(arr, dtype=np.float32))
    owned = borrowed.clone()
    del borrowed
    return owned


class NcnnNet:
    """An ncnn.Net loaded with the given options (ncnn's defaults unless overridden)."""

    def __init__(self, param_path: Path, bin_path: Path, *, int8: bool = True, **options: object) -> None:
        import ncnn

        self.param = NcnnParam.parse(Path(param_path).read_text())
        self.net = ncnn.Net()
        self.net.opt.use_int8_inference = int8
        for k, v in options.items():
            if not hasattr(self.net.opt, k):
                raise ValueError(f"ncnn.Option has no option {k!r}")
            setattr(self.net.opt, k, v)
        if self.net.load_param(str(param_path)) != 0:
            raise RuntimeError(f"ncnn could not load {param_path}")
        if self.net.load_model(str(bin_path)) != 0:
            raise RuntimeError(f"ncnn could not load {bin_path}")
        inputs = [lay.tops[0] for lay in self.param.layers if lay.type == "Input"]
        consumed = {b for lay in self.param.layers for b in lay.bottoms}
        outputs = [t for lay in self.param.layers for t in lay.tops if t not in consumed]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"expected one input and one output blob, got inputs {inputs}, outputs {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]

    def blobs(self, x: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Run one sample (no batch dim) and extract ``names``."""
        arr = np.ascontiguousarray(x, dtype=np.float32)
        ex = self.net.create_extractor()
        if len(names) > 1:
            ex.set_light_mode(False)  # keep intermediate blobs instead of recomputing them
        mat_in = owned_mat(arr)
        ex.input(self.input_name, mat_in)
        out = {}
        for name in names:
            ret, mat = ex.extract(name)
            if ret != 0:
                raise RuntimeError(f"ncnn could not extract blob '{name}' (error {ret})")
            out[name] = np.array(mat, copy=True).astype(np.float32, copy=False)
        del mat_in
        return out

    def run(self, x: np.ndarray) -> np.ndarray:
        """The model output for one sample, flattened."""
        return self.blobs(x, [self.output_name])[self.output_name].ravel()

    def run_batch(self, xs: np.ndarray) -> np.ndarray:
        """``[N, ...]`` inputs -> ``[N, out]`` outputs, one sample at a time."""
        return np.stack([self.run(x) for x in xs])

    def time_per_image(self, x: np.ndarray, runs: int = 30, warmup: int = 5) -> float:
        """Median wall time of one inference, in milliseconds."""
        mat_in = owned_mat(np.asarray(x, dtype=np.float32))
        times = []
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            ex = self.net.create_extractor()
            ex.input(self.input_name, mat_in)
            ret, _ = ex.extract(self.output_name)
            t1 = time.perf_counter()
            if ret != 0:
                raise RuntimeError(f"ncnn inference failed (error {ret})")
            if i >= warmup:
                times.append((t1 - t0) * 1e3)
            del ex
        return statistics.median(times)
