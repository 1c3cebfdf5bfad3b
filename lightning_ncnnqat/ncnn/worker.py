"""Run an ncnn model on a batch of inputs in a process of its own (no torch, no package imports).

The export runs every ncnn inference through this script in a subprocess, so a crash inside the
ncnn runtime (a segfault on an unusual graph) becomes a failed step with the signal named,
never a dead training process. It imports only the standard library, numpy and ncnn, so the
same file runs under the aarch64 Python of the ARM emulation environment.

    python worker.py JOB.json

``JOB.json``::

    {"param": path, "bin": path,
     "inputs": path of an .npz: one array per input blob, named by the blob, [N, ...] float32, or
               int32 for ids read by Embed (written into the Mat bit for bit: Embed reads ints),
     "extract": [blob names extracted for every sample],
     "options": {ncnn.Option attribute: value}  (set before loading; ncnn's defaults otherwise),
     "light_mode": bool (default true; false keeps intermediate blobs),
     "time_runs": int (0: no timing), "time_warmup": int,
     "progress": path (optional): sample 0 is first run layer by layer, each layer's name written
                 there before ncnn computes it, so a parent that stops a hung child names the layer,
     "out": path of the .npz written: one array per extracted blob, [N, ...] float32,
     "result": path of the JSON written: ncnn version, CPU features, effective options, time}

Every input handed to ncnn is an ncnn-owned copy (``Mat.clone()``): ``ncnn.Mat(array)``
borrows numpy memory, and an in-place first layer then writes into (or past) it.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Callable

import ncnn
import numpy as np

#: net.opt fields reported back (those that change numerics or speed).
REPORTED_OPTIONS = (
    "num_threads",
    "use_int8_inference",
    "use_packing_layout",
    "use_fp16_storage",
    "use_fp16_packed",
    "use_fp16_arithmetic",
    "use_bf16_storage",
    "use_winograd_convolution",
    "use_sgemm_convolution",
    "use_int8_packed",
    "use_int8_storage",
    "use_int8_arithmetic",
)

_CPU_FEATURES = (
    "cpu_support_arm_neon",
    "cpu_support_arm_vfpv4",
    "cpu_support_arm_asimdhp",
    "cpu_support_arm_asimddp",
    "cpu_support_arm_i8mm",
    "cpu_support_arm_bf16",
    "cpu_support_arm_sve",
    "cpu_support_x86_avx",
    "cpu_support_x86_fma",
    "cpu_support_x86_avx2",
    "cpu_support_x86_avx512",
    "cpu_support_x86_avx512_vnni",
    "cpu_support_x86_avx_vnni",
    "cpu_support_x86_f16c",
)


def _cpu_features() -> dict:
    out = {}
    for name in _CPU_FEATURES:
        fn = getattr(ncnn, name, None)
        if fn is not None:
            try:
                out[name[len("cpu_support_"):]] = int(bool(fn()))
            except Exception:  # noqa: BLE001 - a feature probe must not fail the run
                pass
    return out


def _arm_hwcaps() -> dict:
    """Dot product / i8mm / bf16 as the aarch64 kernel reports them (getauxval AT_HWCAP(2)); the
    ncnn binding exposes only neon, vfpv4 and asimdhp."""
    import ctypes
    import platform

    if platform.machine() not in ("aarch64", "arm64"):
        return {}
    try:
        getauxval = ctypes.CDLL(None).getauxval
        getauxval.restype = ctypes.c_ulong
        hw, hw2 = int(getauxval(16)), int(getauxval(26))
    except (OSError, AttributeError):
        return {}
    return {"arm_asimddp": int(bool(hw & (1 << 20))), "arm_i8mm": int(bool(hw2 & (1 << 13))), "arm_bf16": int(bool(hw2 & (1 << 14)))}


def load_net(param: str, bin_path: str, options: dict) -> ncnn.Net:
    """An ncnn.Net with ``options`` (ncnn.Option attributes) set before loading ``param``/``bin_path``.

    Raises ValueError for an option ncnn.Option lacks, RuntimeError for a file ncnn cannot load."""
    net = ncnn.Net()
    for key, value in options.items():
        if not hasattr(net.opt, key):
            raise ValueError(f"ncnn.Option has no option {key!r}")
        setattr(net.opt, key, value)
    if net.load_param(param) != 0:
        raise RuntimeError(f"ncnn could not load {param}")
    if net.load_model(bin_path) != 0:
        raise RuntimeError(f"ncnn could not load {bin_path}")
    return net


def owned_mat(arr: np.ndarray) -> ncnn.Mat:
    """An ncnn-owned copy of ``arr`` (float32; int32 ids keep their bytes): see the module doc."""
    if arr.dtype == np.int32:  # ids for Embed: the same 4 bytes per element, read as int by ncnn
        arr = np.ascontiguousarray(arr).view(np.float32)
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    borrowed = ncnn.Mat(arr)
    owned = borrowed.clone()
    del borrowed
    return owned


def feed(ex: ncnn.Extractor, mats: dict[str, ncnn.Mat]) -> None:
    """Input every blob of ``mats``; RuntimeError names a blob the net does not have."""
    for name, mat in mats.items():
        if ex.input(name, mat) != 0:
            raise RuntimeError(f"ncnn has no input blob '{name}'")


def extract(ex: ncnn.Extractor, blob: str) -> ncnn.Mat:
    """Blob ``blob`` of the extractor's net; RuntimeError with ncnn's error code if it fails."""
    ret, mat = ex.extract(blob)
    if ret != 0:
        raise RuntimeError(f"ncnn could not extract blob '{blob}' (error {ret})")
    return mat


def walk_layers(net: ncnn.Net, param: str, mats: dict[str, ncnn.Mat], progress: str) -> None:
    """Compute one sample layer by layer (param order is ncnn's topological order), writing each
    layer's ``type name`` to ``progress`` before it runs: if ncnn never returns, the file names
    the layer it loops in."""
    with open(param, encoding="utf-8") as f:
        lines = f.read().split("\n")[2:]
    ex = net.create_extractor()
    ex.set_light_mode(False)  # keep every blob: each extract computes one more layer
    feed(ex, mats)
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or fields[0] == "Input" or int(fields[3]) < 1:
            continue
        with open(progress, "w", encoding="utf-8") as f:
            f.write(f"{fields[0]} {fields[1]}")
        extract(ex, fields[4 + int(fields[2])])  # the layer's first top
    del ex


def run(job: dict) -> dict:
    """Run the job (see the module doc); returns the result dict (also written to job['result'])."""
    net = load_net(job["param"], job["bin"], job.get("options", {}))
    with np.load(job["inputs"]) as z:
        inputs = {k: np.asarray(z[k]) if z[k].dtype == np.int32 else np.asarray(z[k], dtype=np.float32) for k in z.files}
    counts = {len(v) for v in inputs.values()}
    if len(counts) != 1:
        raise ValueError(f"inputs hold different sample counts: { {k: len(v) for k, v in inputs.items()} }")
    n = counts.pop()
    blobs = list(job["extract"])
    light = bool(job.get("light_mode", True))
    outs: dict[str, list[np.ndarray]] = {b: [] for b in blobs}
    for i in range(n):
        ex = net.create_extractor()
        ex.set_light_mode(light)
        mats = {name: owned_mat(inputs[name][i]) for name in inputs}
        if i == 0 and job.get("progress"):
            walk_layers(net, job["param"], mats, job["progress"])
        feed(ex, mats)
        for b in blobs:
            outs[b].append(np.array(extract(ex, b), copy=True).astype(np.float32, copy=False))
        del ex, mats
    time_ms = None
    runs = int(job.get("time_runs", 0))
    if runs > 0 and n > 0:
        warmup = int(job.get("time_warmup", 5))
        times = []
        first = [owned_mat(inputs[name][0]) for name in inputs]
        for k in range(warmup + runs):
            t0 = time.perf_counter()
            ex = net.create_extractor()
            for name, mat in zip(inputs, first):
                ex.input(name, mat)
            for b in blobs:
                ex.extract(b)
            t1 = time.perf_counter()
            if k >= warmup:
                times.append((t1 - t0) * 1e3)
            del ex
        time_ms = statistics.median(times)
    np.savez(job["out"], **{b: np.stack(v) if v else np.zeros((0,), np.float32) for b, v in outs.items()})
    result = {
        "ncnn_version": getattr(ncnn, "__version__", "unknown"),
        "machine": _machine(),
        "cpu_features": {**_cpu_features(), **_arm_hwcaps()},
        "options": {k: _opt(net.opt, k) for k in REPORTED_OPTIONS if hasattr(net.opt, k)},
        "samples": n,
        "time_ms": time_ms,
    }
    with open(job["result"], "w", encoding="utf-8") as f:
        json.dump(result, f)
    return result


def _opt(opt: object, key: str) -> object:
    v = getattr(opt, key)
    return bool(v) if isinstance(v, bool) else v


def _machine() -> str:
    import platform

    return platform.machine()


def serve(argv: list[str], job_runner: Callable[[dict], dict], script: str) -> int:
    """``python SCRIPT JOB.json``: run the job with ``job_runner``; exit status 2 on a bad command
    line, 3 with ``Type: message`` on stderr when the job raised (the parent reports it)."""
    if len(argv) != 2:
        print(f"usage: python {script} JOB.json", file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        job = json.load(f)
    try:
        job_runner(job)
    except Exception as e:  # noqa: BLE001 - reported to the parent on stderr, exit status 3
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 3
    return 0


def main(argv: list[str]) -> int:
    return serve(argv, run, "worker.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
