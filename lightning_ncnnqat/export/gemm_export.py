"""The export's part for int8 Gemm layers (Linear on a 3-D/4-D input, ``qat/gemm.py``).

They take no table rows: the export checks that each one became an ncnn ``Gemm``, hands the
int8 writer one :class:`~lightning_ncnnqat.ncnn.int8_gemm.GemmSpec` per layer (the weight scale
QAT trained with, written in place of ncnn2int8's first-row scale), and gives the per-layer
checks a reference of each (``verification/gemm_checks.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lightning_ncnnqat.conversion.matching import WeightOwner
from lightning_ncnnqat.errors import LayerError
from lightning_ncnnqat.ncnn.int8_gemm import GemmSpec
from lightning_ncnnqat.qat.gemm import GEMM_KIND, GemmLayerInfo
from lightning_ncnnqat.verification.layer_checks import QuantizedRef
from lightning_ncnnqat.verification.report import LayerReport


def check_gemm_owners(gemms: Sequence[GemmLayerInfo], owners: Mapping[str, WeightOwner]) -> set[str]:
    """The torch names of ``gemms``, after checking each was matched to an ncnn ``Gemm``.

    Raises LayerError naming the layer (and how to keep it in float) when the converter made
    another layer of it (its int8 would then be a table row QAT did not train for)."""
    for g in gemms:
        o = owners.get(g.name)
        if o is not None and o.kind != GEMM_KIND:
            raise LayerError(
                g.name,
                f"layer '{g.name}' (Linear on a {g.input_rank}-D input, trained as ncnn's int8 Gemm) was converted to an "
                f"ncnn {o.kind} ('{o.name}'), not a Gemm; keep it in float (QATCallback(skip=[{g.name!r}]) / "
                "QATConfig(skip=...))",
            )
    return {g.name for g in gemms}


def gemm_specs_and_refs(
    gemms: Sequence[GemmLayerInfo], ncnn_names: Mapping[str, str]
) -> tuple[dict[str, GemmSpec], list[QuantizedRef]]:
    """The int8 writer's specs (by ncnn name) and the per-layer check entries of ``gemms``
    (``weight_fq`` holds the float weight: the reference quantizes it per call, as ncnn does)."""
    specs, refs = {}, []
    for g in gemms:
        n = ncnn_names[g.name]
        specs[n] = GemmSpec(n, g.name, g.b_scale)
        refs.append(QuantizedRef(g.name, n, g.weight, g.bias, 1.0))  # 1.0: no input scale (dynamic per row)
    return specs, refs


def gemm_layer_reports(gemms: Sequence[GemmLayerInfo]) -> list[LayerReport]:
    """One report line per int8 Gemm: 8-bit, one weight scale, input scale 0 (quantized per row at
    run time: none is written)."""
    return [LayerReport(g.name, None, None, GEMM_KIND, 8, 0.0, 1, g.name) for g in gemms]


def gemm_notes(written: Mapping[str, Mapping[str, object]], specs: Mapping[str, GemmSpec]) -> list[str]:
    """The report's note on the Gemms written in int8 and where they depart from ncnn2int8."""
    ours = {n: info for n, info in written.items() if n in specs}
    if not ours:
        return []
    clipped = {n: int(info["ncnn2int8_B_clipped"]) for n, info in ours.items() if info.get("ncnn2int8_B_clipped")}
    names = sorted(ours)
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    line = (
        f"{len(names)} Gemm layer(s) ({shown}) are int8 (18=2): input rows quantized at run time, the weight with "
        "one scale from all of it, as QAT trained them"
    )
    if clipped:
        worst = sorted(clipped, key=lambda n: -clipped[n])[:3]
        line += (
            "; ncnn2int8 would take that scale from the weight's first row only and clip "
            f"{sum(clipped.values())} weight values in {len(clipped)} of them (most: "
            + ", ".join(f"{n}: {clipped[n]}" for n in worst) + ")"
        )
    return [line]
