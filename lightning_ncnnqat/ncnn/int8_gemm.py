"""Gemm in int8 as ncnn reads it, with the weight scale QAT trained with (torch-free).

pnnx writes ``nn.Linear`` on a 3-D/4-D input as a ``Gemm`` (2=0 3=1 4=0 5=1: A the input rows,
B the constant weight ``[N, K]`` stored transposed, C the bias, 10=4, or 6=1 10=-1 without
one) between two Reshapes. ncnn runs it in int8 when param 18 (``quantize_term``/
``int8_scale_term``) is 2 (``src/layer/gemm.cpp``, ``x86/gemm_x86.cpp``, ``arm/gemm_arm.cpp``):

* A is quantized at run time, one scale per row: ``127 / absmax(row)``;
* B is read from the .bin as int8 (tag 0x000D4B38; the optimized kernels pack it as int8 in
  ``create_pipeline_int8`` and never quantize a float B), with ONE float32 scale after the
  arrays (``B_data_int8_scale``, raw, no tag);
* int32 accumulation, ``acc * absmax_row / (127 * B_scale) + C`` in float32.

What this module writes for a Gemm QAT planned (:func:`write_gemm_int8`): B quantized per
tensor with ``127 / absmax(all of B)`` (the scale ``ops.reference.gemm_int8_levels`` trains
with), transposed to 3=1 when it was not, C kept as float32 (tag 0), 18=2.

Where this departs from ncnn2int8 (``tools/quantize/ncnn2int8.cpp`` ``quantize_gemm``): the
tool quantizes EVERY Gemm, without table rows, and for a B stored transposed (3=1, pnnx's form)
its absmax loop runs over ``B_data.w`` = K values, B's FIRST ROW only, so every other row whose
values exceed that row's range is clipped to +-127 (:func:`ncnn2int8_gemm_chunks` reproduces the
tool for byte-identity; :func:`ncnn2int8_b_scale` gives its scale, reported next to ours). The
tool also stores C as float16; here it stays float32, the bias QAT computed with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lightning_ncnnqat.errors import LayerError
from lightning_ncnnqat.ncnn.bin_layout import TAG_FP32, TAG_INT8, BinEntry, raw_f32, tagged
from lightning_ncnnqat.ncnn.param import NcnnLayer, NcnnParam

#: Gemm params (src/layer/gemm.cpp load_param): 2 transA, 3 transB, 4/5/6 constant A/B/C,
#: 7/8/9 M/N/K, 10 broadcast type of C, 18 quantize_term (2: int8).
INT8_TERM = 2


@dataclass
class GemmSpec:
    """One Gemm QAT trained as int8: its ncnn and torch names and the B scale the QAT forward used
    (``127 / absmax(weight)``, float32), checked against the one computed from the ncnn weights."""

    ncnn_name: str
    torch_name: str
    b_scale: float


def b_scale_of(b: np.ndarray) -> np.float32:
    """``127 / absmax(b)`` over b's finite values in float32; 1 for an all-zero b (ncnn's guard)."""
    a = np.abs(np.asarray(b, dtype=np.float32))
    m = np.float32(a[np.isfinite(a)].max()) if a.size and np.isfinite(a).any() else np.float32(0)
    return np.float32(1) if m == 0 else np.float32(127) / m


def ncnn2int8_b_scale(b_nk: np.ndarray) -> np.float32:
    """The B scale ncnn2int8 writes for a transposed B ``[N, K]``: from its first row only."""
    return _absmax_scale(np.asarray(b_nk, dtype=np.float32)[:1])


def quantize_b(b: np.ndarray, scale: np.float32) -> np.ndarray:
    """int8 levels ``clamp(round_half_away(b * scale), -127, 127)`` in float32 math, as
    ``ops.reference.gemm_int8_levels`` computes them for the QAT forward."""
    v = np.clip(np.asarray(b, dtype=np.float32) * np.float32(scale), np.float32(-127), np.float32(127))
    t = np.trunc(v)
    return (t + np.where(np.abs(v - t) >= np.float32(0.5), np.sign(v), np.float32(0))).astype(np.int8)


def gemm_b_matrix(lay: NcnnLayer, entries: list[BinEntry], data: bytes) -> np.ndarray:
    """The constant B of a float Gemm as ``[N, K]`` float32 (transposed when stored with 3=0).

    Raises LayerError (naming the ncnn layer) for a Gemm this module cannot write in int8: a
    constant A, a transposed A, no constant B, alpha/beta other than 1, or one already quantized.
    """
    g = lay.get_int
    why = None
    if g(18, 0):
        why = f"is already quantized (18={g(18, 0)})"
    elif g(4, 0) or not g(5, 0):
        why = "has no constant B or a constant A (not a Linear)"
    elif g(2, 0):
        why = "reads A transposed (2=1)"
    elif lay.get_float(0, 1.0) != 1.0 or lay.get_float(1, 1.0) != 1.0:
        why = f"has alpha={lay.get_float(0, 1.0)} / beta={lay.get_float(1, 1.0)} (not 1)"
    es = {e.role: e for e in entries}
    if why is None and ("B" not in es or es["B"].tag == TAG_INT8):
        why = "holds no float B"
    if why is not None:
        raise LayerError(None, f"ncnn layer '{lay.name}' (Gemm) {why}: it cannot be written as a QAT-trained int8 Gemm")
    n, k = g(8, 0), g(9, 0)
    b = es["B"].values(data)
    return b.reshape(n, k) if g(3, 0) else b.reshape(k, n).T.copy()


def write_gemm_int8(lay: NcnnLayer, entries: list[BinEntry], data: bytes, spec: GemmSpec) -> tuple[list[bytes], dict]:
    """The .bin chunks of Gemm ``lay`` in int8 (``lay``'s params are updated in place: 3=1, 18=2)
    and what was written: ``{"B_scale", "ncnn2int8_B_scale", "ncnn2int8_B_clipped"}`` (the
    tool's first-row scale and how many B values it would clip).

    Raises LayerError naming the torch layer when the layer cannot be written (see
    :func:`gemm_b_matrix`) or when the B scale from the ncnn weights differs from the one the
    QAT forward used (the matched weights would not be the trained ones).
    """
    try:
        b = gemm_b_matrix(lay, entries, data)
    except LayerError as e:
        raise LayerError(spec.torch_name, f"layer '{spec.torch_name}': {e}") from None
    scale = b_scale_of(b)
    if scale != np.float32(spec.b_scale):
        raise LayerError(
            spec.torch_name,
            f"layer '{spec.torch_name}': ncnn layer '{lay.name}' holds a weight whose int8 scale is {float(scale)!r}, "
            f"the QAT forward used {spec.b_scale!r}",
        )
    chunks = [tagged(TAG_INT8, quantize_b(b, scale).tobytes())]
    c = next((e for e in entries if e.role == "C"), None)
    if c is not None:
        chunks.append(tagged(TAG_FP32, c.values(data).astype("<f4").tobytes()))
    chunks.append(raw_f32(np.array([scale], dtype=np.float32)))
    lay.set_int(3, 1)
    lay.set_int(18, INT8_TERM)
    tool = ncnn2int8_b_scale(b)
    clipped = int(np.count_nonzero(np.abs(b * tool) >= np.float32(127.5)))
    return chunks, {"B_scale": float(scale), "ncnn2int8_B_scale": float(tool), "ncnn2int8_B_clipped": clipped}


def check_gemm_specs(param: NcnnParam, gemm_specs: dict[str, GemmSpec] | None) -> dict[str, GemmSpec]:
    """``gemm_specs`` (by ncnn name) after checking each names exactly one Gemm of ``param``;
    LayerError naming the torch layer otherwise."""
    gemm = dict(gemm_specs or {})
    for g in gemm.values():
        hits = param.indices(g.ncnn_name)
        if len(hits) != 1 or param.layers[hits[0]].type != "Gemm":
            raise LayerError(g.torch_name, f"layer '{g.torch_name}': ncnn layer '{g.ncnn_name}' is not exactly one Gemm "
                             f"of the model ({len(hits)} layers carry that name)")
    return gemm


# --- what ncnn2int8 itself writes (tools/quantize/ncnn2int8.cpp quantize_gemm), for byte identity --


def _ncnn_quantize(w: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """int8 of ``w`` [rows, cols] with ncnn's own ``quantize_to_int8`` (what ncnn2int8 calls)."""
    import ncnn

    src = np.ascontiguousarray(w, dtype=np.float32)
    sc = np.ascontiguousarray(scales, dtype=np.float32)
    m_src, m_sc, out = ncnn.Mat(src), ncnn.Mat(sc), ncnn.Mat()  # Mats borrow: arrays stay referenced
    opt = ncnn.Option()
    opt.use_packing_layout = False
    opt.num_threads = 1
    ncnn.quantize_to_int8(m_src, out, m_sc, opt)
    q = np.array(out, copy=True).astype(np.int8).ravel()
    del m_src, m_sc, out
    return q


def _absmax_scale(v: np.ndarray) -> np.float32:
    """``absmax == 0 ? 1 : 127 / absmax`` in float32 (ncnn2int8's quantize_gemm)."""
    m = np.float32(np.max(np.abs(v))) if v.size else np.float32(0)
    return np.float32(1) if m == 0 else np.float32(127) / m


def ncnn2int8_gemm_chunks(
    lay: NcnnLayer, entries: list[BinEntry], data: bytes, float_chunks: Callable[[NcnnLayer, list[BinEntry]], list[bytes]]
) -> tuple[list[bytes], dict[str, object]]:
    """ncnn2int8's quantize_gemm on one layer, byte for byte (``lay`` params are updated in place):
    a constant A per row, a constant B with one scale (its first row's when stored transposed),
    C and an already-quantized layer through ``float_chunks`` (the writer's float storage)."""
    g = lay.get_int
    if g(18, 0):
        return float_chunks(lay, entries), {}
    m, n, k = g(7, 0), g(8, 0), g(9, 0)
    es = {e.role: e for e in entries}
    chunks: list[bytes] = []
    info: dict[str, object] = {}
    a_scales = b_scale = None
    for e in entries:
        if e.tagged and e.tag == TAG_INT8:
            raise LayerError(None, f"ncnn layer '{lay.name}' (Gemm) already holds int8 data")
    if "A" in es:
        a = es["A"].values(data)
        a = a.reshape(k, m).T if g(2, 0) == 1 else a.reshape(m, k)
        a_scales = np.array([_absmax_scale(row) for row in a], dtype=np.float32)
        chunks.append(tagged(TAG_INT8, _ncnn_quantize(a, a_scales).tobytes()))
        lay.set_int(2, 0)
        info["A_scales"] = a_scales
    if "B" in es:
        b = es["B"].values(data)
        if g(3, 0) == 0:
            b = b.reshape(k, n).T
            b_scale = _absmax_scale(b)
        else:
            b = b.reshape(n, k)
            b_scale = _absmax_scale(b[:1])  # ncnn2int8 reads B_data.w = K values: the first row
        chunks.append(tagged(TAG_INT8, _ncnn_quantize(b.reshape(1, -1), np.array([b_scale])).tobytes()))
        lay.set_int(3, 1)
        info["B_scale"] = float(b_scale)
        info["B_clipped"] = int(np.count_nonzero(np.abs(b * b_scale) > 127.5))
    if "C" in es:
        chunks += float_chunks(lay, [es["C"]])
    if a_scales is not None:
        chunks.append(raw_f32(a_scales))
    if b_scale is not None:
        chunks.append(raw_f32(np.array([b_scale], dtype=np.float32)))
    lay.set_int(18, 2)
    return chunks, info
