"""Float layers' weights in model.int8.bin: ``float_weights="fp32"`` (default) vs ``"fp16"``.

* fp32: the float layers' tagged arrays are the float32 weights QAT trained, byte for byte (the
  pnnx model's, which match the folded torch weights), and ncnn then computes the model at the
  float32 floor where fp16 storage did not (x86 with the runtime's own approximations off:
  the report's strict figure);
* fp16: byte-identical to the real ncnn2int8 (the C++ tool) from the same model and table;
* both: same .param, same int8 layers; only the float layers' arrays differ;
* a wrong value is refused, naming the argument.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_ncnnqat import QATConfig, prepare_qat
from lightning_ncnnqat.export import export
from lightning_ncnnqat.ncnn.int8_writer import write_int8
from lightning_ncnnqat.ncnn.bin_layout import TAG_FP16, TAG_FP32, TAG_INT8, locate
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.ncnn.fp32_blobs import strip_fp32_blobs
from models import MixedNet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from zoo import float32_floor  # noqa: E402  (the zoo's float64-vs-float32 reference)

TOOLS = Path(os.environ.get("NCNN_TOOLS") or Path(__file__).resolve().parents[2] / "shared" / "ncnn-tools")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """MixedNet with its grouped conv kept in float, ranges from random data, exported twice."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MixedNet(width=16)
    model.train()
    with torch.no_grad():  # BN statistics of the data: a random-init BN folds to var 1
        for _ in range(3):
            model(torch.randn(8, 3, 16, 16))
    x = torch.randn(1, 3, 16, 16)
    prepare_qat(model, x, QATConfig(quantize_grouped_convs=False))
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 16, 16))
    model.eval()
    held = torch.randn(32, 3, 16, 16)
    out = {}
    for fw in ("fp32", "fp16"):
        d = tmp_path_factory.mktemp(f"fw_{fw}")
        rep = export(model, d, x, held, verbose=False, timing_runs=0, layer_check_samples=1, check_onnx=False,
                     targets="x86", float_weights=fw)
        out[fw] = (d, rep)
    return model, held, out


def _layout(d: Path, stem: str):
    param = NcnnParam.parse((d / f"{stem}.param").read_text())
    data = (d / f"{stem}.bin").read_bytes()
    return param, data, locate(param.layers, data)


def test_fp32_float_layers_hold_the_exact_fp32_weights(exports) -> None:
    model, _, out = exports
    d, rep = out["fp32"]
    assert rep.float_weights == "fp32" and '"float_weights": "fp32"' in (d / "report.json").read_text()
    p8, b8, l8 = _layout(d, "model.int8")
    pf, bf, lf = _layout(d, "model.ncnn")
    float_convs = [i for i, lay in enumerate(p8.layers) if lay.type.startswith("Convolution") and not lay.get_int(8, 0)]
    assert len(float_convs) == 1, [p8.layers[i].name for i in float_convs]  # the grouped conv
    i = float_convs[0]
    w8, wf = l8[i][0], lf[i][0]
    assert w8.tag == TAG_FP32 and w8.role == "weight"
    assert b8[w8.offset : w8.offset + w8.nbytes] == bf[wf.offset : wf.offset + wf.nbytes]
    # ... and those are the torch weights with the BN after the conv folded in (by pnnx, in float32)
    bn = model.grouped_bn
    k = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
    want = (model.grouped.weight.detach().double() * k.reshape(-1, 1, 1, 1)).float().numpy().ravel()
    np.testing.assert_allclose(w8.values(b8), want, rtol=1e-6, atol=0)
    # the same layer in the fp16 model is float16, and not equal to the float32 weights
    d16, _ = out["fp16"]
    p16, b16, l16 = _layout(d16, "model.int8")
    w16 = l16[i][0]
    assert w16.tag == TAG_FP16
    assert np.count_nonzero(w16.values(b16) != want) > want.size // 2
    # int8 layers are the same bytes in both
    for k, lay in enumerate(p8.layers):
        if lay.get_int(8, 0):
            e8, e16 = l8[k][0], l16[k][0]
            assert e8.tag == TAG_INT8 and b8[e8.offset : e8.offset + e8.nbytes] == b16[e16.offset : e16.offset + e16.nbytes]
    assert (d / "model.int8.param").read_text() == (d16 / "model.int8.param").read_text()
    assert len(b8) - len(b16) == 2 * want.size  # 2 more bytes per float weight (4-byte padding aside)


def test_fp32_reaches_the_float32_floor_where_fp16_does_not(exports) -> None:
    model, held, out = exports
    floor_gap = 1.0 - float32_floor(model, held)
    gaps = {fw: 1.0 - rep.runtime["x86"]["int8_vs_qat_strict"]["cosine"] for fw, (_, rep) in out.items()}
    assert gaps["fp32"] <= 2 * floor_gap + 1e-7, (gaps, floor_gap)
    assert gaps["fp16"] > 10 * max(gaps["fp32"], floor_gap), (gaps, floor_gap)


@pytest.mark.skipif(not (TOOLS / "ncnn2int8").is_file(), reason=f"ncnn2int8 is not at {TOOLS} (set NCNN_TOOLS)")
def test_fp16_is_byte_identical_to_ncnn2int8(exports, tmp_path: Path) -> None:
    _, _, out = exports
    d, _ = out["fp16"]
    proc = subprocess.run(
        [str(TOOLS / "ncnn2int8"), str(d / "model.ncnn.param"), str(d / "model.ncnn.bin"), "r.param", "r.bin",
         str(d / "model.ncnn.table")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "r.param").read_text() == strip_fp32_blobs((d / "model.int8.param").read_text())  # + the export's float32-blob featmask (ncnn/fp32_blobs.py)
    assert (tmp_path / "r.bin").read_bytes() == (d / "model.int8.bin").read_bytes()
    d32, _ = out["fp32"]
    assert (tmp_path / "r.bin").read_bytes() != (d32 / "model.int8.bin").read_bytes()


def test_unknown_float_weights_is_refused(exports, tmp_path: Path) -> None:
    model, held, out = exports
    d, _ = out["fp32"]
    param, data = NcnnParam.parse((d / "model.ncnn.param").read_text()), (d / "model.ncnn.bin").read_bytes()
    with pytest.raises(ValueError, match="float_weights.*'bf16'"):
        write_int8(param, data, {}, float_weights="bf16")
    with pytest.raises(ValueError, match="float_weights.*'fp64'"):
        export(model, tmp_path, held[:1], held, verbose=False, float_weights="fp64")


def test_preflight_writes_the_int8_model_with_the_chosen_float_weights() -> None:
    from lightning_ncnnqat.export.api import preflight_export

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, groups=2))
    x = torch.randn(2, 3, 10, 10)
    prepare_qat(model, x[:1], QATConfig(quantize_grouped_convs=False))  # the grouped conv stays float
    for fw in ("fp16", "fp32"):
        assert preflight_export(model, x[:1], float_weights=fw).float_weights == fw
    with pytest.raises(ValueError, match=r"`float_weights` must be one of \('fp32', 'fp16'\), not 'bf16'"):
        preflight_export(model, x[:1], float_weights="bf16")
