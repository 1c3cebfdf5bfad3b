"""Time ncnn models side by side in a process of their own (standard library, numpy, ncnn only).

:mod:`lightning_ncnnqat.speed.plan` runs this script in a child process, so a crash inside ncnn
never takes the caller down, and so the timing process holds no torch threads.

    python speed_worker.py JOB.json

``JOB.json``::

    {"models": [{"name": str, "param": path, "bin": path,
                 "inputs": {blob: [c, h, w] or [w] ...},   (random normal data, seed 0)
                 "data": {blob: path.npy} (optional: one sample fed instead),
                 "extract": [blob, ...],
                 "options": {ncnn.Option attribute: value}}, ...],
     "runs": int, "warmup": int,
     "shapes": [blob, ...]  (optional: instead of timing, run models[0] once and report the
                             shapes of these blobs as [c, h, w] / [h, w] / [w]),
     "result": path of the JSON written}

Timing is interleaved: every round times each model once, in alternating order (A B, then B A),
so a drift of the machine's speed (another process, frequency scaling) falls on every model
alike. Each inference is also timed in process CPU time (``time.process_time``: all threads of
this process), which a busy machine's preemption does not inflate: with one thread it is the
latency an idle core would give; with several it sums their work. One timed inference = create_extractor + input + extract, what an application pays per
frame; inputs are ncnn-owned copies made once, outside the timed region.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType

import ncnn
import numpy as np


def _sibling_worker() -> ModuleType:
    """``worker.py`` loaded by file path (net loading, owned Mats, checked input and
    extract, the command line): importing it through the package would import torch."""
    path = Path(__file__).resolve().with_name("worker.py")
    spec = importlib.util.spec_from_file_location("_lightning_ncnnqat_ncnn_worker", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the ncnn worker at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_worker = _sibling_worker()


def _load(spec: dict) -> ncnn.Net:
    return _worker.load_net(spec["param"], spec["bin"], spec.get("options", {}))


def _inputs(spec: dict) -> dict[str, ncnn.Mat]:
    """One sample per input blob: the .npy of ``spec["data"][blob]`` where given (the export's
    held sample; int32 ids stay ids), else random normal values of ``spec["inputs"][blob]``."""
    rng = np.random.default_rng(0)
    data = spec.get("data") or {}
    return {name: _worker.owned_mat(np.load(data[name]) if name in data else rng.standard_normal(shape).astype(np.float32))
            for name, shape in spec["inputs"].items()}


def _infer(net: ncnn.Net, mats: dict[str, ncnn.Mat], extract: list[str]) -> None:
    ex = net.create_extractor()
    _worker.feed(ex, mats)
    for b in extract:
        _worker.extract(ex, b)


def _shapes(spec: dict, blobs: list[str]) -> dict[str, list[int]]:
    net = _load(spec)
    mats = _inputs(spec)
    ex = net.create_extractor()
    ex.set_light_mode(False)
    _worker.feed(ex, mats)
    out = {}
    for b in blobs:
        m = _worker.extract(ex, b)
        out[b] = [m.c, m.h, m.w] if m.dims == 3 else [m.h, m.w] if m.dims == 2 else [m.w]
    return out


def run(job: dict) -> dict:
    """Run the job (see the module doc); returns the result (also written to job['result'])."""
    models = job["models"]
    result: dict = {"ncnn_version": getattr(ncnn, "__version__", "unknown")}
    if job.get("shapes"):
        result["shapes"] = _shapes(models[0], list(job["shapes"]))
    else:
        nets = [_load(m) for m in models]
        mats = [_inputs(m) for m in models]
        times: list[list[float]] = [[] for _ in models]
        cpu: list[list[float]] = [[] for _ in models]
        warmup, runs = int(job.get("warmup", 3)), int(job["runs"])
        for r in range(warmup + runs):
            order = range(len(models)) if r % 2 == 0 else range(len(models) - 1, -1, -1)
            for i in order:
                c0, t0 = time.process_time(), time.perf_counter()
                _infer(nets[i], mats[i], list(models[i]["extract"]))
                dt, dc = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
                if r >= warmup:
                    times[i].append(dt)
                    cpu[i].append(dc)
        result["times_ms"] = {m["name"]: t for m, t in zip(models, times)}
        result["cpu_ms"] = {m["name"]: t for m, t in zip(models, cpu)}
        result["options"] = {m["name"]: {"num_threads": n.opt.num_threads} for m, n in zip(models, nets)}
    with open(job["result"], "w", encoding="utf-8") as f:
        json.dump(result, f)
    return result


def main(argv: list[str]) -> int:
    return _worker.serve(argv, run, "speed_worker.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
