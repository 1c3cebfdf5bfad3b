"""Export of real-world model signatures and graphs: several inputs, several outputs, frozen
non-tensor arguments, models that normalise their own input, converter-inserted layers,
in-place ops after a quantized layer, ceil-mode pooling, and a crashing runtime.

Every case runs the real chain (onnx, onnxsim, onnxruntime, pnnx, ncnn in a child process).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat import prepare_qat
from lightning_ncnnqat.export import ExportError, export
from lightning_ncnnqat.ncnn import isolated as isolated_runtime
from lightning_ncnnqat.ncnn.param import NcnnParam

FAST = {"verbose": False, "timing_runs": 0, "targets": "x86", "layer_check_samples": 2}


def qat(model: nn.Module, example, batches) -> nn.Module:  # noqa: ANN001
    """prepare_qat, then a few training-mode forwards (real ranges), then eval."""
    torch.manual_seed(0)
    prepare_qat(model, example)
    model.train()
    with torch.no_grad():
        for b in batches:
            model(*b) if isinstance(b, tuple) else model(**b) if isinstance(b, dict) else model(b)
    return model.eval()


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class TwoIn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, img: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        f = torch.cat([F.relu(self.a(img)), F.relu(self.b(aux))], 1)
        return self.fc(F.adaptive_avg_pool2d(f, 1).flatten(1))


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_two_inputs_are_traced_converted_and_fed(tmp_path: Path, form: str) -> None:
    img, aux = rand(16, 3, 12, 12, seed=1), rand(16, 1, 12, 12, seed=2) * 3
    ex = (img[:1], aux[:1]) if form == "tuple" else {"img": img[:1], "aux": aux[:1]}
    batches = [(img, aux)] if form == "tuple" else [{"img": img, "aux": aux}]
    model = qat(TwoIn(), ex, batches)
    held = (img, aux) if form == "tuple" else {"img": img, "aux": aux}
    rep = export(model, tmp_path, ex, held, **FAST)
    assert rep.ok, rep.summary()
    assert [i["blob"] for i in rep.io["inputs"]] == ["in0", "in1"]
    assert [i["shape"] for i in rep.io["inputs"]] == [[3, 12, 12], [1, 12, 12]]
    assert [i.name for i in onnx.load(str(tmp_path / "model.onnx")).graph.input] == ["in0", "in1"]
    inputs = [lay.tops[0] for lay in NcnnParam.parse((tmp_path / "model.int8.param").read_text()).layers if lay.type == "Input"]
    assert inputs == ["in0", "in1"]
    # both inputs really reach ncnn: the int8 model follows the QAT model sample by sample
    assert rep.held_batch["n"] == 16
    assert rep.int8_vs_qat.cosine > 0.999 and rep.int8_vs_qat.min_sample_cosine > 0.99
    assert rep.float_vs_torch_fp32_storage.max_abs_err < 1e-4


class MultiOut(nn.Module):
    """Eval output: a dict holding a tuple and a tensor (train output: one tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 16, 3, 2, 1)
        self.cls = nn.Linear(16, 10)
        self.box = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor):  # noqa: ANN201
        f = F.adaptive_avg_pool2d(F.relu(self.body(x)), 1).flatten(1)
        logits, boxes = self.cls(f), self.box(f)
        if self.training:
            return logits + boxes.sum(1, keepdim=True)
        return {"scores": (logits.softmax(1), logits), "boxes": boxes}


def test_every_output_of_a_nested_output_is_exported_and_compared(tmp_path: Path) -> None:
    x = rand(16, 3, 16, 16, seed=3)
    model = qat(MultiOut(), x[:1], [x])
    rep = export(model, tmp_path, x[:1], x, **FAST)
    assert rep.ok, rep.summary()
    assert [(o.blob, o.torch) for o in rep.outputs] == [
        ("out0", "['scores'][0]"), ("out1", "['scores'][1]"), ("out2", "['boxes']"),
    ]
    assert [o.name for o in onnx.load(str(tmp_path / "model.onnx")).graph.output] == ["out0", "out1", "out2"]
    with torch.no_grad():
        want = model(x)
    for o, ref in zip(rep.outputs, (want["scores"][0], want["scores"][1], want["boxes"])):
        assert o.int8_vs_qat.n == 16 and o.int8_vs_qat.cosine > 0.999, o
    assert rep.outputs[0].int8_vs_qat.top1_agreement is not None
    # the headline figures are those of the worst output
    assert rep.int8_vs_qat.cosine == min(o.int8_vs_qat.cosine for o in rep.outputs)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [o["blob"] for o in saved["outputs"]] == ["out0", "out1", "out2"]
    assert saved["io"]["outputs"][2] == {"blob": "out2", "torch": "['boxes']", "shape": [4]}


class Tempered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor, temperature: float = 2.0, log: bool = False) -> torch.Tensor:
        y = self.fc(F.adaptive_avg_pool2d(F.relu(self.c(x)), 1).flatten(1)) / temperature
        return y.log_softmax(1) if log else y


def test_non_tensor_forward_arguments_are_frozen(tmp_path: Path) -> None:
    x = rand(8, 3, 16, 16, seed=4)
    model = qat(Tempered(), x[:1], [x])
    rep = export(model, tmp_path, x[:1], x, **FAST)
    assert rep.ok, rep.summary()
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["in0"]  # the float default is a constant, not an input
    assert rep.onnx["max_abs_err_vs_torch_float"] < 1e-4
    # a non-default value given in the example is frozen too
    model2 = qat(Tempered(), (x[:1], 0.5, True), [(x, 0.5, True)])
    rep2 = export(model2, tmp_path / "b", (x[:1], 0.5, True), (x, 0.5, True), **FAST)
    assert rep2.ok and rep2.int8_vs_qat.cosine > 0.999
    with torch.no_grad():
        assert bool((model2(x, 0.5, True) <= 0).all())  # log-probabilities: the flag was honoured


class SelfNormalising(nn.Module):
    """Takes raw 0..255 pixels: pnnx puts an in-place scalar BinaryOp / BatchNorm first."""

    def __init__(self, bn_input: bool) -> None:
        super().__init__()
        self.bn_input = bn_input
        self.norm = nn.BatchNorm2d(3)
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x) if self.bn_input else x / 255.0
        return self.fc(F.relu(self.c(x)).mean((2, 3)))


@pytest.mark.parametrize("bn_input", [False, True])
def test_models_that_normalise_their_own_input_export_and_match(tmp_path: Path, bn_input: bool) -> None:
    x = torch.rand(16, 3, 12, 12, generator=torch.Generator().manual_seed(5)) * 255
    m = SelfNormalising(bn_input)
    if bn_input:
        m.norm.running_mean.fill_(127.0)
        m.norm.running_var.fill_(70.0**2)
    model = qat(m, x[:1], [x])
    rep = export(model, tmp_path, x[:1], x, **FAST)
    assert rep.ok, rep.summary()
    # an input Mat that borrowed numpy memory gave garbage (outputs in the millions) or SIGSEGV
    assert rep.int8_vs_qat.cosine > 0.999 and rep.int8_vs_qat.max_rel_err < 0.05


def test_a_crash_inside_the_runtime_fails_the_parity_step_and_keeps_the_caller(tmp_path: Path, monkeypatch) -> None:
    x = rand(8, 3, 12, 12, seed=6)
    model = qat(Tempered(), x[:1], [x])
    crasher = tmp_path / "crash.py"
    crasher.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    monkeypatch.setattr(isolated_runtime, "WORKER", crasher)  # a real SIGSEGV in the child process
    out = tmp_path / "out"
    with pytest.raises(ExportError) as info:
        export(model, out, x[:1], x, **FAST)
    assert info.value.step == "parity" and "SIGSEGV" in str(info.value)
    rep = json.loads((out / "report.json").read_text())
    assert rep["ok"] is False and rep["failures"][0]["step"] == "parity" and "SIGSEGV" in rep["failures"][0]["message"]
    # what is on disk is what the report lists: the model files are complete and usable
    assert set(rep["files"]) == {p.name for p in out.iterdir()} - {"report.json"}
    assert {"model.int8.param", "model.int8.bin", "model.onnx"} <= set(rep["files"])
    assert signal.SIGSEGV  # the test process itself is alive to assert this


class Reflect(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 16, 3, 1, 1, padding_mode="reflect")
        self.d = nn.Conv2d(16, 16, 3, 1, 2, dilation=2, padding_mode="replicate")
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.d(F.relu(self.c(x)))), 1).flatten(1))


def test_layer_checks_follow_padding_layers_the_converter_inserts(tmp_path: Path) -> None:
    x = rand(8, 3, 16, 16, seed=7)
    model = qat(Reflect(), x[:1], [x])
    rep = export(model, tmp_path, x[:1], x, **FAST)
    assert rep.ok, rep.summary()
    param = NcnnParam.parse((tmp_path / "model.int8.param").read_text())
    assert sum(lay.type == "Padding" for lay in param.layers) == 2  # pnnx moved the padding out
    checks = {c.torch_name: c for c in rep.layer_checks}
    for name in ("c", "d"):
        assert checks[name].ok and checks[name].isolated_cosine > 0.9999 and checks[name].chain_cosine > 0.999


class InplaceResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        out = self.conv(x)
        out += x  # torchvision's BasicBlock does this
        return self.head(torch.relu_(out).mean((2, 3)))


def test_chain_figures_are_right_after_in_place_ops(tmp_path: Path) -> None:
    x = rand(8, 3, 16, 16, seed=8)
    model = qat(InplaceResidual(), x[:1], [x])
    rep = export(model, tmp_path, x[:1], x, **FAST)
    c = {c.torch_name: c for c in rep.layer_checks}["conv"]
    assert c.ok and c.chain_cosine > 0.999, c  # was ~0.7: the hook kept a tensor the add then changed


class CeilPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(F.relu(self.c(x))).flatten(1))


def test_ceil_mode_pooling_keeps_model_onnx_and_is_judged_by_onnxruntime(tmp_path: Path) -> None:
    x = rand(8, 3, 16, 16, seed=9)  # 16 -> ceil((16 - 3) / 2) + 1 = 8: the ceil matters
    model = qat(CeilPool(), x[:1], [x])
    rep = export(model, tmp_path, x[:1], x, **FAST)
    assert rep.ok, rep.summary()
    assert rep.onnx["checked_with"].startswith("onnxruntime")
    assert rep.onnx["max_abs_err_vs_torch_float"] < 1e-4
    assert not [w for w in rep.warnings if "model.onnx" in w]
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "model.table").is_file()


class ScaledInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.c1(x * 0.5)))  # onnxsim folds the 0.5 into c1's weights


def test_a_constant_input_scale_folded_into_weights_by_onnxsim_gets_rescaled_table_rows(tmp_path: Path) -> None:
    from lightning_ncnnqat.ncnn.table import parse_table

    x = rand(8, 3, 12, 12, seed=10)
    model = qat(ScaledInput(), x[:1], [x])
    rep = export(model, tmp_path, x[:1], x, **FAST)
    assert rep.ok, rep.summary()
    assert any("folded a constant input scale" in n and "'c1'" in n for n in rep.notes)
    weights, inputs = parse_table((tmp_path / "model.table").read_text())
    by = {r.torch_name: r for r in rep.layers}
    c1 = by["c1"]
    # the ONNX conv reads x and holds 0.5 * w: rows rescaled so the integers are the QAT forward's
    assert np.isclose(inputs[c1.onnx_name], c1.input_scale * 0.5, rtol=1e-6)
    w = model.c1.folded_weight_bias()[0].detach().reshape(8, -1).abs().amax(1)
    assert np.allclose(weights[c1.onnx_name], (31.0 / w * 2.0).numpy(), rtol=1e-5)
    assert np.isclose(inputs[by["c2"].onnx_name], by["c2"].input_scale, rtol=1e-7)  # untouched
