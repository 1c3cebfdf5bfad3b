"""The runnable snippets of the deployment kit: ``run_int8.py`` (Python) and ``main.cpp`` (C++).

Both load ``model.int8.param/.bin`` with ncnn's default options, build each input from a file
or from the same deterministic formula, run one inference and print every output in the same
text format, so a C++ integration on the device can be compared line by line with the Python
run on the exporting machine.

Deterministic input (identical bits in numpy and C++): element ``i`` (flattened ``C, H, W``
order) of input ``k`` is ``float((i * 7919 + k * 104729) % 2001) / 1000 - 1`` computed in
float32, values in ``[-1, 1]``. Every step is exact or correctly rounded in IEEE single precision.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning_ncnnqat.preprocessing import Preprocessing

Shape = tuple[int, ...]


def python_script(
    inputs: Sequence[tuple[str, Shape | None]], outputs: Sequence[str], preprocessing: Preprocessing | None
) -> str:
    """Text of ``run_int8.py``: needs only ``pip install ncnn numpy``."""
    pre = None
    if preprocessing is not None:
        pre = {
            "mean_vals": [float(v) for v in preprocessing.mean_vals],
            "norm_vals": [float(v) for v in preprocessing.norm_vals],
            "pixel_type": preprocessing.pixel_type,
            "channels": preprocessing.channels,
        }
    first = inputs[0][1] if inputs else None
    shape_txt = "the model input" if first is None else f"shape {tuple(first)}"
    pixel_line = (
        f"    python run_int8.py image.npy        # uint8 pixels HxWx{preprocessing.channels} in "
        f"{preprocessing.channel_order} order, normalised as in training\n"
        if preprocessing is not None
        else ""
    )
    return (
        _PY_HEAD.format(shape_txt=shape_txt, pixel_line=pixel_line)
        + f"INPUTS = {[(n, None if s is None else tuple(int(d) for d in s)) for n, s in inputs]!r}\n"
        + f"OUTPUTS = {list(outputs)!r}\n"
        + f"PREPROCESSING = {pre!r}\n"
        + _PY_BODY
    )


_PY_HEAD = '''#!/usr/bin/env python3
"""Run the int8 ncnn model beside this file on one input and print its output(s).

Written by lightning_ncnnqat's export; needs only `pip install ncnn numpy`. ncnn's default
options are used: the options the export verified the model with.

    python run_int8.py                  # the deterministic input DEPLOY.md gives the output of
    python run_int8.py input.npy        # float32 model input, {shape_txt} (a leading 1 is allowed)
{pixel_line}    python run_int8.py a.npy b.npy      # one file per input blob, in the order of INPUTS
    python run_int8.py inputs.npz       # arrays named after the input blobs
    python run_int8.py --save out.npz   # also save the outputs, named after the output blobs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import ncnn
import numpy as np

HERE = Path(__file__).resolve().parent
# (input blob, shape of one sample as PyTorch sees it without the batch dimension)
'''

_PY_BODY = '''

def deterministic_input(shape: tuple[int, ...], k: int) -> np.ndarray:
    """Input k: float((i * 7919 + k * 104729) % 2001) / 1000 - 1 in float32 (main.cpp: same bits)."""
    i = np.arange(int(np.prod(shape)), dtype=np.int64)
    v = ((i * 7919 + k * 104729) % 2001).astype(np.float32) / np.float32(1000.0) - np.float32(1.0)
    return v.reshape(shape)


def pixels_to_mat(img: np.ndarray, name: str) -> ncnn.Mat:
    """uint8 HxWxC pixels -> model input, as in training: from_pixels + substract_mean_normalize."""
    if PREPROCESSING is None:
        sys.exit(f"input '{name}': uint8 pixels given, but the export recorded no preprocessing; "
                 "pass the float32 model input instead")
    img = np.ascontiguousarray(img if img.ndim == 3 else img[:, :, None])
    if img.shape[2] != PREPROCESSING["channels"]:
        sys.exit(f"input '{name}': pixels must be HxWx{PREPROCESSING['channels']}, got {img.shape}")
    h, w = img.shape[:2]
    mat = ncnn.Mat.from_pixels(img, getattr(ncnn.Mat.PixelType, PREPROCESSING["pixel_type"]), w, h)
    mat.substract_mean_normalize(PREPROCESSING["mean_vals"], PREPROCESSING["norm_vals"])
    return mat


def load_inputs(paths: list[str]) -> list[np.ndarray | None]:
    if not paths:
        missing = [n for n, s in INPUTS if s is None]
        if missing:
            sys.exit(f"the shape of input(s) {missing} is not known: give the input as a .npy file")
        return [deterministic_input(s, k) for k, (_, s) in enumerate(INPUTS)]
    if len(paths) == 1 and paths[0].endswith(".npz"):
        with np.load(paths[0]) as z:
            absent = [n for n, _ in INPUTS if n not in z.files]
            if absent:
                sys.exit(f"{paths[0]}: no array named {absent} (it has {z.files})")
            return [z[n] for n, _ in INPUTS]
    if len(paths) != len(INPUTS):
        sys.exit(f"the model has {len(INPUTS)} input(s) {[n for n, _ in INPUTS]}, got {len(paths)} file(s)")
    return [np.load(p) for p in paths]


def embed_inputs() -> set[str]:
    """Input blobs read (through Split copies) only by Embed layers, which read the Mat as int32
    ids (ncnn src/layer/embed.cpp): integer arrays for them go in as int32, not as float values."""
    rows = [ln.split() for ln in (HERE / "model.int8.param").read_text().splitlines()[2:] if ln.strip()]
    readers: dict[str, list[tuple[str, list[str]]]] = {}
    for r in rows:
        nb, nt = int(r[2]), int(r[3])
        for b in r[4 : 4 + nb]:
            readers.setdefault(b, []).append((r[0], r[4 + nb : 4 + nb + nt]))

    def types(blob: str) -> set[str]:
        out: set[str] = set()
        for typ, tops in readers.get(blob, []):
            out |= set().union(*(types(t) for t in tops)) if typ == "Split" else {typ}
        return out

    return {name for name, _ in INPUTS if types(name) == {"Embed"}}


def to_mat(a: np.ndarray, name: str, shape: tuple[int, ...] | None) -> tuple[ncnn.Mat, np.ndarray | None]:
    """The ncnn.Mat for one input, an ncnn-owned copy (and the array it was copied from).

    Never the borrowing ``ncnn.Mat(array)`` itself: it has no reference count, and a first layer
    that works in place (a BatchNorm or ``x / 255`` on the input) crashes ncnn on it (src/net.cpp
    reads ``*refcount`` before an in-place layer); the owned copy is cloned there instead."""
    if a.dtype == np.uint8 and a.ndim in (2, 3) and (shape is None or a.shape != shape):
        return pixels_to_mat(a, name), None
    ids = a.dtype.kind in "iu" and name in embed_inputs()
    a = np.asarray(a, dtype=np.int32 if ids else np.float32)
    if shape is not None and a.shape == (1, *shape):
        a = a[0]
    if shape is not None and a.shape != shape:
        sys.exit(f"input '{name}': expected shape {shape} (or (1, *shape)), got {a.shape}")
    a = np.ascontiguousarray(a)
    return ncnn.Mat(a.view(np.float32) if ids else a).clone(), a


def fmt(name: str, v: np.ndarray) -> str:
    """Same text as main.cpp prints (the sum in double, in element order, as main.cpp adds)."""
    flat = v.ravel()
    head = " ".join("%.6f" % float(x) for x in flat[:10])
    return f"{name}: shape {tuple(v.shape)} sum {sum(float(x) for x in flat):.6f}\\n  first values: {head}"


def main() -> None:
    ap = argparse.ArgumentParser(description="run model.int8.param/.bin with ncnn on one input")
    ap.add_argument("inputs", nargs="*", help=".npy per input blob, or one .npz (default: deterministic input)")
    ap.add_argument("--save", default=None, help="write the outputs to this .npz")
    args = ap.parse_args()
    net = ncnn.Net()  # default options: set net.opt.* here, before loading, to change them
    if net.load_param(str(HERE / "model.int8.param")) != 0 or net.load_model(str(HERE / "model.int8.bin")) != 0:
        sys.exit(f"ncnn could not load model.int8.param/.bin from {HERE}")
    arrays = load_inputs(args.inputs)
    ex = net.create_extractor()
    keep = []
    for (name, shape), a in zip(INPUTS, arrays):
        mat, base = to_mat(a, name, shape)
        keep.append((mat, base))
        if ex.input(name, mat) != 0:
            sys.exit(f"ncnn refused input '{name}'")
    outs = {}
    for name in OUTPUTS:
        ret, mat = ex.extract(name)
        if ret != 0:
            sys.exit(f"ncnn could not compute output '{name}' (error {ret})")
        outs[name] = np.array(mat, copy=True).astype(np.float32, copy=False)
    for name, v in outs.items():
        print(fmt(name, v))
    if args.save:
        np.savez(args.save, **outs)


if __name__ == "__main__":
    main()
'''


def _mat_ctor(shape: Shape) -> str:
    """``ncnn::Mat`` constructor arguments for a numpy-order shape (w innermost)."""
    dims = list(reversed([int(d) for d in shape]))
    if not 1 <= len(dims) <= 4:
        raise ValueError(f"input shape {shape}: ncnn::Mat holds 1 to 4 dimensions")
    return ", ".join(str(d) for d in dims)


def cpp_source(
    inputs: Sequence[tuple[str, Shape | None]], outputs: Sequence[str], preprocessing: Preprocessing | None
) -> str:
    """Text of ``main.cpp``: ncnn's C++ API, default options, the deterministic input, or for a
    single-input model with preprocessing, a raw pixel file (``main DIR image.rgb W H``)."""
    lines = [_CPP_HEAD]
    if preprocessing is not None and len(inputs) != 1:
        lines.append(
            f"// Images are normalised with ncnn::Mat::from_pixels(..., ncnn::Mat::{preprocessing.pixel_type}, w, h) and\n"
            f"// substract_mean_normalize(mean_vals = {[round(v, 6) for v in preprocessing.mean_vals]},\n"
            f"// norm_vals = {[round(v, 9) for v in preprocessing.norm_vals]}) (see DEPLOY.md).\n"
        )
    if preprocessing is not None and len(inputs) == 1:
        mv = ", ".join(f"{v:.9g}f" for v in preprocessing.mean_vals)
        nv = ", ".join(f"{v:.9g}f" for v in preprocessing.norm_vals)
        lines.append(
            f"// Training normalised the input with mean={list(preprocessing.mean)} std={list(preprocessing.std)}\n"
            f"// on pixels scaled to [0, {preprocessing.input_range:g}], channels {preprocessing.channel_order}.\n"
            f"static const int kPixelChannels = {preprocessing.channels};\n"
            f"static const float kMeanVals[{preprocessing.channels}] = {{{mv}}};\n"
            f"static const float kNormVals[{preprocessing.channels}] = {{{nv}}};\n\n"
            "// 8-bit pixels (rows of w * kPixelChannels bytes, in the model's channel order) -> model input.\n"
            "// OpenCV BGR images for an RGB model: ncnn::Mat::PIXEL_BGR2RGB; other sizes: from_pixels_resize.\n"
            "static ncnn::Mat input_from_pixels(const unsigned char* pixels, int w, int h)\n"
            "{\n"
            f"    ncnn::Mat in = ncnn::Mat::from_pixels(pixels, ncnn::Mat::{preprocessing.pixel_type}, w, h);\n"
            "    in.substract_mean_normalize(kMeanVals, kNormVals); // (x - mean_vals[c]) * norm_vals[c]\n"
            "    return in;\n"
            "}\n"
        )
    lines.append(_CPP_FUNCS)
    body = [
        "int main(int argc, char** argv)",
        "{",
        '    const std::string dir = argc > 1 ? argv[1] : ".";',
        "    ncnn::Net net; // default options: set net.opt.* here, before loading, to change them",
        '    if (net.load_param((dir + "/model.int8.param").c_str()) != 0 || net.load_model((dir + "/model.int8.bin").c_str()) != 0)',
        "    {",
        '        fprintf(stderr, "cannot load model.int8.param/.bin from %s\\n", dir.c_str());',
        "        return 1;",
        "    }",
        "    ncnn::Extractor ex = net.create_extractor();",
    ]
    for k, (name, shape) in enumerate(inputs):
        var = f"in{k}_mat"
        if shape is None:
            body.append(f'    ncnn::Mat {var}; // shape of input "{name}" unknown at export: fill it yourself')
        else:
            body.append(f"    ncnn::Mat {var}({_mat_ctor(shape)}); // numpy shape {tuple(shape)}")
            body.append(f"    fill_deterministic({var}, {k});")
        if k == 0 and preprocessing is not None and len(inputs) == 1:
            body += [
                "    std::vector<unsigned char> pixels;",
                "    if (argc > 4) // main DIR image.raw W H: raw 8-bit pixels, kPixelChannels per pixel",
                "    {",
                "        const int w = atoi(argv[3]), h = atoi(argv[4]);",
                "        pixels.resize((size_t)w * h * kPixelChannels);",
                '        FILE* fp = fopen(argv[2], "rb");',
                "        const size_t got = fp ? fread(pixels.data(), 1, pixels.size(), fp) : 0;",
                "        if (fp) fclose(fp);",
                "        if (got != pixels.size())",
                "        {",
                '            fprintf(stderr, "cannot read %zu bytes from %s\\n", pixels.size(), argv[2]);',
                "            return 1;",
                "        }",
                f"        {var} = input_from_pixels(pixels.data(), w, h);",
                "    }",
            ]
        body.append(f'    ex.input("{name}", {var});')
    for k, name in enumerate(outputs):
        body += [
            f"    ncnn::Mat out{k};",
            f'    if (ex.extract("{name}", out{k}) != 0)',
            "    {",
            f'        fprintf(stderr, "cannot compute output {name}\\n");',
            "        return 1;",
            "    }",
            f'    print_mat("{name}", out{k});',
        ]
    body += ["    return 0;", "}", ""]
    lines.append("\n".join(body))
    return "\n".join(lines)


_CPP_HEAD = """// Run the int8 ncnn model on one input and print its output(s), as run_int8.py does.
// Written by lightning_ncnnqat's export. Build against ncnn (headers + library), e.g.:
//   g++ -O2 -fopenmp main.cpp -I$NCNN/include/ncnn -L$NCNN/lib -lncnn -o run_int8
//   ./run_int8 DIR          (DIR holds model.int8.param/.bin; default: the current directory)
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "net.h"
"""

_CPP_FUNCS = """
// Input k, element i (C, H, W order): float((i * 7919 + k * 104729) % 2001) / 1000 - 1,
// the same bits as run_int8.py's deterministic input.
static void fill_deterministic(ncnn::Mat& m, int k)
{
    long long i = 0;
    for (int q = 0; q < m.c; q++)
    {
        float* p = m.channel(q);
        for (int j = 0; j < m.w * m.h * m.d; j++, i++)
            p[j] = (float)((i * 7919LL + k * 104729LL) % 2001LL) / 1000.f - 1.f;
    }
}

// Same text as run_int8.py: shape in numpy order, sum, first 10 values.
static void print_mat(const char* name, const ncnn::Mat& m)
{
    std::vector<float> v;
    for (int q = 0; q < m.c; q++)
    {
        const float* p = m.channel(q);
        v.insert(v.end(), p, p + (size_t)m.w * m.h * m.d);
    }
    if (m.dims == 1) printf("%s: shape (%d,)", name, m.w);
    else if (m.dims == 2) printf("%s: shape (%d, %d)", name, m.h, m.w);
    else if (m.dims == 3) printf("%s: shape (%d, %d, %d)", name, m.c, m.h, m.w);
    else printf("%s: shape (%d, %d, %d, %d)", name, m.c, m.d, m.h, m.w);
    double sum = 0;
    for (float x : v) sum += x;
    printf(" sum %.6f\\n  first values:", sum);
    for (size_t j = 0; j < v.size() && j < 10; j++) printf(" %.6f", v[j]);
    printf("\\n");
}
"""
