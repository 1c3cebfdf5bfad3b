"""Run a tiny ncnn job on every emulated target and the host: does the environment work?

The job is a hand-written one-layer ncnn model (3x3 convolution, 2 -> 3 channels, pad 1, bias,
on a 2x6x6 input) run through the export's own worker script (``ncnn/worker.py``) with
ncnn's default options, compared with a numpy reference. Uses numpy and the standard library
only (no torch), like the set-up.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lightning_ncnnqat.ncnn.targets.arm_env import PROFILES, worker_command

WORKER = Path(__file__).resolve().parents[1] / "worker.py"
HOST = "x86"

_C_IN, _C_OUT, _HW = 2, 3, 6


@dataclass
class CheckResult:
    """One target's run: ncnn version, machine, detected CPU features, error vs numpy, wall time."""

    target: str
    ok: bool
    info: dict = field(default_factory=dict)
    max_rel_err: float = float("nan")
    wall_s: float = float("nan")
    error: str = ""


def _tiny_model(folder: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """Write the one-conv model; returns (param, bin, input [1, C, H, W], numpy reference output)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((_C_OUT, _C_IN, 3, 3)).astype(np.float32)
    b = rng.standard_normal(_C_OUT).astype(np.float32)
    x = rng.standard_normal((1, _C_IN, _HW, _HW)).astype(np.float32)
    param = folder / "tiny.param"
    binf = folder / "tiny.bin"
    param.write_text(
        "7767517\n2 2\n"
        f"Input in0 0 1 in0 0={_HW} 1={_HW} 2={_C_IN}\n"
        f"Convolution conv0 1 1 in0 out0 0={_C_OUT} 1=3 4=1 5=1 6={w.size}\n",
        encoding="ascii",
    )
    # Convolution weights: a 4-byte storage tag (0: float32) then the raw weights, then the bias
    binf.write_bytes(struct.pack("<I", 0) + w.tobytes() + b.tobytes())
    xp = np.pad(x[0], ((0, 0), (1, 1), (1, 1)))
    ref = np.zeros((_C_OUT, _HW, _HW), np.float64)
    for i in range(3):
        for j in range(3):
            ref += np.einsum("oc,chw->ohw", w[:, :, i, j], xp[:, i : i + _HW, j : j + _HW])
    ref += b[:, None, None]
    return param, binf, x, ref[None].astype(np.float32)


def _argv_env(target: str) -> tuple[list[str], dict[str, str]]:
    return ([sys.executable], {}) if target == HOST else worker_command(target)


def run_check(target: str, timeout_s: float = 300.0) -> CheckResult:
    """Run the tiny job on ``target`` (``"x86"`` or a name in PROFILES); never raises."""
    try:
        argv, env_extra = _argv_env(target)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return CheckResult(target, False, error=str(e))
    with tempfile.TemporaryDirectory(prefix="ncnnqat_armcheck_") as tmp:
        d = Path(tmp)
        param, binf, x, ref = _tiny_model(d)
        np.savez(d / "in.npz", in0=x)
        job = {"param": str(param), "bin": str(binf), "inputs": str(d / "in.npz"), "extract": ["out0"],
               "out": str(d / "out.npz"), "result": str(d / "result.json")}  # fmt: skip
        (d / "job.json").write_text(json.dumps(job), encoding="utf-8")
        env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
        t0 = time.monotonic()
        try:
            proc = subprocess.run([*argv, str(WORKER), str(d / "job.json")], capture_output=True, text=True,
                                  env=env, cwd=d, timeout=timeout_s, check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            return CheckResult(target, False, error=f"no answer within {timeout_s:.0f} s")
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            return CheckResult(target, False, wall_s=wall, error=f"exit status {proc.returncode}: {tail}")
        info = json.loads((d / "result.json").read_text(encoding="utf-8"))
        with np.load(d / "out.npz") as z:
            out = z["out0"]
    err = float(np.abs(out - ref).max() / np.abs(ref).max())
    # fp16 arithmetic (A76 profile) rounds to ~1e-3 relative; anything above 1e-2 is a broken runtime
    return CheckResult(target, err < 1e-2, info, err, wall)


#: Linux arm64 hwcap bits (asm/hwcap.h) of the features ncnn dispatches on: the guest's
#: ``getauxval(AT_HWCAP / AT_HWCAP2)``, which qemu fills from the profile's CPU model. The ncnn
#: Python binding only exposes neon/vfpv4/asimdhp, so dot product, i8mm and bf16 are read here.
HWCAP_BITS = {"fphp": 9, "asimdhp": 10, "asimddp": 20, "sve": 22}
HWCAP2_BITS = {"i8mm": 13, "bf16": 14}

_HWCAP_SNIPPET = (
    "import ctypes; g = ctypes.CDLL(None).getauxval; g.restype = ctypes.c_ulong; "
    "g.argtypes = [ctypes.c_ulong]; print(g(16), g(26))"
)


def probe_hwcaps(target: str, timeout_s: float = 120.0) -> dict[str, int]:
    """Features the guest kernel ABI reports on an ARM ``target`` (names of HWCAP_BITS/HWCAP2_BITS).

    Raises:
        TargetUnavailable: the environment is absent; RuntimeError: the probe failed.
    """
    argv, env_extra = worker_command(target)
    proc = subprocess.run([*argv, "-c", _HWCAP_SNIPPET], capture_output=True, text=True,
                          env={**os.environ, **env_extra}, timeout=timeout_s, check=False)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"hwcap probe on {target} failed: {proc.stderr.strip()[-300:]}")
    hwcap, hwcap2 = (int(v) for v in proc.stdout.split())
    out = {k: int(bool(hwcap >> b & 1)) for k, b in HWCAP_BITS.items()}
    out.update({k: int(bool(hwcap2 >> b & 1)) for k, b in HWCAP2_BITS.items()})
    return out


def _features(info: dict) -> str:
    feats = info.get("cpu_features", {})
    on = [k for k, v in feats.items() if v]
    return ",".join(on) if on else "-"


def check(targets: list[str] | None = None) -> list[CheckResult]:
    """Run the tiny job on the host and each ARM profile; print one line per target."""
    results = []
    for target in targets or [HOST, *PROFILES]:
        r = run_check(target)
        results.append(r)
        if not r.ok:
            print(f"{target:10s} FAILED: {r.error or f'relative error {r.max_rel_err:.2e} vs numpy'}")
            continue
        opts = r.info.get("options", {})
        cpu = PROFILES[target].qemu_cpu if target in PROFILES else "host"
        if target in PROFILES:
            try:
                caps = probe_hwcaps(target)
                cpu += "; hwcaps " + (",".join(k for k, v in caps.items() if v) or "-")
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                cpu += f"; hwcap probe failed: {e}"
        print(
            f"{target:10s} ok  ncnn {r.info.get('ncnn_version')} on {r.info.get('machine')} ({cpu}); "
            f"cpu features: {_features(r.info)}; fp16 arithmetic option {opts.get('use_fp16_arithmetic')}; "
            f"rel. error vs numpy {r.max_rel_err:.1e}; start-up + run {r.wall_s:.1f} s (emulated: not a speed)"
        )
    return results
