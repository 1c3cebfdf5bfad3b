"""Run an ncnn model on a batch of inputs in a process of its own (no torch, no package imports).

The export runs every ncnn inference through this script in a subprocess, so a crash inside the
ncnn runtime (a segfault on an unusual graph) becomes a failed step with the signal named,
never a dead training process. It imports only the standard library, numpy and ncnn, so the
same file runs under the aarch64 Python of the ARM emulation environment.

    python ncnn_worker.py JOB.json

``JOB.json``::

    {"param": path, "bin": path,
     "inputs": path of an .npz: one array per input blob, named by the blob, [N, ...] float32, or
               int32 for ids read by Embed (written into the Mat bit for bit: Embed reads ints),
     "extract": [blob names extracted for every sample],
     "options": {ncnn.Option attribute: value}  (set before loading; ncnn's defaults otherwise),
     "light_mode": bool (default true; false keeps intermediate blobs),
     "time_runs": int (0: no timing), "time_warmup": int,
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


def _owned_mat(arr: np.ndarray) -> ncnn.Mat:
    if arr.dtype == np.int32:  # ids for Embed: the same 4 bytes per element, read as int by ncnn
        arr = np.ascontiguousarray(arr).view(np.float32)
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    borrowed = ncnn.Mat(arr)
    owned = borrowed.clone()
    del borrowed
    return owned


def run(job: dict) -> dict:
    """Run the job (see the module doc); returns the result dict (also written to job['result'])."""
    net = ncnn.Net()
    for key, value in job.get("options", {}).items():
        if not hasattr(net.opt, key):
            raise ValueError(f"ncnn.Option has no option {key!r}")
        setattr(net.opt, key, value)
    if net.load_param(job["param"]) != 0:
        raise RuntimeError(f"ncnn could not load {job['param']}")
    if net.load_model(job["bin"]) != 0:
        raise RuntimeError(f"ncnn could not load {job['bin']}")
    with np.load(job["inputs"]) as z:
        inputs = {k: np.asarray(z[k]) if z[k].dtype == np.int32 else np.asarray(z[k], dtype=np.float32) for k in z.files}
    counts = {len(v) for v in inputs.values()}
    if len(counts) != 1:
        raise ValueError(f"inputs hold different sample counts: { {k: len(v) for k, v in inputs.items()} }")
    n = counts.pop()
    extract = list(job["extract"])
    light = bool(job.get("light_mode", True))
    outs: dict[str, list[np.ndarray]] = {b: [] for b in extract}
    for i in range(n):
        ex = net.create_extractor()
        ex.set_light_mode(light)
        mats = [_owned_mat(inputs[name][i]) for name in inputs]
        for name, mat in zip(inputs, mats):
            if ex.input(name, mat) != 0:
                raise RuntimeError(f"ncnn has no input blob '{name}'")
        for b in extract:
            ret, mat = ex.extract(b)
            if ret != 0:
                raise RuntimeError(f"ncnn could not extract blob '{b}' (error {ret})")
            outs[b].append(np.array(mat, copy=True).astype(np.float32, copy=False))
        del ex, mats
    time_ms = None
    runs = int(job.get("time_runs", 0))
    if runs > 0 and n > 0:
        warmup = int(job.get("time_warmup", 5))
        times = []
        first = [_owned_mat(inputs[name][0]) for name in inputs]
        for k in range(warmup + runs):
            t0 = time.perf_counter()
            ex = net.create_extractor()
            for name, mat in zip(inputs, first):
                ex.input(name, mat)
            for b in extract:
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


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python ncnn_worker.py JOB.json", file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        job = json.load(f)
    try:
        run(job)
    except Exception as e:  # noqa: BLE001 - reported to the parent on stderr, exit status 3
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
