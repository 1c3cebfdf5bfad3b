"""What ncnn's own int8 models reach on this CPU: benchncnn's float / int8 param pairs, timed side by side.

    git clone --depth 1 https://github.com/Tencent/ncnn /tmp/ncnn     # any checkout: benchmark/models/*.param
    python benchmarks/benchncnn_ref.py --models-dir /tmp/ncnn/benchmark/models --threads 1 2 --runs 20
    python benchmarks/benchncnn_ref.py --models-dir ... --pairs resnet18 googlenet mobilenet squeezenet resnet50

Issue 20 asks that this package's int8 speed-up be at least what benchncnn's own int8 model reaches
on the same CPU. ncnn's ``benchmark/benchncnn.cpp`` loads each ``<name>.param`` and
``<name>_int8.param`` with ``DataReaderFromEmpty`` (weights of zeros, read as float32 and
quantized at load by ``Convolution::create_pipeline`` for an int8 layer). Here each param gets a
``.bin`` of the layout its ``load_model`` reads (``ncnn/bin_layout.py``): random float32 weights
(He scale) for float layers, random int8 weights (tag 0x000D4B38) with positive scales for the
int8 layers (``8=`` set), i.e. the form an ncnn2int8 model has on disk; a layer's time does not
depend on its values. Then the float and the int8 model of each pair are timed in ONE child
process, alternating (``ncnn/timing.time_models`` -> ``ncnn/speed_worker.py``, as
``deploy_speed.py``), with ncnn's default options except ``num_threads``, on benchncnn's input
shape (3x224x224; 3x227x227 for squeezenet) filled with random normal values.

Reported per pair and thread count: float and int8 median [min-max] of wall ms and of process CPU
ms, float/int8 of the medians and the median of per-round ratios (``paired_speedup``), the
verdict (``faster``/``slower`` beyond 3%, else ``tie``) on CPU time at 1 thread (a loaded
machine's preemption does not inflate it) and on wall time with more threads (CPU time counts
OpenMP's spinning there), and how many int8 convs requantize into the next (``8=1xx``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from lightning_ncnnqat.ncnn.bin_layout import TAG_FP32, TAG_INT8, layer_entries, raw_f32, tagged  # noqa: E402
from lightning_ncnnqat.ncnn.machine import machine_info  # noqa: E402
from lightning_ncnnqat.ncnn.param import CONV_TYPES, INT8_TYPES, NcnnLayer, NcnnParam  # noqa: E402
from lightning_ncnnqat.ncnn.timing import ModelToTime, Timing, paired_speedup, time_models  # noqa: E402
from lightning_ncnnqat.policy.speed import SPEED_TIE_TOLERANCE  # noqa: E402

#: benchncnn's float/int8 pairs (``benchmark/models/<name>.param`` and ``<name>_int8.param``)
#: and the input it feeds them (benchncnn.cpp: ``ncnn::Mat(w, h, c)``), as [c, h, w].
PAIRS: dict[str, list[int]] = {
    "resnet18": [3, 224, 224],
    "googlenet": [3, 224, 224],
    "mobilenet": [3, 224, 224],
    "squeezenet": [3, 227, 227],
    "resnet50": [3, 224, 224],
    "vgg16": [3, 224, 224],
    "squeezenet_ssd": [3, 300, 300],
    "mobilenet_ssd": [3, 300, 300],
}
DEFAULT_PAIRS = ["resnet18", "googlenet", "mobilenet", "squeezenet"]


def _is_int8(lay: NcnnLayer) -> bool:
    return lay.type in INT8_TYPES and lay.get_int(8, 0) > 0


def random_bin(param: NcnnParam, seed: int = 0) -> bytes:
    """A ``.bin`` for ``param``: every array its layers' ``load_model`` reads, in order.

    Weights of an int8 layer: int8 in [-127, 127] (tagged int8); other tagged arrays: float32
    normal with std sqrt(2 / fan_in) (keeps activations in range through deep nets). Raw arrays:
    a bias is 0; an int8 layer's scales are positive (weights: 127 / (3 std), activations: 20).
    Raises ``NcnnFormatError`` (bin_layout) for a layer type whose layout is unknown."""
    rng = np.random.default_rng(seed)
    out = bytearray()
    for lay in param.layers:
        entries = layer_entries(lay)
        weight = next((e for e in entries if e.role == "weight"), None)
        fan_in = max(1, weight.count // max(1, lay.get_int(0, 1))) if weight is not None else 1
        std = float(np.sqrt(2.0 / fan_in))
        for e in entries:
            if e.tagged and e.role == "weight" and _is_int8(lay):
                out += tagged(TAG_INT8, rng.integers(-127, 128, e.count, dtype=np.int8).tobytes())
            elif e.tagged:
                out += tagged(TAG_FP32, raw_f32(rng.standard_normal(e.count).astype(np.float32) * std))
            elif e.role == "weight_scales":
                out += raw_f32(np.full(e.count, 127.0 / (3 * std), np.float32))
            elif e.role in ("input_scale", "output_scale"):
                out += raw_f32(np.full(e.count, 20.0, np.float32))
            elif e.role == "bias":
                out += raw_f32(np.zeros(e.count, np.float32))
            else:  # any other raw array (BatchNorm's slope/var etc.): ones, a safe value for each
                out += raw_f32(np.ones(e.count, np.float32))
    return bytes(out)


def _io(param: NcnnParam) -> tuple[str, str]:
    """The Input layer's blob and the last layer's top blob (benchncnn's input_names()[0] and
    output_names()[0] for these single-input, single-output nets)."""
    inputs = [lay.tops[0] for lay in param.layers if lay.type == "Input"]
    if len(inputs) != 1:
        raise ValueError(f"expected one Input layer, found {len(inputs)}")
    return inputs[0], param.layers[-1].tops[0]


def requantized(param: NcnnParam) -> tuple[int, int]:
    """(int8 convs whose output is requantized into the next: ``8`` > 100, int8 convs)."""
    convs = [lay for lay in param.layers if lay.type in CONV_TYPES and _is_int8(lay)]
    return sum(lay.get_int(8, 0) > 100 for lay in convs), len(convs)


def prepare_pair(models_dir: Path, name: str, work: Path) -> dict[str, Any]:
    """Write ``<name>.bin`` / ``<name>_int8.bin`` next to copies of the params in ``work``.

    Raises FileNotFoundError naming the missing .param (``--models-dir`` must be ncnn's
    ``benchmark/models``)."""
    out: dict[str, Any] = {}
    for tag, stem in (("float", name), ("int8", f"{name}_int8")):
        src = models_dir / f"{stem}.param"
        if not src.is_file():
            raise FileNotFoundError(f"--models-dir {models_dir}: no {src.name} (ncnn's benchmark/models?)")
        text = src.read_text(encoding="utf-8")
        param = NcnnParam.parse(text)
        (work / src.name).write_text(text, encoding="utf-8")
        (work / f"{stem}.bin").write_bytes(random_bin(param))
        blob_in, blob_out = _io(param)
        out[tag] = {"param": str(work / src.name), "bin": str(work / f"{stem}.bin"), "in": blob_in, "out": blob_out,
                    "int8_layers": sum(_is_int8(lay) for lay in param.layers), "requantized": requantized(param)}
    return out


def _ms(t: Timing, on: str) -> str:
    if on == "cpu":
        return f"{t.cpu_median_ms:.2f} [{t.cpu_min_ms:.2f}-{t.cpu_max_ms:.2f}]"
    return f"{t.median_ms:.2f} [{t.min_ms:.2f}-{t.max_ms:.2f}]"


def time_pair(pair: dict[str, Any], shape: list[int], threads: int, runs: int, warmup: int) -> dict[str, Any]:
    """Float vs int8 of one pair, interleaved in one child process, at ``threads`` threads."""
    models = [ModelToTime(tag, p["param"], p["bin"], {p["in"]: shape}, [p["out"]], {"num_threads": threads})
              for tag, p in pair.items()]
    t = time_models(models, runs=runs, warmup=warmup)
    on = "cpu" if threads == 1 else "wall"
    ratio = t["float"].ms(on) / t["int8"].ms(on)
    paired = paired_speedup(t["float"], t["int8"], on)
    verdict = "faster" if paired >= 1 + SPEED_TIE_TOLERANCE else "slower" if paired <= 1 - SPEED_TIE_TOLERANCE else "tie"
    return {"threads": threads, "on": on, "float": asdict(t["float"]), "int8": asdict(t["int8"]),
            "float_cpu": _ms(t["float"], "cpu"), "int8_cpu": _ms(t["int8"], "cpu"),
            "float_wall": _ms(t["float"], "wall"), "int8_wall": _ms(t["int8"], "wall"),
            "speedup_medians": ratio, "speedup_paired": paired,
            "speedup_cpu": t["float"].ms("cpu") / t["int8"].ms("cpu"),
            "speedup_wall": t["float"].ms("wall") / t["int8"].ms("wall"),
            "verdict": verdict, "load_1min": os.getloadavg()[0]}


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: one row per pair and thread count."""
    out = ["| benchncnn pair (input) | threads | float CPU ms median [min-max] | int8 CPU ms median [min-max] | "
           "float wall ms | int8 wall ms | float/int8 CPU | float/int8 wall | paired (clock) | verdict | "
           "requantized / int8 convs | load |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rq, nc = r["pair"]["int8"]["requantized"]
        for row in r["rows"]:
            out.append(f"| {r['name']} ({'x'.join(map(str, r['shape']))}) | {row['threads']} | {row['float_cpu']} | "
                       f"{row['int8_cpu']} | {row['float_wall']} | {row['int8_wall']} | {row['speedup_cpu']:.2f}x | "
                       f"{row['speedup_wall']:.2f}x | {row['speedup_paired']:.2f}x ({row['on']}) | {row['verdict']} | "
                       f"{rq} / {nc} | {row['load_1min']:.1f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", required=True, help="ncnn's benchmark/models (holds <name>.param, <name>_int8.param)")
    p.add_argument("--pairs", nargs="+", default=DEFAULT_PAIRS, choices=sorted(PAIRS))
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--work", default=None, help="where the params and generated .bin go (default: a temp dir)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    if any(t < 1 for t in a.threads):
        p.error(f"--threads must be >= 1, got {a.threads}")
    with tempfile.TemporaryDirectory(prefix="benchncnn_ref_") as tmp:
        work = Path(a.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = []
        for name in a.pairs:
            pair = prepare_pair(Path(a.models_dir), name, work)
            rows = []
            for th in a.threads:
                rows.append(time_pair(pair, PAIRS[name], th, a.runs, a.warmup))
            results.append({"name": name, "shape": PAIRS[name], "pair": pair, "rows": rows})
            print("\n".join(table([results[-1]]).splitlines()[2:]), flush=True)
            if a.out:
                Path(a.out).write_text(json.dumps({"machine": machine_info(), "results": results}, indent=1, default=str))
    m = machine_info()
    print(f"\nmachine: {m['cpu']} ({', '.join(m['features'])}), {m['cpus']} cpus, load {m['load_1min']:.2f}, "
          f"ncnn {m['ncnn']}; {a.runs} interleaved runs per pair, ncnn default options except num_threads\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
