"""One ExportConfig, three ways in: QATCallback(export=...), export(config=...) and the export
command's flags give the same export (real fit, real ncnn on x86)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import pytest
import torch

from lightning_ncnnqat import ExportConfig, QATCallback, export
from lightning_ncnnqat.__main__ import main
from lit_models import LitMixed, loader, make_data

# settings the callback of release 0.1 could not pass (timing, ONNX check, per-layer samples)
CFG = ExportConfig(targets=["x86"], float_weights="fp16", timing_runs=0, check_onnx=False, layer_check_samples=1,
                   held_batch_size=8)
FLAGS = ["--targets", "x86", "--float-weights", "fp16", "--timing-runs", "0", "--no-check-onnx",
         "--layer-check-samples", "1", "--held-batch-size", "8"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[L.LightningModule, QATCallback, Path]:  # noqa: ANN001
    tmp = tmp_path_factory.mktemp("cfg_e2e")
    torch.manual_seed(0)
    module = LitMixed()
    cb = QATCallback(start_epoch=1, export=CFG.replace(dir=str(tmp / "callback")), verbose=False)
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp, limit_train_batches=3,
        callbacks=[cb],
    )
    trainer.fit(module, loader(make_data(48, 16, seed=0)), loader(make_data(24, 16, seed=2)))
    trainer.save_checkpoint(tmp / "qat.ckpt")
    return module, cb, tmp


def _report(d: Path) -> dict:
    return json.loads((d / "report.json").read_text())


def test_callback_export_and_command_share_the_config(fitted) -> None:  # noqa: ANN001
    module, cb, tmp = fitted
    held = make_data(24, 16, seed=2).tensors[0][:8]
    export(module, config=CFG.replace(dir=str(tmp / "api")), example_input=module.example_input_array,
           held_batch=held, verbose=False)
    np.save(tmp / "held.npy", held.numpy())
    rc = main(["export", str(tmp / "qat.ckpt"), "--model", "lit_models:LitMixed", "--export-dir", str(tmp / "cli"),
               "--held-batch", str(tmp / "held.npy"), "--quiet", *FLAGS])
    assert rc == 0
    dirs = [tmp / "callback", tmp / "api", tmp / "cli"]
    assert cb.export_report is not None and Path(cb.export_report.export_dir) == dirs[0]
    for d in dirs:
        rep = _report(d)
        assert rep["float_weights"] == "fp16", d  # not the default fp32
        assert rep["timing"] == {}, d  # timing_runs=0: nothing timed
        assert "checked_with" not in rep["onnx"], d  # check_onnx=False: onnxruntime not run
        assert rep["held_batch"]["n"] == 8, d
        assert set(rep["runtime"]) == {"x86"}, d
        assert rep["int8_vs_qat"]["cosine"] > 0.99, d
    bins = {(d / "model.int8.bin").read_bytes() for d in dirs}
    assert len(bins) == 1  # the same int8 model from the same settings, whichever way they came in


def test_keywords_of_export_override_the_config(fitted, tmp_path: Path) -> None:  # noqa: ANN001
    """``export(config=CFG, float_weights="fp32")``: the keyword wins over the object's field; the
    float layers' weights are then stored as float32 (a larger .bin where a layer stayed float)."""
    module, _, tmp = fitted
    held = make_data(24, 16, seed=2).tensors[0][:8]
    rep = export(module, config=CFG, export_dir=tmp_path / "fp32", float_weights="fp32",
                 example_input=module.example_input_array, held_batch=held, verbose=False)
    assert rep.float_weights == "fp32" and _report(tmp_path / "fp32")["float_weights"] == "fp32"
    fp16 = _report(tmp / "callback")
    if fp16["float_layers"]:
        assert (tmp_path / "fp32" / "model.int8.bin").stat().st_size > (tmp / "callback" / "model.int8.bin").stat().st_size
