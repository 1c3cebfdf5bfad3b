"""Time an exported float and int8 ncnn model on the board they deploy to; write a profile (JSON).

Runs where the model deploys (an aarch64 Linux board with the ``ncnn`` wheel and numpy; no torch,
nothing else of this package), with ncnn's default options, as users run it:

    python -m lightning_ncnnqat.ncnn.targets profile EXPORT_DIR -o board.json
    python -m lightning_ncnnqat.ncnn.targets profile model.ncnn.param model.ncnn.bin \\
        model.int8.param model.int8.bin --input in0=3,32,32 -o board.json
    python board_profile.py EXPORT_DIR -o board.json      # this file copied alone to the board

It times each whole model (median of ``--runs`` after ``--warmup``) and each layer (the time of
extracting a layer's output once its inputs are computed, on a non-light extractor, so ncnn
runs that layer alone, with its layout conversions) with 1 thread and with all threads. Where
the int8 model carries the float32-blob feature mask (``ncnn/fp32_blobs.py``) it also times it
without (fp16 blobs on ARMv8.2): the mask's cost on that board. QAT and the export read the
profile with :mod:`lightning_ncnnqat.ncnn.targets.profile`.

Under emulation (qemu) the times say nothing about the device: the profile records
``"emulated": true`` with the evidence, and the reader refuses to call its times speeds.

Standard library, numpy and ncnn only, and no import of the package (so it runs copied alone).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import ncnn
import numpy as np

#: The ``format`` value of a profile and its layout version (the reader checks both).
FORMAT = "lightning_ncnnqat.board_profile"
VERSION = 1
#: ncnn's per-layer feature mask bits of the float32-blob mask (see ``ncnn/fp32_blobs.py``).
_FP32_BLOBS = 3
_FEATMASK = re.compile(r"(?<=\s)31=(\d+)(?=\s|$)")
_FEATURES = ("arm_neon", "arm_vfpv4", "arm_asimdhp", "arm_asimddp", "arm_i8mm", "arm_bf16", "arm_sve",
             "x86_avx2", "x86_fma", "x86_avx512", "x86_avx512_vnni", "x86_avx_vnni", "x86_f16c")  # fmt: skip


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def layer_lines(param_text: str) -> list[tuple[str, str, list[str], list[str]]]:
    """(type, name, bottoms, tops) of every layer line of a .param text (ValueError if malformed)."""
    lines = [ln.split() for ln in param_text.splitlines() if ln.strip()]
    if not lines or lines[0] != ["7767517"]:
        raise ValueError("not an ncnn .param file (first line must be 7767517)")
    out = []
    for f in lines[2:]:
        nb, nt = int(f[2]), int(f[3])
        out.append((f[0], f[1], f[4 : 4 + nb], f[4 + nb : 4 + nb + nt]))
    return out


#: ncnn layer types -> the param id whose non-zero value makes them run in int8
#: (``int8_scale_term``: param 8 of the convolutions and InnerProduct, 18 of Gemm and attention).
_INT8_TERM = {"Convolution": 8, "ConvolutionDepthWise": 8, "Convolution1D": 8, "InnerProduct": 8,
              "Gemm": 18, "MultiHeadAttention": 18, "SDPA": 18}  # fmt: skip


def int8_layers(param_text: str) -> dict[str, bool]:
    """Layer name -> whether it runs in int8 (its ``int8_scale_term`` is set), for the layer types
    that have one; the int8 model keeps some of them float."""
    out = {}
    for line in param_text.splitlines()[2:]:
        f = line.split()
        if len(f) < 4 or f[0] not in _INT8_TERM:
            continue
        params = dict(kv.split("=", 1) for kv in f[4 + int(f[2]) + int(f[3]) :] if "=" in kv)
        try:
            out[f[1]] = int(params.get(str(_INT8_TERM[f[0]]), "0")) != 0
        except ValueError:
            out[f[1]] = False
    return out


def strip_fp32_mask(param_text: str) -> str:
    """The .param text without the float32-blob feature mask bits (other bits kept)."""

    def repl(m: re.Match) -> str:
        rest = int(m.group(1)) & ~_FP32_BLOBS
        return f"31={rest}"

    return _FEATMASK.sub(repl, param_text)


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def emulation_evidence() -> list[str]:
    """Why this process looks emulated (empty: it looks like real hardware)."""
    why = [f"environment variable {k} is set" for k in ("QEMU_CPU", "QEMU_LD_PREFIX") if os.environ.get(k)]
    info = _cpuinfo()
    if platform.machine() in ("aarch64", "arm64") and re.search(r"^(vendor_id|flags)\s*:", info, re.M):
        why.append("an aarch64 process reads an x86 /proc/cpuinfo (user-mode emulation)")
    return why


def device_info() -> dict:
    """Machine, CPU parts and frequencies, board model, ncnn version and the CPU features ncnn sees."""
    info = _cpuinfo()
    parts = sorted(set(re.findall(r"^CPU part\s*:\s*(\S+)", info, re.M)))
    names = sorted(set(re.findall(r"^model name\s*:\s*(.+)$", info, re.M)))
    freqs = []
    for p in sorted(Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/cpuinfo_max_freq")):
        try:
            freqs.append(int(p.read_text().strip()) // 1000)
        except (OSError, ValueError):
            pass
    model = ""
    for p in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        try:
            model = Path(p).read_text(errors="replace").strip("\x00\n ")
            break
        except OSError:
            continue
    feats = {}
    for f in _FEATURES:
        fn = getattr(ncnn, f"cpu_support_{f}", None)
        if fn is not None:
            try:
                feats[f] = int(bool(fn()))
            except Exception:  # noqa: BLE001 - a probe must not fail the profile
                pass
    return {
        "machine": platform.machine(), "system": platform.system(), "board": model, "cpu_parts": parts,
        "cpu_names": names, "cpu_max_mhz": freqs, "cpu_count": os.cpu_count(),
        "ncnn_cpu_count": _call(ncnn, "get_cpu_count"), "ncnn_big_cpu_count": _call(ncnn, "get_big_cpu_count"),
        "ncnn_version": getattr(ncnn, "__version__", "unknown"), "cpu_features": feats,
        "python": platform.python_version(), "numpy": np.__version__, "powersave": _call(ncnn, "get_cpu_powersave"),
    }  # fmt: skip


def _call(mod: object, name: str) -> int | None:
    fn = getattr(mod, name, None)
    try:
        return int(fn()) if fn is not None else None
    except Exception:  # noqa: BLE001 - an ncnn CPU probe (not ours) this wheel lacks or that fails: unknown
        return None


def _net(param_text: str, bin_path: Path, threads: int) -> ncnn.Net:
    """A net with ncnn's default options except ``num_threads`` (int8 inference is on by default)."""
    net = ncnn.Net()
    net.opt.num_threads = threads
    if net.load_param_mem(param_text) != 0:
        raise RuntimeError("ncnn could not load the .param text")
    if net.load_model(str(bin_path)) != 0:
        raise RuntimeError(f"ncnn could not load {bin_path}")
    return net


def _inputs(shapes: dict[str, list[int]], dtypes: dict[str, str]) -> dict[str, ncnn.Mat]:
    """Seeded inputs of the given shapes (ncnn-owned copies: ``ncnn.Mat(array)`` borrows memory)."""
    rng = np.random.default_rng(0)
    out = {}
    for name, shape in shapes.items():
        if dtypes.get(name, "float32").startswith("int"):
            arr = rng.integers(0, 2, size=shape).astype(np.int32).view(np.float32)
        else:
            arr = rng.standard_normal(shape).astype(np.float32)
        out[name] = ncnn.Mat(np.ascontiguousarray(arr)).clone()
    return out


def _median_ms(fn, runs: int, warmup: int) -> float:  # noqa: ANN001
    times = []
    for k in range(warmup + runs):
        t = fn()
        if k >= warmup:
            times.append(t * 1e3)
    return round(statistics.median(times), 5)


def _outputs(param_text: str) -> list[str]:
    lays = layer_lines(param_text)
    consumed = {b for _, _, bots, _ in lays for b in bots}
    return [t for _, _, _, tops in lays for t in tops if t not in consumed]


def _whole_run(net: ncnn.Net, mats: dict[str, ncnn.Mat], outputs: list[str]) -> float:
    """Seconds of one inference (new extractor, inputs, every output extracted)."""
    t0 = time.perf_counter()
    ex = net.create_extractor()
    for k, m in mats.items():
        ex.input(k, m)
    for o in outputs:
        ret, _ = ex.extract(o)
        if ret != 0:
            raise RuntimeError(f"ncnn could not extract '{o}' (error {ret})")
    return time.perf_counter() - t0


def time_models(variants: list[tuple[str, str, Path]], inputs: dict[str, list[int]], dtypes: dict[str, str],
                threads: int, runs: int, warmup: int) -> dict[str, float]:
    """Whole-model median ms of each ``(tag, param text, bin)`` at ``threads`` threads, the
    models ALTERNATING run by run, so a load change on the board hits them alike."""
    nets = {tag: (_net(text, b, threads), _outputs(text)) for tag, text, b in variants}
    mats = _inputs(inputs, dtypes)
    times: dict[str, list[float]] = {tag: [] for tag in nets}
    for k in range(warmup + runs):
        for tag, (net, outs) in nets.items():
            t = _whole_run(net, mats, outs)
            if k >= warmup:
                times[tag].append(t * 1e3)
    return {tag: round(statistics.median(v), 5) for tag, v in times.items()}


def time_layers(param_text: str, bin_path: Path, inputs: dict[str, list[int]], dtypes: dict[str, str], threads: int,
                runs: int, warmup: int) -> dict[str, dict]:
    """Median ms of every layer of one model: the time to extract its first output once its
    inputs are computed (a non-light extractor keeps them), so ncnn runs that layer alone with
    the layout and fp16 conversions of its inputs. Includes ~10 us of the binding's call."""
    net = _net(param_text, bin_path, threads)
    mats = _inputs(inputs, dtypes)
    out = {}
    for typ, name, bots, tops in layer_lines(param_text):
        if typ == "Input" or not tops:
            continue

        def one(bots=bots, tops=tops) -> float:  # noqa: ANN001
            ex = net.create_extractor()
            ex.set_light_mode(False)  # keep the inputs computed below, so only this layer runs next
            for k, m in mats.items():
                ex.input(k, m)
            for b in bots:
                if b not in mats:
                    ex.extract(b)
            t0 = time.perf_counter()
            ex.extract(tops[0])
            return time.perf_counter() - t0

        out[name] = {"type": typ, "ms": _median_ms(one, runs, warmup)}
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _input_shapes(export_dir: Path | None, given: list[str]) -> tuple[dict[str, list[int]], dict[str, str]]:
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, str] = {}
    if export_dir is not None and (export_dir / "report.json").is_file():
        io = json.loads(_read(export_dir / "report.json")).get("io", {})
        for i in io.get("inputs", []):
            shapes[i["blob"]] = [int(d) for d in i["shape"]]
            dtypes[i["blob"]] = str(i.get("dtype", "float32"))
    for g in given:
        name, sep, dims = g.partition("=")
        try:
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise SystemExit(f"--input {g!r}: expected NAME=C,H,W (integers)") from None
        if not sep or not name:
            raise SystemExit(f"--input {g!r}: expected NAME=C,H,W")
    if not shapes:
        raise SystemExit("no input shape: give --input NAME=C,H,W (or an export folder with its report.json)")
    return shapes, dtypes


def _files(paths: list[str]) -> tuple[Path | None, dict[str, Path]]:
    if len(paths) == 1:
        d = Path(paths[0])
        files = {k: d / f"model.{k.replace('_', '.')}" for k in ("ncnn_param", "ncnn_bin", "int8_param", "int8_bin")}
        return d, files
    if len(paths) == 4:
        return None, dict(zip(("ncnn_param", "ncnn_bin", "int8_param", "int8_bin"), map(Path, paths)))
    raise SystemExit("give an export folder, or 4 files: float .param .bin, int8 .param .bin")


def profile(paths: list[str], inputs: list[str], runs: int, warmup: int, threads: list[int], layers: bool,
            label: str = "") -> dict:
    """The profile dict (see ``docs/targets.md``); ``threads`` 0 means all of ncnn's big cores."""
    export_dir, files = _files(paths)
    for k, p in files.items():
        if not p.is_file():
            raise SystemExit(f"{k.replace('_', ' ')} file not found: {p}")
    shapes, dtypes = _input_shapes(export_dir, inputs)
    all_threads = _call(ncnn, "get_big_cpu_count") or os.cpu_count() or 1
    counts = sorted({all_threads if t == 0 else t for t in threads})
    texts = {"float": _read(files["ncnn_param"]), "int8": _read(files["int8_param"])}
    variants = [("float", texts["float"], files["ncnn_bin"]), ("int8", texts["int8"], files["int8_bin"])]
    stripped = strip_fp32_mask(texts["int8"])
    if stripped != texts["int8"]:
        variants.append(("int8_fp16_blobs", stripped, files["int8_bin"]))
    results: dict[str, dict] = {}
    runs_int8 = int8_layers(texts["int8"])
    for n in counts:
        whole = time_models(variants, shapes, dtypes, n, runs, warmup)
        results[str(n)] = {
            tag: {"model_ms": whole[tag],
                  "layers": time_layers(t, b, shapes, dtypes, n, runs, warmup) if layers and tag != "int8_fp16_blobs" else {}}
            for tag, t, b in variants
        }  # fmt: skip
        for name, entry in results[str(n)]["int8"]["layers"].items():
            if name in runs_int8:  # which layers the int8 model runs in int8: the reader needs it
                entry["int8"] = runs_int8[name]
    evidence = emulation_evidence()
    return {
        "format": FORMAT, "version": VERSION, "label": label,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "emulated": bool(evidence), "emulation_evidence": evidence, "device": device_info(),
        "options": "ncnn defaults (num_threads set per run)", "runs": runs, "warmup": warmup,
        "threads": counts, "inputs": shapes,
        "models": {k: {"file": files[f"{s}_param"].name, "sha256": _sha256(files[f"{s}_param"])}
                   for k, s in (("float", "ncnn"), ("int8", "int8"))},
        "results": results,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """``profile`` command line; returns the exit status."""
    ap = argparse.ArgumentParser(prog="python -m lightning_ncnnqat.ncnn.targets profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="an export folder, or float .param .bin and int8 .param .bin")
    ap.add_argument("-o", "--output", default="board_profile.json", help="profile JSON to write")
    ap.add_argument("--input", action="append", default=[], help="NAME=C,H,W of an input blob (else from report.json)")
    ap.add_argument("--runs", type=int, default=15, help="timed runs per measurement (median)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs before them")
    ap.add_argument("--threads", default="1,0", help="thread counts, comma separated; 0: all big cores")
    ap.add_argument("--no-layers", action="store_true", help="whole models only")
    ap.add_argument("--label", default="", help="a name for the board (e.g. 'RK3588 A76 cores')")
    ap.add_argument("--big-cores", action="store_true",
                    help="bind ncnn's threads to the big cores (ncnn.set_cpu_powersave(2)) on a big.LITTLE board; "
                         "default: ncnn's default (all cores), as a deployment runs unless it sets this")  # fmt: skip
    a = ap.parse_args(argv)
    if a.big_cores and getattr(ncnn, "set_cpu_powersave", None) is not None:
        ncnn.set_cpu_powersave(2)
    if a.runs < 1 or a.warmup < 0:
        ap.error(f"--runs must be >= 1 and --warmup >= 0, got {a.runs} and {a.warmup}")
    try:
        threads = [int(t) for t in a.threads.split(",")]
    except ValueError:
        ap.error(f"--threads must be integers separated by commas, got {a.threads!r}")
    prof = profile(a.paths, a.input, a.runs, a.warmup, threads, not a.no_layers, a.label)
    Path(a.output).write_text(json.dumps(prof, indent=1) + "\n", encoding="utf-8")
    for n, r in prof["results"].items():
        f, q = r["float"]["model_ms"], r["int8"]["model_ms"]
        line = f"{n} thread(s): float {f:.3f} ms, int8 {q:.3f} ms ({f / q:.2f}x)"
        if "int8_fp16_blobs" in r:
            line += f", int8 with fp16 blobs {r['int8_fp16_blobs']['model_ms']:.3f} ms"
        print(line + (" [EMULATED: not a speed]" if prof["emulated"] else ""))
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
