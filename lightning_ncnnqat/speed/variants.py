"""Int8 models of one export with some layers float, written exactly as the export would (issue 20).

The QAT start times candidate plans (layers kept float) without exporting again: the int8 writer
runs again on the export's float model and table with those layers' rows dropped. The export's
own int8 model is more than the writer's output, and a candidate timed without the rest reads
faster than what the export then writes (one cause of the QAT start's optimistic figure): the
export (``export/ncnn_branch.py``) writes Gemm / MultiHeadAttention / SDPA layers QAT trained as
int8 with their own scales, and masks every layer to float32 blobs (param 31, ``ncnn/fp32_blobs``;
on x86 that also keeps a float ``InnerProduct``'s weights float32 where ncnn would store them in
fp16 with F16C). :func:`write_variant` takes both from the export's ``model.int8.*`` itself, so a
candidate differs from what the export will write only in the layers it keeps float.
Torch-free.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lightning_ncnnqat.ncnn.bin_layout import locate
from lightning_ncnnqat.ncnn.fp32_blobs import featmask, mask_fp32_blobs
from lightning_ncnnqat.ncnn.int8_writer import Int8Spec, write_int8
from lightning_ncnnqat.ncnn.param import NcnnLayer, NcnnParam
from lightning_ncnnqat.ncnn.table import parse_table

__all__ = ["EXPORT_WRITTEN_TYPES", "write_variant"]

#: Layer kinds the export writes in int8 apart from the table's convs (QAT's own scales): taken
#: from the export's int8 model as they are.
EXPORT_WRITTEN_TYPES = ("Gemm", "MultiHeadAttention", "SDPA")


def write_variant(export_dir: str | Path, keep_float: set[str], float_weights: str = "fp32") -> tuple[str, bytes]:
    """``(param text, bin bytes)`` of export ``export_dir``'s int8 model with the ncnn layers
    ``keep_float`` float: the int8 writer run on ``model.ncnn.*`` and ``model.ncnn.table`` without
    their rows, then the layers of :data:`EXPORT_WRITTEN_TYPES` and the feature masks as in
    ``model.int8.*``; such a layer in ``keep_float`` float (without the writer's 18=2: what the
    export writes for one QAT keeps float). ``float_weights``: as the export wrote them (``report.float_weights``).

    Raises FileNotFoundError naming a missing file; NcnnFormatError when a file does not parse.
    """
    d = Path(export_dir)
    fparam = NcnnParam.parse((d / "model.ncnn.param").read_text(encoding="utf-8"))
    weights, inputs = parse_table((d / "model.ncnn.table").read_text(encoding="utf-8"))
    specs = {n: Int8Spec(n, n, np.asarray(w, dtype=np.float32), inputs[n]) for n, w in weights.items()
             if n not in keep_float}
    res = write_int8(fparam, (d / "model.ncnn.bin").read_bytes(), specs, quantize_gemm=False,
                     float_weights=float_weights)
    v, vbin = NcnnParam.parse(res.param_text), res.bin_bytes
    q = NcnnParam.parse((d / "model.int8.param").read_text(encoding="utf-8"))
    if any(lay.type in EXPORT_WRITTEN_TYPES for lay in v.layers):
        qbin = (d / "model.int8.bin").read_bytes()
        vl, ql = locate(v.layers, vbin), locate(q.layers, qbin)
        layers, chunks = [], []
        for i, lay in enumerate(v.layers):
            src, entries, data = (lay, vl[i], vbin)
            if lay.type in EXPORT_WRITTEN_TYPES and lay.name in keep_float:  # the writer's float layer; it
                # sets 18=2 on an SDPA as ncnn2int8 does: dropped, as the export writes one QAT keeps float
                src = NcnnLayer(lay.type, lay.name, list(lay.bottoms), list(lay.tops),
                                [(k, x) for k, x in lay.params if str(k) != "18"])
            elif lay.type in EXPORT_WRITTEN_TYPES:
                j = q.index(lay.name)
                src, entries, data = q.layers[j], ql[j], qbin
            layers.append(src)
            chunks += [data[e.offset:e.offset + e.nbytes] for e in entries]
        v, vbin = NcnnParam(layers), b"".join(chunks)
    text = v.to_text()
    if any(featmask(lay) for lay in q.layers):  # the export masked its int8 model: so is the variant
        text = mask_fp32_blobs(text)[0]
    return text, vbin
