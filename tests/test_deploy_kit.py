"""The deployment kit: DEPLOY.md, run_int8.py and main.cpp beside a real int8 export.

run_int8.py runs in a subprocess from the export directory, as a user would, on a saved held
sample, on 8-bit pixels and on its deterministic input; its numbers are compared with the
PyTorch QAT model and with ncnn run in this process. A hand-written ncnn model with two inputs
and two outputs checks the blob handling. main.cpp is compiled and run where ncnn's C++ headers
and library are available (NCNN_CXX_DIR, or shared/ncnn-cxx beside the repository).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import ncnn
import numpy as np
import pytest
import torch

from lightning_ncnnqat import prepare_qat
from lightning_ncnnqat.export import export
from lightning_ncnnqat.export.deploy_kit import KIT_NAMES, model_io, write_deploy_kit
from lightning_ncnnqat.export.deploy_snippets import python_script
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.preprocessing import Preprocessing
from lit_models import make_data
from models import MixedNet

CIFAR = Preprocessing((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def run_snippet(export_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python run_int8.py ARGS`` from the export directory."""
    return subprocess.run(
        [sys.executable, "run_int8.py", *args], cwd=export_dir, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def ncnn_default(export_dir: Path, xs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """model.int8 in this process, ncnn's default options; float inputs by blob name."""
    net = ncnn.Net()
    assert net.load_param(str(export_dir / "model.int8.param")) == 0
    assert net.load_model(str(export_dir / "model.int8.bin")) == 0
    ex = net.create_extractor()
    keep = []
    for name, x in xs.items():
        arr = np.ascontiguousarray(x, dtype=np.float32)
        keep.append(arr)
        ex.input(name, ncnn.Mat(arr))
    _, outs = model_io(NcnnParam.parse((export_dir / "model.int8.param").read_text()))
    res = {}
    for name in outs:
        ret, mat = ex.extract(name)
        assert ret == 0
        res[name] = np.array(mat, copy=True)
    return res


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """A QAT MixedNet (ranges from 4 training batches) exported, with a kit for CIFAR-style input."""
    torch.manual_seed(0)
    model = MixedNet(width=8)
    x = make_data(64, 16, seed=0).tensors[0]
    prepare_qat(model, x[:2])
    model.train()
    with torch.no_grad():
        for i in range(0, 64, 16):
            model(x[i : i + 16])
    model.eval()
    held = make_data(16, 16, seed=1).tensors[0]
    out = tmp_path_factory.mktemp("kit")
    report = export(model, out, held[:1], held, verbose=False, timing_runs=2, targets="x86")
    names = write_deploy_kit(out, report.to_dict(), CIFAR)
    return model, report, out, held, names


def test_kit_files_land_beside_the_model(kit) -> None:
    _, _, out, _, names = kit
    assert names == list(KIT_NAMES)
    for n in names:
        assert (out / n).is_file() and (out / n).stat().st_size > 200, n
    assert not list(out.glob(".*.tmp"))


def test_the_summary_ends_with_what_to_do_next(kit) -> None:
    _, report, out, _, _ = kit
    tail = report.summary().splitlines()[-3:]
    assert f"{out}/DEPLOY.md" in tail[0] and "run_int8.py" in tail[1] and "report.json" in tail[2]


def test_python_snippet_on_a_saved_sample_gives_the_qat_models_numbers(kit, tmp_path: Path) -> None:
    model, report, out, held, _ = kit
    sample = held[3].numpy()
    np.save(tmp_path / "sample.npy", sample)
    np.save(tmp_path / "batched.npy", sample[None])
    r = run_snippet(out, str(tmp_path / "sample.npy"), "--save", str(tmp_path / "o.npz"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("out0: shape (10,) sum ")
    got = np.load(tmp_path / "o.npz")["out0"]
    with torch.no_grad():
        want = model(held[3:4]).numpy()[0]
    assert _cos(got, want) >= 0.9999 and got.argmax() == want.argmax()
    # bit-equal to ncnn run in this process with its default options
    assert np.array_equal(got, ncnn_default(out, {"in0": sample})["out0"])
    # and within what the report measured for the whole held batch
    assert float(np.abs(got - want).max()) <= report.int8_vs_qat.max_abs_err + 1e-7
    # a leading batch dimension of 1 is accepted
    r2 = run_snippet(out, str(tmp_path / "batched.npy"), "--save", str(tmp_path / "o2.npz"))
    assert r2.returncode == 0 and np.array_equal(np.load(tmp_path / "o2.npz")["out0"], got)


def test_python_snippet_normalises_pixels_as_training_did(kit, tmp_path: Path) -> None:
    model, _, out, _, _ = kit
    img = np.random.default_rng(3).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "img.npy", img)
    r = run_snippet(out, str(tmp_path / "img.npy"), "--save", str(tmp_path / "o.npz"))
    assert r.returncode == 0, r.stderr
    got = np.load(tmp_path / "o.npz")["out0"]
    x = CIFAR.normalize(img)  # torchvision's ToTensor + Normalize
    with torch.no_grad():
        want = model(torch.from_numpy(x)[None]).numpy()[0]
    assert _cos(got, want) >= 0.9999
    assert _cos(got, ncnn_default(out, {"in0": x})["out0"]) >= 0.99999


def test_deterministic_run_prints_what_the_note_says(kit) -> None:
    _, _, out, _, _ = kit
    r = run_snippet(out)
    assert r.returncode == 0, r.stderr
    note = (out / "DEPLOY.md").read_text()
    block = note.split("Expected output for the deterministic input", 1)[1].split("```")[1].strip()
    assert r.stdout.strip() == block
    # the formula the note and main.cpp share
    i = np.arange(3 * 16 * 16)
    x = (((i * 7919) % 2001) / 1000.0 - 1.0).astype(np.float32).reshape(3, 16, 16)
    want = ncnn_default(out, {"in0": x})["out0"]
    first = [float(v) for v in r.stdout.split("first values:")[1].split()]
    assert first == pytest.approx(want[:10].tolist(), abs=5e-7)
    assert x.std() > 0.5


def test_note_has_blobs_preprocessing_and_runtime(kit) -> None:
    _, report, out, _, _ = kit
    note = (out / "DEPLOY.md").read_text()
    assert "| input | `in0` | (3, 16, 16) | c=3 h=16 w=16 |" in note
    assert "| output | `out0` | (10,) | w=10 |" in note
    assert "ncnn::Mat::PIXEL_RGB" in note and "substract_mean_normalize" in note
    assert "125.307f, 122.961f, 113.858f" in note  # mean * 255
    assert f"{CIFAR.norm_vals[0]:.6g}f" in note
    assert f"ncnn {ncnn.__version__}" in note
    assert f"cosine {report.int8_vs_qat.cosine:.6f}" in note
    assert report.float_weights == "fp32" and "kept in float are stored in fp32" in note
    assert "g++" in note and "main.cpp" in note and "does not" in note  # says it is not compiled here
    cpp = (out / "main.cpp").read_text()
    assert 'ex.input("in0", in0_mat);' in cpp and 'ex.extract("out0", out0)' in cpp
    assert "ncnn::Mat in0_mat(16, 16, 3);" in cpp


def test_note_without_preprocessing_says_so(kit, tmp_path: Path) -> None:
    _, report, out, _, _ = kit
    d = tmp_path / "nopre"
    d.mkdir()
    for n in ("model.int8.param", "model.int8.bin"):
        shutil.copy(out / n, d / n)
    write_deploy_kit(d, report.to_dict(), None)
    note = (d / "DEPLOY.md").read_text()
    assert "Not recorded" in note and "substract_mean_normalize" not in note
    img = tmp_path / "img.npy"
    np.save(img, np.zeros((16, 16, 3), np.uint8) + 7)
    r = run_snippet(d, str(img))
    assert r.returncode != 0 and "recorded no preprocessing" in r.stderr


# ---------------------------------------------------------------- two inputs, two outputs

TWO_IO = """7767517
6 7
Input            in_a   0 1 a 0=4 1=3 2=2
Input            in_b   0 1 b
BinaryOp         add    2 1 a b s 0=0
Split            split  1 2 s s1 s2
ReLU             relu   1 1 s1 out_relu
Sigmoid          sig    1 1 s2 out_sig
"""


def test_two_inputs_two_outputs(tmp_path: Path) -> None:
    (tmp_path / "model.int8.param").write_text(TWO_IO)
    (tmp_path / "model.int8.bin").write_bytes(b"")
    param = NcnnParam.parse(TWO_IO)
    assert model_io(param) == (["a", "b"], ["out_relu", "out_sig"])
    # a's shape from its Input layer params, b's given; the report supplies none
    write_deploy_kit(tmp_path, {}, None, input_shapes={"b": (2, 3, 4)})
    note = (tmp_path / "DEPLOY.md").read_text()
    for line in ("| input | `a` | (2, 3, 4) |", "| input | `b` | (2, 3, 4) |",
                 "| output | `out_relu` | (2, 3, 4) |", "| output | `out_sig` | (2, 3, 4) |"):
        assert line in note, line
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 2, 3, 4)).astype(np.float32)
    np.savez(tmp_path / "in.npz", a=a, b=b)
    r = run_snippet(tmp_path, str(tmp_path / "in.npz"), "--save", str(tmp_path / "o.npz"))
    assert r.returncode == 0, r.stderr
    o = np.load(tmp_path / "o.npz")
    assert np.allclose(o["out_relu"], np.maximum(a + b, 0), atol=1e-6)
    assert np.allclose(o["out_sig"], 1 / (1 + np.exp(-(a + b))), atol=1e-5)
    assert "out_relu: shape (2, 3, 4)" in r.stdout and "out_sig: shape (2, 3, 4)" in r.stdout
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    r = run_snippet(tmp_path, str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--save", str(tmp_path / "o2.npz"))
    assert r.returncode == 0 and np.array_equal(np.load(tmp_path / "o2.npz")["out_sig"], o["out_sig"])
    # mistakes name the blobs
    r = run_snippet(tmp_path, str(tmp_path / "a.npy"))
    assert r.returncode != 0 and "2 input(s) ['a', 'b'], got 1 file(s)" in r.stderr
    np.savez(tmp_path / "bad.npz", a=a)
    r = run_snippet(tmp_path, str(tmp_path / "bad.npz"))
    assert r.returncode != 0 and "no array named ['b']" in r.stderr
    np.save(tmp_path / "wrong.npy", a[:, :2])
    r = run_snippet(tmp_path, str(tmp_path / "wrong.npy"), str(tmp_path / "b.npy"))
    assert r.returncode != 0 and "input 'a': expected shape (2, 3, 4)" in r.stderr
    cpp = (tmp_path / "main.cpp").read_text()
    assert cpp.count("fill_deterministic(in") == 2 and 'print_mat("out_sig", out1);' in cpp


def test_unknown_input_shape_is_said_in_the_note(tmp_path: Path) -> None:
    (tmp_path / "model.int8.param").write_text(TWO_IO)
    (tmp_path / "model.int8.bin").write_bytes(b"")
    write_deploy_kit(tmp_path, {}, None)
    note = (tmp_path / "DEPLOY.md").read_text()
    assert "| input | `b` | unknown |" in note and "could not run" in note
    r = run_snippet(tmp_path)
    assert r.returncode != 0 and "shape of input(s) ['b'] is not known" in r.stderr


def test_missing_int8_model_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model.int8.param"):
        write_deploy_kit(tmp_path, {}, None)


# ---------------------------------------------------------------- C++


def _ncnn_cxx() -> Path | None:
    for root in (os.environ.get("NCNN_CXX_DIR"), Path(__file__).resolve().parents[2] / "shared" / "ncnn-cxx"):
        if root and (Path(root) / "include" / "ncnn" / "net.h").is_file():
            return Path(root)
    return None


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
def test_cpp_snippet_compiles_runs_and_prints_what_python_prints(kit, tmp_path: Path) -> None:
    root = _ncnn_cxx()
    if root is None:
        pytest.skip("ncnn C++ headers not found (set NCNN_CXX_DIR to an ncnn install prefix: include/ncnn, lib)")
    _, _, out, _, _ = kit
    inc, lib = root / "include" / "ncnn", root / "lib"
    if not (lib / "libncnn.a").is_file() and not (lib / "libncnn.so").is_file():
        # headers only: the snippet must at least compile against ncnn's API
        cc = subprocess.run(["g++", "-std=c++11", "-fsyntax-only", "-Wall", str(out / "main.cpp"), f"-I{inc}"],
                            capture_output=True, text=True, timeout=300)
        assert cc.returncode == 0 and not cc.stderr, cc.stderr[-3000:]
        pytest.skip(f"compiled main.cpp against {inc}; no libncnn in {lib} to link and run it")
    exe = tmp_path / "run_int8"
    cc = subprocess.run(
        ["g++", "-O1", "-fopenmp", str(out / "main.cpp"), f"-I{inc}", f"-L{lib}", "-lncnn", "-lpthread", "-o", str(exe)],
        capture_output=True, text=True, timeout=300,
    )
    assert cc.returncode == 0, cc.stderr[-3000:]
    env = {**os.environ, "LD_LIBRARY_PATH": str(lib), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(exe), str(out)], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    py = run_snippet(out)
    shape = re.compile(r"shape \([^)]*\)")
    assert shape.findall(r.stdout) == shape.findall(py.stdout)
    got = [float(v) for v in r.stdout.split("first values:")[1].split()]
    want = [float(v) for v in py.stdout.split("first values:")[1].split()]
    assert got == pytest.approx(want, abs=2e-6), (r.stdout, py.stdout)
    # raw pixels: the C++ preprocessing gives what the Python one gives
    img = np.random.default_rng(3).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    img.tofile(tmp_path / "img.raw")
    np.save(tmp_path / "img.npy", img)
    rc = subprocess.run([str(exe), str(out), str(tmp_path / "img.raw"), "16", "16"], capture_output=True,
                        text=True, timeout=60, env=env)
    rp = run_snippet(out, str(tmp_path / "img.npy"))
    assert rc.returncode == 0 and rp.returncode == 0, rc.stderr + rp.stderr
    got = [float(v) for v in rc.stdout.split("first values:")[1].split()]
    want = [float(v) for v in rp.stdout.split("first values:")[1].split()]
    assert got == pytest.approx(want, abs=2e-6)


def test_script_text_is_standalone() -> None:
    """run_int8.py imports only ncnn, numpy and the standard library (users copy it alone)."""
    text = python_script([("in0", (3, 4, 4))], ["out0"], CIFAR)
    imports = set(re.findall(r"^(?:import|from) (\w+)", text, flags=re.M))
    assert imports == {"__future__", "argparse", "sys", "pathlib", "ncnn", "numpy"}
    compile(text, "run_int8.py", "exec")
    assert json.loads(json.dumps(CIFAR.to_dict()))["ncnn"]["pixel_type"] in text
