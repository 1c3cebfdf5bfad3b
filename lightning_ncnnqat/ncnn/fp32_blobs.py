"""Keep an int8 model's float blobs in float32 on every core, under ncnn's default options.

Why: on ARMv8.2 cores (Cortex-A55/A76/A78, ``cpu_support_arm_asimdhp``) ncnn's defaults
(``use_fp16_storage``, ``use_fp16_arithmetic``) store every blob between layers in fp16 and run
float layers in fp16. In an int8 model that rounds each dequantized int8 output and every float
layer's input and output to 11 bits, and the next int8 layer quantizes the rounded value, so
int8 codes near a rounding edge flip a whole step. QAT simulates float32 blobs, so parity with
it drops: the main job's ResNet-18 (digits) went from cosine 0.999998 (fp16 off) to 0.999868 on
the emulated Cortex-A76 under default options; ``use_fp16_arithmetic=False`` alone recovers only
a sixth of the gap (storage is most of it).

How: ncnn reads param id 31 of every layer as its *feature mask* (``src/net.cpp``,
``Net::load_param``: "pull out layer specific feature disabled set"); ``get_masked_option``
turns options off for that layer only: bit 0 ``use_fp16_arithmetic``, bit 1 ``use_fp16_storage``
and ``use_fp16_packed``. Bit 1 on one layer alone crashes the runtime (measured on the emulated
A76: SIGSEGV, or "pool allocator get wild" with bits 0+1), and the source says why:
``NetPrivate::convert_layout`` casts an fp16 input blob back to float32 only when the *consuming*
layer's options still have ``use_fp16_storage`` on, so a masked layer fed by an unmasked one
receives fp16 data it reads as float32. The direction float32 -> fp16 is always converted. So a
layer may carry bit 1 only when every layer producing its inputs carries it too (the ``Input``
layer produces float32): the masked layers must be closed under "producer of". Masking every
layer is the simple closed set: no layer's options ever cast to fp16, no blob is ever fp16, and
the model computes as with ``use_fp16_storage=False`` while the user keeps the defaults.

Where it does nothing: x86 and ARMv8.0 (Cortex-A53) store blobs in float32 anyway (the
``NCNN_VFPV4`` fp16 storage of aarch64 builds is used by ``Gemm`` only; x86's F16C path stores
float ``InnerProduct`` weights in fp16: bit 1 keeps them float32 there too, closer to QAT).
Older ncnn releases without the feature mask ignore param 31.

Standard library only (plus :mod:`lightning_ncnnqat.ncnn.param`); no torch.
"""

from __future__ import annotations

from lightning_ncnnqat.errors import NcnnQatError
from lightning_ncnnqat.ncnn.param import NcnnParam

#: ncnn's param id of the per-layer feature mask (``layer->featmask = pd.get(31, 0)``).
FEATMASK_ID = 31
#: Bit 0: no fp16 arithmetic in this layer.
NO_FP16_ARITHMETIC = 1 << 0
#: Bit 1: no fp16 storage / fp16 packed blobs in this layer.
NO_FP16_STORAGE = 1 << 1
#: The mask written on every layer of the int8 model: float32 blobs and float32 arithmetic.
FP32_BLOBS = NO_FP16_ARITHMETIC | NO_FP16_STORAGE


class FeatmaskError(NcnnQatError, ValueError):
    """A feature mask ncnn's runtime would crash on (bit 1 on a layer fed by an fp16 blob)."""


def featmask(layer) -> int:  # noqa: ANN001 - an NcnnLayer
    """The layer's feature mask (param 31; 0 when absent)."""
    return layer.get_int(FEATMASK_ID, 0)


def unsafe_featmasks(param: NcnnParam) -> list[str]:
    """Layers whose feature mask ncnn would crash on, each as ``"layer 'name' ... from 'producer'"``.

    A layer with :data:`NO_FP16_STORAGE` set is unsafe when one of its input blobs is produced
    by a layer without it (other than ``Input``): that blob may be fp16 and the masked layer
    would not convert it (see the module doc). An empty list means every mask is safe.
    """
    producer = {t: lay for lay in param.layers for t in lay.tops}
    problems = []
    for lay in param.layers:
        if not featmask(lay) & NO_FP16_STORAGE:
            continue
        for b in lay.bottoms:
            src = producer.get(b)
            if src is not None and src.type != "Input" and not featmask(src) & NO_FP16_STORAGE:
                problems.append(
                    f"layer '{lay.name}' has featmask {featmask(lay)} (no fp16 storage) but its input '{b}' comes from "
                    f"'{src.name}' (featmask {featmask(src)}), which may store it in fp16"
                )
    return problems


def check_featmasks(param: NcnnParam, where: str = "model.int8.param") -> None:
    """Raise :class:`FeatmaskError` naming the first layer of ``param`` whose mask would crash ncnn."""
    problems = unsafe_featmasks(param)
    if problems:
        first = problems[0].split("'")[1]
        raise FeatmaskError(
            f"{where}: {problems[0]}; ncnn's runtime crashes on such a mask (set bit 1 on every producer too)"
            + (f" ({len(problems) - 1} more)" if len(problems) > 1 else ""),
            layer=first,
            value=problems,
        )


def mask_fp32_blobs(param_text: str) -> tuple[str, int]:
    """``param_text`` with :data:`FP32_BLOBS` OR-ed into every layer's feature mask.

    Returns the new text and the number of layers whose mask changed. The result is checked
    with :func:`check_featmasks` (always safe: every layer carries bit 1).

    Raises:
        NcnnFormatError: ``param_text`` is not a valid .param file.
    """
    param = NcnnParam.parse(param_text)
    changed = 0
    for lay in param.layers:
        if lay.type == "Input":  # never run (Net skips it); its blob is the user's float32 input
            continue
        old = featmask(lay)
        if old | FP32_BLOBS != old:
            lay.set_int(FEATMASK_ID, old | FP32_BLOBS)
            changed += 1
    check_featmasks(param)
    return param.to_text(), changed


def strip_fp32_blobs(param_text: str) -> str:
    """``param_text`` without the :data:`FP32_BLOBS` bits (other mask bits kept): the int8 model
    then runs its float layers in fp16 on ARMv8.2, faster there and less faithful to QAT."""
    param = NcnnParam.parse(param_text)
    for lay in param.layers:
        old = featmask(lay)
        if old & FP32_BLOBS:
            new = old & ~FP32_BLOBS
            if new:
                lay.set_int(FEATMASK_ID, new)
            else:
                lay.params = [(k, v) for k, v in lay.params if int(k) != FEATMASK_ID]
    return param.to_text()


def fp32_blobs_note(changed: int) -> str:
    """The report's note on the mask written into ``model.int8.param``."""
    return (
        f"model.int8.param sets ncnn's per-layer feature mask 31={FP32_BLOBS} on its {changed} layer(s): float "
        "layers and the blobs between layers stay float32 on ARMv8.2 cores under default options (ncnn stores them in "
        "fp16 there otherwise, which costs int8 parity with QAT); no effect on x86 or ARMv8.0. To trade that parity for "
        "ARMv8.2 fp16 speed, remove it with lightning_ncnnqat.ncnn.fp32_blobs.strip_fp32_blobs (docs/targets.md)"
    )
