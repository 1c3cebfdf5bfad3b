"""Int8 vs float speed in this machine's ncnn: whole models, single layers, requantize chains.

Why it exists: on x86 without VNNI (and on ARMv8.2 cores, where float runs in fp16) ncnn's int8
model is often slower than its float model (issue 20). What loses is measurable per layer:
:func:`measure_layers` times every int8 layer of an export alone, int8 against its float twin;
:func:`plan_speed` turns that into the layers to keep float (``QATConfig(skip=...)``).

Every timing runs in a child process (``speed_worker.py``: numpy + ncnn only), interleaved
(int8 and float alternate within one run) and is reported as median with min/max, with ncnn's
default options except ``num_threads``.
"""

from __future__ import annotations

import json
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_ncnnqat.export.api import export
from lightning_ncnnqat.ncnn.isolated import NcnnRuntimeError
from lightning_ncnnqat.ncnn.bin_layout import locate
from lightning_ncnnqat.ncnn.param import CONV_TYPES, INT8_TYPES, NcnnLayer, NcnnParam
from lightning_ncnnqat.ncnn.timing import (  # noqa: F401 - the timing primitives, importable from here too
    WORKER,
    ModelToTime,
    Timing,
    blob_shapes,
    paired_speedup,
    time_models,
)
from lightning_ncnnqat.policy.speed import SPEED_TIE_TOLERANCE

#: A ratio of medians within this fraction of 1 is a tie (the one value: ``policy.speed``).
TIE_TOLERANCE = SPEED_TIE_TOLERANCE

PREFERS = ("speed", "int8")  # plan_speed's; QATConfig.prefer adds "size" (policy.speed.PREFERS)


def judge(int8: Timing, fp: Timing, tolerance: float = TIE_TOLERANCE, on: str = "wall") -> str:
    """``"faster"``, ``"slower"`` or ``"tie"``: int8 against float by the ratio of medians of
    ``on`` ("wall" or "cpu" time); within ``tolerance`` of 1 it is a tie (run-to-run noise)."""
    if not 0 <= tolerance < 1:
        raise ValueError(f"judge: `tolerance` must be in [0, 1), got {tolerance!r}")
    speedup = fp.ms(on) / int8.ms(on)
    if speedup >= 1 + tolerance:
        return "faster"
    if speedup <= 1 - tolerance:
        return "slower"
    return "tie"


@dataclass
class ChainCount:
    """Int8 layers of an int8 .param and how many convs hand their output on as int8."""

    int8_layers: int  # Convolution / ConvolutionDepthWise / InnerProduct with param 8 set
    int8_convs: int  # the Convolution / ConvolutionDepthWise among them
    requantized: int  # convs with param 8 > 100 (output requantized into the next int8 conv)
    breakers: dict[str, int] = field(default_factory=dict)  # layer type between two int8 convs -> count


def count_chains(param_text: str) -> ChainCount:
    """Count int8 chains in an int8 ``.param`` (what ncnn2int8's fuse_requantize left).

    ``breakers`` counts, by type, the single float layer that sits between an int8 conv and an
    int8 conv reading its result (SiLU runs as ``Swish``, HardSwish as ``HardSwish``): the
    activations that stop a requantize chain.
    """
    param = NcnnParam.parse(param_text)
    int8 = [lay for lay in param.layers if lay.type in INT8_TYPES and lay.get_int(8, 0) > 0]
    convs = [lay for lay in int8 if lay.type in CONV_TYPES]
    breakers: dict[str, int] = {}
    int8_names = {lay.name for lay in convs}
    for lay in param.layers:
        if lay.type in INT8_TYPES or len(lay.bottoms) != 1 or len(lay.tops) != 1:
            continue
        prod = param.producer(lay.bottoms[0])
        if prod is None or prod.name not in int8_names:
            continue
        if any(c.name in int8_names for c in param.consumers(lay.tops[0])):
            breakers[lay.type] = breakers.get(lay.type, 0) + 1
    return ChainCount(len(int8), len(convs), sum(lay.get_int(8, 0) > 100 for lay in convs), breakers)


def quantize_model(blob: str, shape: list[int]) -> tuple[str, bytes]:
    """An Input of ``shape`` and ncnn's ``Quantize`` layer (one scale, float -> int8): what an
    int8 layer whose input is float pays before its kernel runs (src/layer/quantize.cpp reads
    0=scale_data_size, then that many raw float scales)."""
    dims = [(str(k), str(v)) for k, v in enumerate(list(shape)[::-1])]
    text = NcnnParam([NcnnLayer("Input", f"in_{blob}", [], [blob], dims),
                      NcnnLayer("Quantize", "quantize", [blob], [f"{blob}_q"], [("0", "1")])]).to_text()
    return text, struct.pack("<f", 32.0)


def single_layer_model(param: NcnnParam, bin_bytes: bytes, index: int, shapes: Mapping[str, list[int]]) -> tuple[str, bytes]:
    """A .param/.bin holding layer ``index`` alone, fed by Input layers of ``shapes``.

    A fused requantize (param 8 > 100) is undone (its output scale dropped): alone, the layer
    takes float in and gives float out, so its int8 time includes the quantize of its input and
    the dequantize of its output, the price of an int8 layer outside a chain.
    """
    lay = param.layers[index]
    entries = locate(param.layers, bin_bytes)[index]
    chunks = [bin_bytes[e.offset:e.offset + e.nbytes] for e in entries if e.role != "output_scale"]
    params = list(lay.params)
    term = lay.get_int(8, 0)
    one = NcnnLayer(lay.type, lay.name, list(lay.bottoms), list(lay.tops), params)
    if term > 100:
        one.set_int(8, term - 100)
    inputs = []
    for b in lay.bottoms:
        s = list(shapes[b])[::-1]  # ncnn Input params: 0=w 1=h 2=c
        inputs.append(NcnnLayer("Input", f"in_{b}", [], [b], [(str(k), str(v)) for k, v in enumerate(s)]))
    return NcnnParam(inputs + [one]).to_text(), b"".join(chunks)


@dataclass
class LayerTiming:
    """One int8 layer timed alone: int8 against its float twin."""

    ncnn_name: str
    type: str
    int8: Timing
    float: Timing
    requantized: bool  # in the full int8 model its output goes on as int8
    kernel: int = 0  # param 1 (kernel_w) of a conv; 0 for InnerProduct
    quantize: Timing | None = None  # an ncnn Quantize layer alone on this layer's input (part of ``int8``)

    @property
    def speedup(self) -> float:
        """float / int8 median process CPU time (alone, one thread: the layer's own work)."""
        return self.float.ms("cpu") / self.int8.ms("cpu")


def _export_files(export_dir: Path, io: Mapping[str, Any] | None = None) -> tuple[dict[str, list[int]], list[str]]:
    if io is None:
        io = json.loads((export_dir / "report.json").read_text(encoding="utf-8")).get("io", {})
    inputs = {i["blob"]: list(i["shape"]) for i in io.get("inputs", [])}
    outputs = [o["blob"] for o in io.get("outputs", [])]
    if not inputs or not outputs:
        raise ValueError(f"{export_dir / 'report.json'} names no input/output blobs (io); is it an export's report?")
    return inputs, outputs


def whole_models(
    export_dir: str | Path, threads: int | None = 1, io: Mapping[str, Any] | None = None
) -> tuple[ModelToTime, ModelToTime]:
    """The float (``model.ncnn.*``) and int8 (``model.int8.*``) models of an export, to time.

    ``threads=None`` keeps ncnn's default thread count. ``io``: the report's ``io`` (input and
    output blobs), read from ``report.json`` when None. Raises FileNotFoundError naming a
    missing file.
    """
    d = Path(export_dir).resolve()
    needed = ("model.ncnn.param", "model.ncnn.bin", "model.int8.param", "model.int8.bin") + ("report.json",) * (io is None)
    for f in needed:
        if not (d / f).is_file():
            raise FileNotFoundError(f"{d}: no {f} (an export directory written by lightning_ncnnqat.export)")
    inputs, outputs = _export_files(d, io)
    opts = {} if threads is None else {"num_threads": int(threads)}
    return (ModelToTime("float", str(d / "model.ncnn.param"), str(d / "model.ncnn.bin"), inputs, outputs, opts),
            ModelToTime("int8", str(d / "model.int8.param"), str(d / "model.int8.bin"), inputs, outputs, opts))


def measure_layers(
    export_dir: str | Path, threads: int = 1, runs: int = 20, warmup: int = 3, io: Mapping[str, Any] | None = None,
    quantize: bool = True,
) -> list[LayerTiming]:
    """Time every int8 layer of an export alone, int8 against the same layer of the float model.

    Each layer is cut out (:func:`single_layer_model`) of ``model.int8.*`` and ``model.ncnn.*``
    and fed a random input of the shape ncnn gives its input blob; all of them are timed in one
    interleaved child process. ``quantize``: also time an ncnn Quantize of each layer's input
    (what its int8 time spends converting). ``io``: as :func:`whole_models`. Returns one
    :class:`LayerTiming` per int8 layer, in .param order.
    """
    d = Path(export_dir).resolve()
    fp_model, q_model = whole_models(d, threads, io)
    fparam = NcnnParam.parse((d / "model.ncnn.param").read_text(encoding="utf-8"))
    qparam = NcnnParam.parse((d / "model.int8.param").read_text(encoding="utf-8"))
    fbin, qbin = (d / "model.ncnn.bin").read_bytes(), (d / "model.int8.bin").read_bytes()
    idx = [i for i, lay in enumerate(qparam.layers) if lay.type in INT8_TYPES and lay.get_int(8, 0) > 0]
    if not idx:
        return []
    bottoms = sorted({b for i in idx for b in qparam.layers[i].bottoms})
    shapes = {**fp_model.inputs, **blob_shapes(fp_model, [b for b in bottoms if b not in fp_model.inputs])}
    models: list[ModelToTime] = []
    with tempfile.TemporaryDirectory(prefix="ncnnqat_layers_") as tmp:
        for i in idx:
            lay = qparam.layers[i]
            fi = fparam.index(lay.name)
            for tag, param, data, k in (("int8", qparam, qbin, i), ("float", fparam, fbin, fi), ("quant", None, b"", i)):
                if tag == "quant":
                    if len(lay.bottoms) != 1 or not quantize:
                        continue
                    text, blob = quantize_model(lay.bottoms[0], shapes[lay.bottoms[0]])
                else:
                    text, blob = single_layer_model(param, data, k, shapes)
                p, b = Path(tmp) / f"{i}_{tag}.param", Path(tmp) / f"{i}_{tag}.bin"
                p.write_text(text, encoding="utf-8")
                b.write_bytes(blob)
                tops = [f"{lay.bottoms[0]}_q"] if tag == "quant" else list(lay.tops)
                models.append(ModelToTime(f"{i}:{tag}", str(p), str(b), {x: shapes[x] for x in lay.bottoms},
                                          tops, {"num_threads": int(threads)}))
        t = time_models(models, runs=runs, warmup=warmup)
    return [LayerTiming(qparam.layers[i].name, qparam.layers[i].type, t[f"{i}:int8"], t[f"{i}:float"],
                        qparam.layers[i].get_int(8, 0) > 100,
                        qparam.layers[i].get_int(1, 0) if qparam.layers[i].type in CONV_TYPES else 0,
                        t.get(f"{i}:quant")) for i in idx]


@dataclass
class SpeedPlan:
    """What :func:`plan_speed` measured and decided (layers by torch name)."""

    prefer: str
    layers: dict[str, tuple[float, float]]  # torch name -> (int8 ms, float ms), medians, alone (CPU time at 1 thread)
    keep_float: list[str]  # torch names to keep float: QATConfig(skip=...)
    model_ms: dict[str, Timing]  # "float" / "int8": the whole exported models, interleaved
    threads: int

    @property
    def int8_pays(self) -> bool:
        """False when every int8 layer loses alone: QAT with all of them skipped has nothing to
        quantize (prepare_qat refuses that); deploy the float model, or use ``prefer="int8"``."""
        return len(self.keep_float) < len(self.layers)

    def summary(self) -> str:
        f, q = self.model_ms["float"], self.model_ms["int8"]
        lines = [f"whole model ({self.threads} thread(s)): float {f.median_ms:.3f} ms, int8 {q.median_ms:.3f} ms "
                 f"({f.median_ms / q.median_ms:.2f}x)"]
        if not self.int8_pays:
            lines.append(f"int8 does not pay here: all {len(self.layers)} int8 layers are slower than float alone; "
                         "deploy the float model, or keep int8 with prefer='int8'")
            return "\n".join(lines)
        for name in self.keep_float:
            q_ms, f_ms = self.layers[name]
            lines.append(f"keep float: {name} (alone: int8 {q_ms:.3f} ms vs float {f_ms:.3f} ms)")
        return "\n".join(lines)


def plan_speed(
    model: Any, example_input: Any, prefer: str = "speed", threads: int = 1, runs: int = 20,
    tolerance: float = TIE_TOLERANCE, export_dir: str | Path | None = None,
) -> SpeedPlan:
    """Measure which int8 layers of a QAT-prepared ``model`` lose time against float here.

    Exports ``model`` (x86 only, no parity timing; into ``export_dir`` or a temporary
    directory), times every int8 layer alone (:func:`measure_layers`) and the whole float and
    int8 models, and with ``prefer="speed"`` names the layers whose int8 median is slower than
    float by more than ``tolerance`` in ``keep_float`` (``prefer="int8"``: none).

    Caveat: a layer alone pays the quantize of its input and the dequantize of its output; inside
    a requantize chain it pays neither, so this leans towards float for chained layers. Whole-
    model timings of the re-prepared model (``QATConfig(skip=plan.keep_float)``) confirm.

    Raises ValueError for an unknown ``prefer``; ExportError when the export fails.
    """
    if prefer not in PREFERS:
        raise ValueError(f"plan_speed: `prefer` must be one of {PREFERS}, got {prefer!r}")
    with tempfile.TemporaryDirectory(prefix="ncnnqat_plan_") as tmp:
        d = Path(export_dir) if export_dir is not None else Path(tmp)
        report = export(model, d, example_input, verbose=False, targets=["x86"], timing_runs=0,
                        check_onnx=False, layer_check_samples=1)
        if report.failures:
            raise NcnnRuntimeError(f"plan_speed: the export failed: {report.failures[0]}")
        torch_of = {lay.ncnn_name: lay.torch_name for lay in report.layers if lay.ncnn_name}
        timed = measure_layers(d, threads=threads, runs=runs)
        whole = time_models(list(whole_models(d, threads)), runs=runs)
    on = "cpu" if threads == 1 else "wall"  # one thread: CPU time is immune to a busy machine's preemption
    layers = {torch_of.get(t.ncnn_name, t.ncnn_name): (t.int8.ms(on), t.float.ms(on)) for t in timed}
    keep = []
    if prefer == "speed":
        keep = [torch_of.get(t.ncnn_name, t.ncnn_name) for t in timed if judge(t.int8, t.float, tolerance, on) == "slower"]
    return SpeedPlan(prefer, layers, keep, whole, threads)
