"""The machine a timing ran on, named: CPU model and the features ncnn's kernels choose by, cores,
load, ncnn version (standard library + ncnn; no torch)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

#: /proc/cpuinfo flags that change which ncnn x86 kernels run (AVX2/FMA float and int8 paths,
#: AVX-512, VNNI int8 dot products, F16C conversions).
FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "f16c")


def machine_info() -> dict[str, Any]:
    """``{"cpu", "features", "cpus", "load_1min", "ncnn", "arch"}`` of this machine."""
    cpu, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        import ncnn

        version = getattr(ncnn, "__version__", "unknown")
    except ImportError:
        version = "not installed"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "features": [f for f in FEATURES if f in flags], "cpus": os.cpu_count(), "load_1min": load,
            "ncnn": version, "arch": platform.machine()}


def machine_line(info: dict[str, Any] | None = None) -> str:
    """One line naming the machine: ``AMD EPYC ... (avx2, fma), 2 cpus, load 3.1, ncnn 1.0.x``."""
    m = info or machine_info()
    load = "" if m.get("load_1min") is None else f", load {m['load_1min']:.1f}"
    return f"{m['cpu']} ({', '.join(m['features']) or m['arch']}), {m['cpus']} cpus{load}, ncnn {m['ncnn']}"
