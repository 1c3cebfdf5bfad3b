"""End-to-end export tests: a QAT-trained model -> ONNX + tables + float32/int8 ncnn + report.

Real training (short), real onnx/onnxsim/pnnx/ncnn; the int8 model runs in ncnn with its
DEFAULT options and is compared with the PyTorch QAT model in eval mode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as L
import ncnn
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat import QATCallback, QATConfig, prepare_qat
from lightning_ncnnqat.export import ExportError, export
from lightning_ncnnqat.files import OUTPUT_NAMES
from lightning_ncnnqat.ncnn.param import NcnnParam, bin_layout
from lightning_ncnnqat.ncnn.runtime import NcnnNet
from lightning_ncnnqat.conversion.onnx import onnx2ncnn_name
from lightning_ncnnqat.ncnn.table import parse_table
from lightning_ncnnqat.qat.prepared import quantized_layers
from lit_models import LitMixed, loader, make_data
from models import MixedNet

ROOT = Path(__file__).resolve().parents[1]


def train(model: nn.Module, data, epochs_float: int, epochs_qat: int, config: QATConfig | None = None) -> nn.Module:
    """Float epochs, then QAT epochs (prepare_qat, no Trainer): real ranges and weights."""
    torch.manual_seed(0)
    x, y = data.tensors

    def run(epochs: int, lr: float) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        model.train()
        for _ in range(epochs):
            for i in range(0, len(x), 32):
                loss = F.cross_entropy(model(x[i : i + 32]), y[i : i + 32])
                opt.zero_grad()
                loss.backward()
                opt.step()

    run(epochs_float, 0.05)
    prepare_qat(model, x[:2], config)
    run(epochs_qat, 0.02)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = train(MixedNet(), make_data(256, 16, seed=0), 2, 2, QATConfig(quantize_grouped_convs=False))
    held = make_data(200, 16, seed=1).tensors[0]
    out = tmp_path_factory.mktemp("export")
    report = export(model, out, held[:1], held, verbose=False, targets="x86")
    return model, report, out, held


# ------------------------------------------------------------------------------ files and tables


def test_every_file_is_written_and_parses(exported) -> None:
    model, report, out, _ = exported
    assert sorted(os.listdir(out)) == sorted(OUTPUT_NAMES)  # and no temporaries
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
    for stem in ("model.ncnn", "model.int8"):
        param = NcnnParam.parse((out / f"{stem}.param").read_text())
        bin_layout(param, (out / f"{stem}.bin").read_bytes())  # the walk consumes the file exactly
        net = ncnn.Net()
        assert net.load_param(str(out / f"{stem}.param")) == 0
        assert net.load_model(str(out / f"{stem}.bin")) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["ok"] is True and data["failures"] == []
    assert report.ok


@pytest.mark.parametrize("table, graph", [("model.ncnn.table", "ncnn"), ("model.table", "onnx")])
def test_tables_have_both_rows_for_exactly_the_quantized_layers(exported, table: str, graph: str) -> None:
    model, report, out, _ = exported
    text = (out / table).read_text()
    assert "\n\n" not in text and text.strip() == text.rstrip("\n") and text.endswith("\n")
    assert "nan" not in text.lower() and "inf" not in text.lower()
    weights, inputs = parse_table(text)
    if graph == "ncnn":
        names_in_graph = {lay.name: lay for lay in NcnnParam.parse((out / "model.ncnn.param").read_text()).layers}
        want = {r.torch_name: r.ncnn_name for r in report.layers}
    else:
        names_in_graph = {onnx2ncnn_name(n): n for n in onnx.load(str(out / "model.onnx")).graph.node}
        want = {r.torch_name: r.onnx_name for r in report.layers}
    infos = {i.name: i for i in quantized_layers(model)}
    assert set(want) == set(infos)  # every quantized layer reported under this graph's name
    assert set(weights) == set(inputs) == set(want.values())  # both rows, no extra rows
    for torch_name, name in want.items():
        assert name in names_in_graph, name
        i = infos[torch_name]
        assert np.array_equal(np.float32(weights[name]), i.weight_scales.numpy())
        assert np.float32(inputs[name]) == np.float32(i.input_scale)
        assert len(weights[name]) == i.num_groups
    # the grouped conv stays in float: no row of any kind
    assert [n for n, _ in report_float(report)] == ["grouped"]
    if graph == "onnx":
        assert "/grouped/Conv" in names_in_graph and "/grouped/Conv" not in inputs
    else:
        grouped = [lay.name for lay in names_in_graph.values() if lay.type == "ConvolutionDepthWise" and lay.get_int(7, 1) == 4]
        assert len(grouped) == 1 and grouped[0] not in inputs and grouped[0] not in weights


def report_float(report) -> list[tuple[str, str]]:
    return [(f["name"], f["reason"]) for f in report.float_layers]


# ---------------------------------------------------------------------------------- int8 model


def test_int8_model_matches_the_qat_model_under_default_options(exported) -> None:
    model, report, out, held = exported
    with torch.no_grad():
        want = model(held).numpy()
    net = NcnnNet(out / "model.int8.param", out / "model.int8.bin")  # ncnn defaults (packing on)
    assert net.net.opt.use_packing_layout and net.net.opt.use_int8_inference
    got = net.run_batch(held.numpy())
    top1 = float((want.argmax(1) == got.argmax(1)).mean())
    cos = float((want * got).sum() / np.linalg.norm(want) / np.linalg.norm(got))
    assert top1 >= 0.995 and cos >= 0.9999, (top1, cos)
    # the report measured the same thing
    assert report.int8_vs_qat.n == len(held)
    assert report.int8_vs_qat.top1_agreement >= 0.995 and report.int8_vs_qat.cosine >= 0.9999
    assert report.float_vs_torch.cosine >= 0.99999
    assert all(c.ok for c in report.layer_checks) and report.flagged_layers == []
    assert {c.torch_name for c in report.layer_checks} == {r.torch_name for r in report.layers}


def test_int8_bin_is_int8_and_3x_smaller(exported) -> None:
    _, report, out, _ = exported
    f32, i8 = (out / "model.ncnn.bin").stat().st_size, (out / "model.int8.bin").stat().st_size
    assert f32 >= 3 * i8, (f32, i8)
    param = NcnnParam.parse((out / "model.int8.param").read_text())
    layout = bin_layout(param, (out / "model.int8.bin").read_bytes())
    for r in report.layers:
        lay = param.layer(r.ncnn_name)
        assert lay.get_int(8, 0) == r.int8_scale_term
        assert r.int8_scale_term % 100 == (1 if r.kind == "ConvolutionDepthWise" else 2)
        assert layout[r.ncnn_name][0].tag == 0x000D4B38
        # requantize fused exactly where ncnn2int8 fuses it: into a quantized conv consumer
        if r.requantize_to is not None:
            consumer = next(x for x in report.layers if x.ncnn_name == r.requantize_to)
            assert r.output_scale == consumer.input_scale and r.int8_scale_term > 100


def test_report_json_has_the_promised_fields(exported) -> None:
    _, report, out, _ = exported
    data = json.loads((out / "report.json").read_text())
    for layer in data["layers"]:
        for key in ("torch_name", "onnx_name", "ncnn_name", "kind", "weight_bits", "input_scale", "num_weight_scales"):
            assert layer[key] not in (None, ""), (layer, key)
    assert {x["torch_name"]: x["weight_bits"] for x in data["layers"]}["branch_a"] == 6
    for key in ("top1_agreement", "cosine", "max_abs_err", "max_rel_err"):
        assert isinstance(data["int8_vs_qat"][key], float)
        assert isinstance(data["float_vs_torch"][key], float)
    assert data["held_batch"] == {"source": "held batch", "n": 200}
    t = data["timing"]
    assert t["float32_ms"] > 0 and t["int8_ms"] > 0 and t["speedup"] > 0
    assert data["sizes"]["ratio"] >= 3
    assert "ncnn int8 vs PyTorch QAT" in report.summary()


# ------------------------------------------------------------------- Lightning + checkpoint CLI


def test_callback_export_and_checkpoint_reexport_are_byte_identical(tmp_path: Path) -> None:
    """Trainer + QATCallback export at the end of fit; a re-export from the checkpoint through the
    CLI (keys prefixed with 'module.' as DataParallel/DDP write them) gives identical tables."""
    torch.manual_seed(0)
    model = LitMixed()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    cb = QATCallback(start_epoch=1, export_dir=str(tmp_path / "cb_export"), verbose=False)
    trainer.callbacks.append(cb)
    trainer.fit(model, loader(make_data(96, 16, seed=0)), loader(make_data(32, 16, seed=2)))
    assert cb.export_report is not None and cb.export_report.int8_vs_qat is not None
    ckpt_path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt_path)
    ckpt = torch.load(ckpt_path, weights_only=False)
    ckpt["state_dict"] = {"module." + k: v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, ckpt_path)
    held = tmp_path / "held.pt"
    torch.save(make_data(32, 16, seed=2).tensors[0], held)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_ncnnqat", "export", str(ckpt_path), "--model", "lit_models:LitMixed",
         "--export-dir", str(tmp_path / "re"), "--input-shape", "1,3,16,16", "--held-batch", str(held)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ncnn int8 vs PyTorch QAT" in proc.stdout
    for name in ("model.table", "model.ncnn.table", "model.int8.param", "model.int8.bin"):
        assert (tmp_path / "re" / name).read_bytes() == (tmp_path / "cb_export" / name).read_bytes(), name


def test_lightning_module_without_trainer_uses_example_input_array(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = train(LitMixed(), make_data(64, 16, seed=0), 0, 1)
    with pytest.raises(RuntimeError, match="not attached"):
        model.trainer  # noqa: B018  (the property raises: tracing must not touch it)
    report = export(model, tmp_path, verbose=False)  # example_input_array, no held batch
    assert "example input" in report.held_batch["source"] and report.held_batch["n"] == 2
    assert report.int8_vs_qat.cosine >= 0.9999


def test_missing_example_input_names_both_sources(tmp_path: Path) -> None:
    model = train(MixedNet(), make_data(32, 16, seed=0), 0, 1)
    with pytest.raises(ValueError, match="example_input.*example_input_array"):
        export(model, tmp_path / "x", verbose=False)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------- forced failures


def test_uninitialised_ranges_are_set_from_the_held_batch_on_a_copy(tmp_path: Path) -> None:
    model = MixedNet()
    prepare_qat(model, torch.randn(2, 3, 16, 16))  # no training step: ranges are still -1
    held = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    report = export(model, tmp_path, held[:1], held, verbose=False, timing_runs=0)
    assert report.ok, report.summary()
    missing = [w for w in report.warnings if "no training step set the input range" in w]
    assert len(missing) == 1 and "stem.0" in missing[0] and "fc" in missing[0]
    # the user's model is untouched; the exported scale is the held batch's absmax
    assert float(model.stem[0].input_quantizer.running_absmax) == -1.0
    want = 127.0 / float(held.abs().max())
    assert np.isclose(report.layers[0].input_scale, want, rtol=1e-6)
    assert report.int8_vs_qat.cosine > 0.999


def test_nan_range_fails_validation_naming_the_layer_and_still_writes_the_report(tmp_path: Path) -> None:
    model = train(MixedNet(), make_data(32, 16, seed=0), 0, 1)
    model.down.input_quantizer.running_absmax.fill_(float("nan"))
    with pytest.raises(ExportError) as info:
        export(model, tmp_path, torch.randn(1, 3, 16, 16), verbose=False)
    assert info.value.step == "validate" and info.value.layer == "down" and "nan" in str(info.value)
    assert os.listdir(tmp_path) == ["report.json"]  # nothing else: no model from a diverged run
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["ok"] is False and rep["failures"][0]["step"] == "validate" and rep["failures"][0]["layer"] == "down"
    assert rep["files"] == {}


class TopkNet(nn.Module):
    """torch.topk exports to ONNX but pnnx leaves it as an op ncnn does not have."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = torch.topk(F.relu(self.conv(x)), 2, dim=1)[0]
        return self.fc(v.mean(dim=(2, 3)))


def test_unconvertible_op_fails_pnnx_step_and_keeps_only_finished_files(tmp_path: Path) -> None:
    model = train(TopkNet(), make_data(32, 16, seed=0), 0, 1)
    (tmp_path / "model.int8.bin").write_bytes(b"stale from an earlier export")
    with pytest.raises(ExportError) as info:
        export(model, tmp_path, torch.randn(1, 3, 16, 16), verbose=False)
    e = info.value
    assert e.step == "pnnx" and e.layer.startswith("torch.topk_") and "could not convert op 'torch.topk'" in str(e)
    assert e.written == ["model.onnx", "model.table", "report.json"]
    # ONNX branch landed, nothing partial, and the report says so
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.table", "report.json"]
    rep = json.loads((tmp_path / "report.json").read_text())
    assert sorted(rep["files"]) == ["model.onnx", "model.table"] and rep["failures"][0]["step"] == "pnnx"
    onnx.checker.check_model(onnx.load(str(tmp_path / "model.onnx")))


class GroupedTail(nn.Module):
    """A grouped conv whose int8 output is dequantized to float (no requantize fusion)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 1)
        self.g = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.g(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_grouped_conv_in_int8_is_named_when_the_runtime_gets_it_wrong(tmp_path: Path) -> None:
    model = train(GroupedTail(), make_data(64, 16, seed=0), 1, 1, QATConfig(quantize_grouped_convs=True))
    held = make_data(16, 16, seed=1).tensors[0]
    report = export(model, tmp_path, held[:1], held, verbose=False)
    x = held[0].numpy()
    packed = NcnnNet(tmp_path / "model.int8.param", tmp_path / "model.int8.bin", num_threads=1).run(x)
    plain = NcnnNet(tmp_path / "model.int8.param", tmp_path / "model.int8.bin", num_threads=1, use_packing_layout=False).run(x)
    cos = float(np.dot(packed, plain) / (np.linalg.norm(packed) * np.linalg.norm(plain) + 1e-30))
    if np.isfinite(packed).all() and cos > 0.999:
        pytest.skip("this ncnn build computes grouped int8 convs correctly with packing on")
    assert report.flagged_layers == ["g"]
    check = next(c for c in report.layer_checks if c.torch_name == "g")
    assert check.ok_without_packing is True
    assert any("'g'" in w and "use_packing_layout = False" in w for w in report.warnings)
    assert not report.ok


class Spaced(nn.Module):
    """A module name with a space: fine for torch and pnnx, impossible as an ncnn table key."""

    def __init__(self) -> None:
        super().__init__()
        self.add_module("my conv", nn.Conv2d(3, 8, 3, padding=1))
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(F.relu(getattr(self, "my conv")(x)), 1).flatten(1))


def test_unrepresentable_onnx_name_fails_its_step_while_the_ncnn_branch_lands(tmp_path: Path) -> None:
    model = train(Spaced(), make_data(32, 16, seed=0), 0, 1)
    with pytest.raises(ExportError, match="whitespace") as info:
        export(model, tmp_path, torch.randn(1, 3, 16, 16), verbose=False)
    assert info.value.step == "onnx_table" and info.value.layer == "my conv"
    assert "model.table" not in os.listdir(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(n for n in OUTPUT_NAMES if n != "model.table")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is False and report["failures"][0]["step"] == "onnx_table"
    assert report["int8_vs_qat"]["cosine"] >= 0.9999
