"""Checkpoints across the QAT boundary, both ways, through every Trainer entry point with ckpt_path."""

from __future__ import annotations

import glob

import lightning.pytorch as L
import pytest
import torch

from lightning_ncnnqat import QATCallback, restore_from_checkpoint
from lightning_ncnnqat.qat.plan import get_plan
from lightning_ncnnqat.qat.prepared import input_quantizers
from lit_models import loader, make_data, make_module


def _trainer(root, **kw) -> L.Trainer:  # noqa: ANN001
    args = dict(max_epochs=2, enable_progress_bar=False, enable_model_summary=False, logger=False,
                enable_checkpointing=False, default_root_dir=str(root), num_sanity_val_steps=0)
    args.update(kw)
    return L.Trainer(**args)


def _callback() -> QATCallback:
    return QATCallback(start_epoch=1, export_dir=None, log_every_n_steps=0, verbose=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):  # noqa: ANN001, ANN201
    """A 2-epoch fit with QAT from epoch 1: a float checkpoint (epoch 0) and a QAT one (epoch 1)."""
    root = tmp_path_factory.mktemp("qat_boundary")
    torch.manual_seed(0)
    model = make_module(L.LightningModule)
    ckpt = L.callbacks.ModelCheckpoint(dirpath=str(root / "ckpt"), save_top_k=-1, every_n_epochs=1)
    _trainer(root, callbacks=[_callback(), ckpt], enable_checkpointing=True).fit(model, loader(make_data()))
    (float_ckpt,) = glob.glob(str(root / "ckpt" / "epoch=0*.ckpt"))
    (qat_ckpt,) = glob.glob(str(root / "ckpt" / "epoch=1*.ckpt"))
    assert "ncnnqat" not in torch.load(float_ckpt, weights_only=False)
    assert "ncnnqat" in torch.load(qat_ckpt, weights_only=False)
    return root, float_ckpt, qat_ckpt


def _prepared_model(qat_ckpt: str) -> L.LightningModule:
    m = make_module(L.LightningModule)
    restore_from_checkpoint(m, torch.load(qat_ckpt, weights_only=False))
    return m


def _call(entry: str, trainer: L.Trainer, model: L.LightningModule, ckpt: str) -> None:
    data = loader(make_data(32, seed=1))
    if entry == "fit":
        trainer.fit(model, data, ckpt_path=ckpt)
    elif entry == "validate":
        trainer.validate(model, data, ckpt_path=ckpt, verbose=False)
    elif entry == "test":
        trainer.test(model, data, ckpt_path=ckpt, verbose=False)
    else:
        trainer.predict(model, data, ckpt_path=ckpt)


ENTRIES = ["fit", "validate", "test", "predict"]


@pytest.mark.parametrize("entry", ENTRIES)
def test_float_checkpoint_into_qat_prepared_model(run, entry: str) -> None:  # noqa: ANN001
    root, float_ckpt, qat_ckpt = run
    model = _prepared_model(qat_ckpt)
    assert get_plan(model) is not None
    cb = _callback()
    _call(entry, _trainer(root / entry, callbacks=[cb]), model, float_ckpt)
    stored = torch.load(float_ckpt, weights_only=False)["state_dict"]
    if entry == "fit":  # resumed at epoch 1 = start_epoch: QAT starts again on the float weights
        assert cb.active and get_plan(model) is not None
        assert all(q.running_absmax.item() > 0 for q in input_quantizers(model).values())
        return
    assert get_plan(model) is None and not cb.active  # back to float, the checkpoint's weights
    state = model.state_dict()
    assert list(state) == list(stored)
    assert all(torch.equal(state[k], stored[k]) for k in stored)


@pytest.mark.parametrize("entry", ENTRIES)
def test_qat_checkpoint_into_float_model(run, entry: str) -> None:  # noqa: ANN001
    root, float_ckpt, qat_ckpt = run
    model = make_module(L.LightningModule)
    cb = _callback()
    _call(entry, _trainer(root / ("q" + entry), callbacks=[cb], max_epochs=3), model, qat_ckpt)
    assert get_plan(model) is not None and cb.active
    if entry == "fit":
        return
    stored = torch.load(qat_ckpt, weights_only=False)["state_dict"]
    state = model.state_dict()
    assert set(state) == set(stored)
    assert all(torch.equal(state[k], stored[k]) for k in stored)
    # the restored model computes what the QAT model of the checkpoint computes
    ref = _prepared_model(qat_ckpt).eval()
    x = make_data(8, seed=2).tensors[0]
    assert torch.equal(model.eval()(x), ref(x))
