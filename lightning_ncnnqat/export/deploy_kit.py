"""The deployment kit written beside ``model.int8.param/.bin``: what a user needs to run it.

``write_deploy_kit`` writes:

``DEPLOY.md``    input/output blob names and shapes, the preprocessing in ncnn's terms
                 (``mean_vals``/``norm_vals`` for ``Mat::substract_mean_normalize``, pixel type),
                 the ncnn version and options the export verified the model with and the figures
                 it measured, how to run the snippets and what they print.
``run_int8.py``  Python (``pip install ncnn numpy``): loads ``model.int8.*``, runs one input (a
                 ``.npy``/``.npz`` given on the command line, else a deterministic one), prints the
                 output(s).
``main.cpp``     the same with ncnn's C++ API.

Blob names come from ``model.int8.param``: inputs are the tops of ``Input`` layers, outputs the
tops no layer reads (ncnn ``src/net.cpp`` resolves ``Extractor::input/extract`` by these names).
Input shapes come from the caller, the report, or the ``Input`` layer's ``0=w 1=h 2=c`` params;
output shapes and the expected output are measured by running ``run_int8.py`` itself on the
deterministic input in a subprocess, which also proves the script runs.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_ncnnqat.verification.speed import speed_lines
from lightning_ncnnqat.preprocessing import Preprocessing
from lightning_ncnnqat.export.deploy_snippets import Shape, cpp_source, python_script
from lightning_ncnnqat.files import write_files_atomically
from lightning_ncnnqat.ncnn.param import NcnnParam

#: Files the kit writes (beside the model), in this order.
KIT_NAMES = ("run_int8.py", "main.cpp", "DEPLOY.md")

#: ``ncnn.Option`` fields that decide how the int8 model computes, listed in the note.
OPTION_NAMES = (
    "use_int8_inference", "use_packing_layout", "use_fp16_storage", "use_fp16_arithmetic", "use_fp16_packed",
    "use_int8_storage", "use_int8_arithmetic", "use_winograd_convolution", "use_sgemm_convolution",
    "use_bf16_storage", "lightmode", "num_threads",
)


def model_io(param: NcnnParam) -> tuple[list[str], list[str]]:
    """``(input blobs, output blobs)`` of a parsed ``.param``, in layer order."""
    inputs = [t for lay in param.layers if lay.type == "Input" for t in lay.tops]
    consumed = {b for lay in param.layers for b in lay.bottoms}
    outputs = [t for lay in param.layers if lay.type != "Input" for t in lay.tops if t not in consumed]
    return inputs, outputs


def _input_layer_shape(param: NcnnParam, blob: str) -> Shape | None:
    """Shape from an Input layer's ``0=w 1=h 11=d 2=c`` params (ncnn ``src/layer/input.cpp``)."""
    for lay in param.layers:
        if lay.type == "Input" and blob in lay.tops:
            w, h, d, c = lay.get_int(0, 0), lay.get_int(1, 0), lay.get_int(11, 0), lay.get_int(2, 0)
            dims = [v for v in (c, d, h, w) if v > 0]
            return tuple(dims) if dims else None
    return None


def _shapes_from(spec: Any, names: list[str]) -> dict[str, Shape]:
    """``{blob: shape}`` from a dict ``{blob: shape}``, a list of shapes in blob order, or a list
    of ``{"blob" (or "name"): ..., "shape": ...}`` records (the report's ``io``)."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        return {str(k): tuple(int(d) for d in v) for k, v in spec.items() if v is not None}
    out: dict[str, Shape] = {}
    for i, item in enumerate(spec):
        if isinstance(item, Mapping):
            name = item.get("blob", item.get("name"))
            if item.get("shape") is not None and name is not None:
                out[str(name)] = tuple(int(d) for d in item["shape"])
        elif i < len(names) and item is not None:
            out[names[i]] = tuple(int(d) for d in item)
    return out


def resolve_input_shapes(
    param: NcnnParam, report: Mapping[str, Any], input_shapes: Any = None
) -> list[tuple[str, Shape | None]]:
    """Each input blob with its per-sample shape (no batch dim), from, in order: ``input_shapes``,
    ``report["io"]["inputs"]``, the Input layer's params, and for a one-input model
    ``report["timing"]["input_shape"]``."""
    names, _ = model_io(param)
    given = _shapes_from(input_shapes, names)
    io = report.get("io") or {}
    from_report = _shapes_from(io.get("inputs"), names) if isinstance(io, Mapping) else {}
    timing = report.get("timing") or {}
    out: list[tuple[str, Shape | None]] = []
    for n in names:
        shape = given.get(n) or from_report.get(n) or _input_layer_shape(param, n)
        single = timing.get("input_shape") or (timing.get("input_shapes") or [None])[0]
        if shape is None and len(names) == 1 and single:
            shape = tuple(int(d) for d in single)
        out.append((n, shape))
    return out


def _installed_ncnn() -> tuple[str | None, dict[str, Any]]:
    """Version and default options of the ncnn importable here (None, {} without one)."""
    try:
        import ncnn
    except ImportError:
        return None, {}
    opt = ncnn.Option()
    return str(getattr(ncnn, "__version__", "unknown")), {k: getattr(opt, k) for k in OPTION_NAMES if hasattr(opt, k)}


def run_script(export_dir: Path, args: Sequence[str] = (), timeout: float = 120.0) -> tuple[dict[str, np.ndarray], str]:
    """Run ``export_dir/run_int8.py ARGS --save tmp.npz`` with this Python; ``(outputs, stdout)``.

    Raises:
        RuntimeError: the script failed (its stderr in the message).
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.npz"
        proc = subprocess.run(
            [sys.executable, str(export_dir / "run_int8.py"), *args, "--save", str(out)],
            capture_output=True, text=True, timeout=timeout, cwd=export_dir,
            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
        )
        if proc.returncode != 0:
            raise RuntimeError(f"run_int8.py failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        with np.load(out) as z:
            return {k: z[k] for k in z.files}, proc.stdout


def _self_test(export_dir: Path, script: str) -> tuple[dict[str, np.ndarray], str]:
    """Run ``script`` on the deterministic input beside links to the model (nothing is written
    into ``export_dir`` before the whole kit is ready)."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for name in ("model.int8.param", "model.int8.bin"):
            (d / name).symlink_to((export_dir / name).resolve())
        (d / "run_int8.py").write_text(script, encoding="utf-8")
        return run_script(d)


def _floats(vals: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in vals) + "]"


def _fmt_shape(shape: Shape | None) -> str:
    return "unknown" if shape is None else str(tuple(shape))


def _mat_dims(shape: Shape | None) -> str:
    if shape is None:
        return "-"
    names = {1: ("w",), 2: ("h", "w"), 3: ("c", "h", "w"), 4: ("c", "d", "h", "w")}.get(len(shape))
    return "-" if names is None else " ".join(f"{n}={d}" for n, d in zip(names, shape))


def _targets(report: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """``(target, record)`` per runtime the report measured (``runtime`` or ``targets``: a dict by
    target name, or a list of records with ``target``/``name``)."""
    for key in ("runtime", "targets"):
        t = report.get(key)
        if isinstance(t, Mapping) and t and all(isinstance(v, Mapping) for v in t.values()):
            return [(str(k), v) for k, v in t.items()]
        if isinstance(t, list):
            return [(str(v.get("target") or v.get("name") or i), v) for i, v in enumerate(t) if isinstance(v, Mapping)]
    return []


def _verified_rows(report: Mapping[str, Any], version: str | None, defaults: dict[str, Any]) -> list[str]:
    """Lines of the 'verified with' section: one per target the report measured (the report's
    top-level ``int8_vs_qat`` belongs to the first target when a target has none of its own)."""
    rows = _targets(report) or [("this machine", {})]
    hb = report.get("held_batch") or {}
    opts = [dict(r.get("options") or {}) for _, r in rows]
    shared = len(rows) > 1 and opts[0] and all(o == opts[0] for o in opts)
    out = []
    for i, (name, r) in enumerate(rows):
        line = f"- **{name}**"
        cpu = r.get("cpu") or r.get("machine")
        feats = [k for k, v in (r.get("cpu_features") or {}).items() if v]
        if cpu or feats:
            line += f" ({', '.join([str(cpu)] * bool(cpu) + feats)})"
        line += f": ncnn {r.get('ncnn_version') or version or 'unknown'}"
        if not shared:
            o = opts[i]
            line += ", options " + (", ".join(f"{k}={v}" for k, v in o.items()) if o else "ncnn's defaults (below)")
        a = r.get("int8_vs_qat") or (report.get("int8_vs_qat") if i == 0 else None)
        if isinstance(a, Mapping) and a.get("cosine") is not None:
            top1 = a.get("top1_agreement")
            top1_txt = "" if top1 is None else f", top-1 agreement {100 * float(top1):.2f}%"
            n = a.get("n") or hb.get("n")
            line += f". int8 vs the PyTorch QAT model: cosine {float(a['cosine']):.6f}{top1_txt}"
            if n:
                line += f" on {n} held samples"
        out.append(line)
    if hb.get("source"):
        out.append(f"- held samples: {hb['source']}")
    fw = report.get("float_weights")
    if fw:
        out.append(
            f"- weights of the layers kept in float are stored in {fw} in model.int8.bin"
            + (" (as QAT trained them)" if fw == "fp32" else " (as ncnn2int8 writes them)")
        )
    if shared:
        out.append("- options on every target: " + ", ".join(f"{k}={v}" for k, v in opts[0].items()))
    if defaults and not any(r.get("options") for _, r in rows):
        out.append(
            f"- ncnn's default options (ncnn {version}): "
            + ", ".join(f"{k}={v}" for k, v in defaults.items() if k != "num_threads")
            + "; num_threads defaults to the number of big cores"
        )
    return out


def deploy_note(
    inputs: list[tuple[str, Shape | None]],
    outputs: list[tuple[str, Shape | None]],
    preprocessing: Preprocessing | None,
    report: Mapping[str, Any],
    expected: str | None,
    expected_error: str | None = None,
    id_inputs: set[str] | frozenset[str] = frozenset(),
) -> str:
    """Text of DEPLOY.md (``id_inputs``: input blobs that take int32 token ids)."""
    version, defaults = _installed_ncnn()
    out = [
        "# Running model.int8 with ncnn",
        "",
        "Written by lightning_ncnnqat's export. `model.int8.param` / `model.int8.bin` is the int8 model;",
        "`run_int8.py` (Python) and `main.cpp` (C++) load it, run one input and print the output(s).",
        "",
        "## Blobs",
        "",
        "Shapes are of one sample, in numpy order (as PyTorch sees it without the batch dimension);",
        "ncnn takes one sample per `Extractor` run, as an `ncnn::Mat` of the dimensions given.",
        "",
        "| role | blob | shape | ncnn::Mat |",
        "| --- | --- | --- | --- |",
    ]
    for role, blobs in (("input", inputs), ("output", outputs)):
        out += [f"| {role} | `{n}` | {_fmt_shape(s)} | {_mat_dims(s)} |" for n, s in blobs]
    if id_inputs:
        names = ", ".join(f"`{n}`" for n in sorted(id_inputs))
        out += [
            "",
            f"Input(s) {names} hold token ids: ncnn's `Embed` reads the Mat's memory as **int32**",
            "(`src/layer/embed.cpp`). Fill it with int32 values (`np.int32` array viewed as float32 in",
            "Python, as `run_int8.py` does; in C++ `ncnn::Mat in(w, (size_t)4u)` and write `int` ids",
            "through `(int*)in.data`). Float values holding the ids read as wrong rows, with no error.",
        ]
    out += ["", "## Input preprocessing", ""]
    if preprocessing is None:
        out += [
            "Not recorded: the export was given no preprocessing. The model takes the tensor your",
            "training pipeline fed it. Pass `preprocessing=Preprocessing(mean, std)` (or give the",
            "datamodule a `preprocessing` attribute) to have it written here in ncnn's terms.",
        ]
    else:
        p = preprocessing
        mv = ", ".join(f"{v:.6g}f" for v in p.mean_vals)
        nv = ", ".join(f"{v:.6g}f" for v in p.norm_vals)
        out += [
            f"Training fed `Normalize(mean={_floats(p.mean)}, std={_floats(p.std)})` on pixels scaled to",
            f"[0, {p.input_range:g}], channels in {p.channel_order} order. In ncnn, from 8-bit pixels (0..255):",
            "",
            "```cpp",
            f"ncnn::Mat in = ncnn::Mat::from_pixels(pixels, ncnn::Mat::{p.pixel_type}, w, h);",
            f"const float mean_vals[{p.channels}] = {{{mv}}};",
            f"const float norm_vals[{p.channels}] = {{{nv}}};",
            "in.substract_mean_normalize(mean_vals, norm_vals); // (x - mean_vals[c]) * norm_vals[c]",
            "```",
            "",
            f"`mean_vals = mean * 255 / {p.input_range:g}`, `norm_vals = {p.input_range:g} / (255 * std)`. Pixels in another",
            "order: use the converting pixel type (e.g. `PIXEL_BGR2RGB` for OpenCV images fed to an RGB",
            "model); another size: `ncnn::Mat::from_pixels_resize(pixels, type, w, h, target_w, target_h)`.",
            "An ncnn built with selected layers only (`WITH_LAYER_*=OFF`) must keep `Bias` and `Scale`:",
            "`substract_mean_normalize` runs them (ncnn `src/mat.cpp`), and crashes without them.",
        ]
    out += ["", "## Verified with", ""]
    out += _verified_rows(report, version, defaults)
    out += [
        "",
        "Each target ran the model with its own ncnn build; a CPU not listed runs other kernels (ARM",
        "NEON, fp16 arithmetic on ARMv8.2) and computes slightly differently.",
        "",
        *speed_lines(report),  # int8 vs float per timed target, plainly when int8 does not pay
        "## Python",
        "",
        "```bash",
        "pip install ncnn numpy",
        "python run_int8.py                 # deterministic input",
        "python run_int8.py input.npy       # float32 model input of the shape above",
    ]
    if preprocessing is not None:
        out.append(f"python run_int8.py image.npy       # uint8 HxWx{preprocessing.channels} pixels, normalised as above")
    out += ["python run_int8.py --save out.npz  # also save the outputs", "```", ""]
    if expected:
        out += [
            "Expected output for the deterministic input (`run_int8.py` run by the export, ncnn "
            f"{version or 'unknown'}, {platform.machine() or 'this machine'}):",
            "",
            "```",
            expected.rstrip(),
            "```",
        ]
    else:
        out.append(f"The export could not run `run_int8.py`: {expected_error or 'input shape unknown'}.")
    out += [
        "",
        "## C++",
        "",
        "`main.cpp` does the same with ncnn's C++ API and prints the same text. The export does not",
        "compile it (the ncnn Python wheel ships no C++ headers). Build it against an ncnn build or",
        "release package (include/ncnn and lib/ with libncnn):",
        "",
        "```bash",
        "g++ -O2 -fopenmp main.cpp -I$NCNN/include/ncnn -L$NCNN/lib -lncnn -o run_int8",
        "./run_int8 .                          # deterministic input; compare with the output above",
    ]
    if preprocessing is not None and len(inputs) == 1:
        out.append("./run_int8 . image.raw W H            # raw 8-bit pixels, normalised as above")
    out += ["```", ""]
    return "\n".join(out)


def write_deploy_kit(
    export_dir: str | Path,
    report: Mapping[str, Any],
    preprocessing: Preprocessing | Mapping[str, Any] | None = None,
    *,
    input_shapes: Any = None,
    self_test: bool = True,
) -> list[str]:
    """Write DEPLOY.md, run_int8.py and main.cpp beside ``export_dir/model.int8.param/.bin``.

    Args:
        export_dir: the export directory (holds model.int8.param/.bin).
        report: the export report as a dict (``ExportReport.to_dict()``); read when present:
            ``io`` (``{"inputs"|"outputs": [{"blob", "shape"}]}``), ``runtime`` (``{target:
            {"ncnn_version", "machine", "cpu_features", "options", "int8_vs_qat"}}``), the top-level
            ``int8_vs_qat`` (for the first target), ``held_batch``, ``timing.input_shapes``.
        preprocessing: the input normalisation (or its dict form), or None when unknown.
        input_shapes: per-sample input shapes (``{blob: shape}`` or a list in input order); else
            taken from the report or the .param.
        self_test: run run_int8.py once on the deterministic input (a subprocess) to measure the
            output shapes and give the expected output in the note.

    Returns the names of the files written (all land together or none).

    Raises:
        FileNotFoundError: model.int8.param is missing.
        ValueError: bad ``preprocessing``; a model with no input or output blob.
    """
    export_dir = Path(export_dir)
    pre = None if preprocessing is None else Preprocessing.from_dict(preprocessing)
    param_path = export_dir / "model.int8.param"
    if not param_path.is_file():
        raise FileNotFoundError(f"deploy kit: {param_path} does not exist (write the int8 model first)")
    param = NcnnParam.parse(param_path.read_text())
    inputs = resolve_input_shapes(param, report, input_shapes)
    _, out_names = model_io(param)
    if not inputs or not out_names:
        raise ValueError(f"deploy kit: {param_path} has inputs {[n for n, _ in inputs]} and outputs {out_names}")
    script = python_script(inputs, out_names, pre)
    io = report.get("io") if isinstance(report.get("io"), Mapping) else {}
    known = _shapes_from(io.get("outputs"), out_names)
    outputs: list[tuple[str, Shape | None]] = [(n, known.get(n)) for n in out_names]
    expected = error = None
    if self_test and all(s is not None for _, s in inputs):
        try:
            values, expected = _self_test(export_dir, script)
            outputs = [(n, tuple(values[n].shape)) for n in out_names]
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            error = str(e).splitlines()[0] if str(e) else type(e).__name__
    elif not self_test:
        error = "not run (self_test=False)"
    write_files_atomically(
        export_dir,
        {
            "run_int8.py": script,
            "main.cpp": cpp_source(inputs, out_names, pre),
            "DEPLOY.md": deploy_note(inputs, outputs, pre, report, expected, error, param.id_inputs()),
        },
    )
    return list(KIT_NAMES)
