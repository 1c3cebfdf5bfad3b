"""Activations ncnn fuses are folded into the layer before them, so int8 chains run through them.

The export folds HardSwish (which pnnx leaves as a layer of its own) and any other activation
ncnn's Convolution / ConvolutionDepthWise / InnerProduct fuse (``conversion.activation_fold``);
ReLU6 (Clip), LeakyReLU and a one-slope PReLU arrive folded by pnnx already. Checked on tiny QAT models with the
activation after a conv, after a depthwise conv and after a Linear: no fusable activation layer
is left behind an int8 layer, the convs requantize into the next conv, the float model computes
the same function, parity holds (x86 here; the emulated ARM targets in ``test_chains_arm.py``),
and the int8 model is byte-identical to what the real ncnn2int8 writes from the folded float
model, which chains where ncnn2int8 on pnnx's unfolded model does not.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_ncnnqat import export, prepare_qat
from lightning_ncnnqat.conversion.activation_fold import ACTIVATION_TYPES, FUSING_TYPES, fold_activations
from lightning_ncnnqat.conversion.model_io import FlatModel, model_io
from lightning_ncnnqat.conversion.pnnx import convert_with_pnnx
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.ncnn.fp32_blobs import strip_fp32_blobs
from lightning_ncnnqat.policy import output_failing
from lightning_ncnnqat.qat.prepare import folded_float_model
from lightning_ncnnqat.speed.plan import count_chains

TOOLS = Path(os.environ.get("NCNN_TOOLS") or Path(__file__).resolve().parents[2] / "shared" / "ncnn-tools")
needs_ncnn2int8 = pytest.mark.skipif(
    not (TOOLS / "ncnn2int8").is_file(), reason=f"ncnn's ncnn2int8 is not at {TOOLS} (set NCNN_TOOLS)"
)


def _block(cin: int, cout: int, k: int, act: nn.Module, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act]


class ChainNet(nn.Module):
    """conv -> depthwise -> 1x1 conv (each with BN and an activation), pool, Linear -> act -> Linear:
    c1 and dw can requantize into the next conv (2 of 3 convs); pw feeds the pooling."""

    def __init__(self, act: nn.Module, dw_act: nn.Module, fc_act: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*_block(3, 16, 3, act), *_block(16, 16, 3, dw_act, groups=16), *_block(16, 24, 1, act))
        self.head = nn.Sequential(nn.Linear(24, 16), fc_act, nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


#: name -> (activation after the convs, after the depthwise conv, after the first Linear)
MODELS = {
    "hardswish": (nn.Hardswish(), nn.Hardswish(), nn.Hardswish()),
    "relu6_dw_hardswish": (nn.ReLU6(), nn.Hardswish(), nn.LeakyReLU(0.1)),
    "leaky_dw_relu6": (nn.LeakyReLU(0.1), nn.ReLU6(), nn.Hardswish()),
    "prelu": (nn.PReLU(), nn.PReLU(init=-0.3), nn.PReLU(init=0.1)),  # one slope: pnnx folds it as LeakyReLU
}


def qat_model(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A ChainNet prepared for QAT with its ranges set by a few training forwards, and a held batch."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = ChainNet(*MODELS[name]).train()
    prepare_qat(model, torch.randn(1, 3, 16, 16))
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 3, 16, 16))
    return model.eval(), torch.randn(8, 3, 16, 16)


def separate_fusable(param: NcnnParam) -> list[str]:
    """Activation layers ncnn could fuse that still read a Convolution/InnerProduct's output."""
    out = []
    for lay in param.layers:
        prod = param.producer(lay.bottoms[0]) if len(lay.bottoms) == 1 else None
        if lay.type in ACTIVATION_TYPES and prod is not None and prod.type in FUSING_TYPES:
            out.append(f"{lay.type} {lay.name}")
    return out


def parity_failures(report) -> list[str]:  # noqa: ANN001
    """Targets whose worst output's int8-vs-QAT cosine fails the export's own verdict."""
    bad = []
    for target, entry in report.runtime.items():
        if "error" in entry:
            bad.append(f"{target}: {entry['error']}")
            continue
        cos = entry["int8_vs_qat"]["cosine"]
        floor = entry.get("float32_floor", report.float32_floor)
        if output_failing(cos, floor):
            bad.append(f"{target}: cosine {cos} (floor {floor})")
    return bad


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, tmp_path_factory):
    model, held = qat_model(request.param)
    out = tmp_path_factory.mktemp(f"chains_{request.param}")
    report = export(model, out, held[:1], held, verbose=False, timing_runs=0, layer_check_samples=2, targets=["x86"],
                    check_onnx=False)
    return request.param, model, held, out, report


def test_fused_activations_leave_no_layer_and_convs_chain(exported) -> None:
    name, _, _, out, report = exported
    float_param = NcnnParam.parse((out / "model.ncnn.param").read_text())
    assert separate_fusable(float_param) == [], name
    chains = count_chains((out / "model.int8.param").read_text())
    assert (chains.int8_convs, chains.requantized, chains.breakers) == (3, 2, {}), (name, chains)
    # the InnerProduct applies its activation itself too
    ips = [lay for lay in float_param.layers if lay.type == "InnerProduct"]
    assert [lay.get_int(9, 0) for lay in ips] == [{"hardswish": 6, "relu6_dw_hardswish": 2, "leaky_dw_relu6": 6,
                                                   "prelu": 2}[name], 0]
    if "hardswish" in name:  # pnnx folds the others itself
        assert any("HardSwish" in n for n in report.notes), report.notes


def test_folded_float_model_and_int8_model_keep_parity(exported) -> None:
    name, _, _, _, report = exported
    assert report.ok, (name, report.failures, report.flagged_layers)
    assert report.float_vs_torch.cosine >= 0.9999, (name, report.float_vs_torch)
    assert parity_failures(report) == [], name


@needs_ncnn2int8
def test_int8_is_ncnn2int8s_and_chains_where_the_unfolded_model_does_not(exported, tmp_path: Path) -> None:
    name, model, held, out, _ = exported
    run = [str(TOOLS / "ncnn2int8"), out / "model.ncnn.param", out / "model.ncnn.bin", "r.param", "r.bin", out / "model.ncnn.table"]
    proc = subprocess.run(list(map(str, run)), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "r.param").read_text() == strip_fp32_blobs((out / "model.int8.param").read_text()), name  # + the export's float32-blob featmask (ncnn/fp32_blobs.py)
    assert (tmp_path / "r.bin").read_bytes() == (out / "model.int8.bin").read_bytes(), name
    # pnnx's own conversion of the same folded float model, unfolded: same layer names, same table
    x1 = held[:1]
    folded = folded_float_model(model).eval()
    raw = convert_with_pnnx(FlatModel(folded, model_io(model, x1)), [x1])
    (tmp_path / "raw.param").write_text(raw.param_text)
    (tmp_path / "raw.bin").write_bytes(raw.bin_bytes)
    run[1:5] = [tmp_path / "raw.param", tmp_path / "raw.bin", "u.param", "u.bin"]
    proc = subprocess.run(list(map(str, run)), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    before = count_chains((tmp_path / "u.param").read_text())
    after = count_chains((out / "model.int8.param").read_text())
    # the requantized convs whose output pnnx left to a separate HardSwish
    expected_before = {"hardswish": 0, "relu6_dw_hardswish": 1, "leaky_dw_relu6": 2, "prelu": 2}[name]
    assert (before.requantized, after.requantized) == (expected_before, 2), (name, before, after)
    if expected_before < 2:
        assert before.breakers == {"HardSwish": 2 - expected_before}, before


def test_fold_keeps_outputs_shared_blobs_and_unfusable_activations() -> None:
    """Only an activation that alone reads a fusing layer's output, which is not a model output,
    folds; ELU / HardSigmoid (no ncnn activation_type) and a layer with one already stay."""
    text = "\n".join([
        "7767517", "8 9",
        "Input in0 0 1 in0",
        "Convolution c0 1 1 in0 a 0=4 1=1 6=12",
        "Split s0 1 2 a a0 a1",
        "HardSwish hs0 1 1 a0 b 0=0.166666672 1=0.5",
        "Convolution c1 1 1 a1 c 0=4 1=1 6=16 9=1",
        "ReLU r1 1 1 c d",
        "InnerProduct fc 1 1 b e 0=4 2=16",
        "ELU elu 1 1 e out0 0=1.0",
    ]) + "\n"
    param = NcnnParam.parse(text)
    assert fold_activations(param) == []  # shared output, already fused, unfusable type
    text2 = "\n".join([
        "7767517", "5 5",
        "Input in0 0 1 in0",
        "Convolution c0 1 1 in0 a 0=4 1=1 6=12",
        "Clip clip 1 1 a b 1=6",
        "ConvolutionDepthWise dw 1 1 b out0 0=4 1=3 6=36 7=4",
        "ReLU lrelu 1 1 out0 out1 0=0.1",
    ]) + "\n"
    param = NcnnParam.parse(text2)
    folds = fold_activations(param, keep_blobs=["out0", "out1"])
    assert [(f.activation, f.into, f.activation_type) for f in folds] == [("clip", "c0", 3)]
    c0 = param.layer("c0")
    assert c0.tops == ["b"] and c0.get_int(9, 0) == 3
    assert c0.get_array(10) == [-3.40282347e38, 6.0]  # Clip's default min, its max as a float
    assert [lay.name for lay in param.layers] == ["in0", "c0", "dw", "lrelu"]  # out0 is an output: kept
    param = NcnnParam.parse(text2)
    folds = fold_activations(param, keep_blobs=["out1"])
    assert [(f.into, f.activation_type) for f in folds] == [("c0", 3), ("dw", 2)]
    assert param.layer("dw").get_array(10) == pytest.approx([0.1]) and param.layer("dw").tops == ["out1"]
    NcnnParam.parse(param.to_text())  # still a valid .param (blob count rewritten)
