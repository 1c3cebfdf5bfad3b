"""QATCallback inside real Lightning runs on CPU."""

from __future__ import annotations

import copy
import glob
import os

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F

from lightning_ncnnqat import QATCallback, restore_from_checkpoint
from lightning_ncnnqat.qat.modules import QATConv2d
from lightning_ncnnqat.ops import reference
from lightning_ncnnqat.qat.plan import get_plan
from lightning_ncnnqat.qat.prepared import input_quantizers
from lightning_ncnnqat.start import prepare_qat
from lit_models import loader, make_data, make_module


def _trainer(tmp_path, **kw) -> L.Trainer:  # noqa: ANN001
    args = dict(
        max_epochs=3,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        deterministic=True,
    )
    args.update(kw)
    return L.Trainer(**args)


def _ranges(module) -> dict[str, float]:  # noqa: ANN001
    return {n: q.running_absmax.item() for n, q in input_quantizers(module).items()}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"start_epoch": -1}, r"`start_epoch` must be an int >= 0, got -1"),
        ({"start_epoch": 1.5}, r"`start_epoch` must be an int >= 0, got 1.5"),
        ({"momentum": 0.0}, r"`momentum` must be a float in \(0, 1\], got 0.0"),
        ({"momentum": 2}, r"`momentum` must be a float in \(0, 1\], got 2"),
        ({"six_bit_3x3": "yes"}, r"`six_bit_3x3` must be a bool, got 'yes'"),
        ({"skip": [""]}, r"`skip` must be a list of non-empty"),
        ({"held_batch_size": 0}, r"`held_batch_size` must be an int >= 1, got 0"),
        ({"export_dir": 3}, r"`export_dir` must be a path or None, got 3"),
        ({"example_input": [1, 2]}, r"`example_input` holds no Tensor"),
        ({"example_input": 3}, r"`example_input`: an example input must be a Tensor, a tuple/list .* got int"),
        ({"preflight": 1}, r"`preflight` must be a bool, got 1"),
    ],
)
def test_constructor_validation(kwargs, match) -> None:  # noqa: ANN001
    with pytest.raises((ValueError, TypeError), match=match):
        QATCallback(**kwargs)


def test_start_epoch_past_max_epochs(tmp_path) -> None:  # noqa: ANN001
    ds = make_data()
    with pytest.raises(ValueError, match=r"`start_epoch`=3 is not before the Trainer's `max_epochs`=3"):
        cb = QATCallback(start_epoch=3, export_dir=None)
        _trainer(tmp_path, callbacks=[cb]).fit(make_module(L.LightningModule), loader(ds))


def test_qat_starts_at_epoch_and_eval_loops_freeze_ranges(tmp_path) -> None:  # noqa: ANN001
    ds = make_data()
    seen: dict[int, bool] = {}

    class Spy(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
            seen[trainer.current_epoch] = get_plan(pl_module) is not None

        def on_validation_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            self.ranges = _ranges(pl_module) if get_plan(pl_module) else None

        def on_validation_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
            if get_plan(pl_module) and not trainer.sanity_checking:
                assert _ranges(pl_module) == self.ranges  # validation moved nothing

    spy = Spy()
    cb = QATCallback(start_epoch=1, export_dir=None, log_every_n_steps=1)
    model = make_module(L.LightningModule)
    logger = L.loggers.CSVLogger(str(tmp_path))
    trainer = _trainer(tmp_path, callbacks=[cb, spy], num_sanity_val_steps=2, logger=logger, log_every_n_steps=1)
    trainer.fit(model, loader(ds), loader(ds))
    assert seen == {0: False, 1: True, 2: True}
    ranges = _ranges(model)
    assert all(r > 0 for r in ranges.values())
    # ranges and clipped fractions are logged
    logged = trainer.logged_metrics
    assert any(k.startswith("qat_range/") for k in logged) and any(k.startswith("qat_clipped/") for k in logged)
    trainer.validate(model, loader(ds), verbose=False)
    trainer.test(model, loader(ds), verbose=False)
    preds = trainer.predict(model, loader(ds))
    assert _ranges(model) == ranges
    # predict runs the frozen fake-quant model: the same numbers as eval forward
    model.eval()
    assert torch.equal(torch.cat(preds), model(ds.tensors[0]))


def test_optimizer_trains_float_weights_and_grad_accumulation_matches_manual_loop(tmp_path) -> None:  # noqa: ANN001
    ds = make_data(n=64)
    torch.manual_seed(0)
    lit = make_module(L.LightningModule)
    manual = copy.deepcopy(lit)
    cb = QATCallback(start_epoch=0, export_dir=None, log_every_n_steps=0)
    _trainer(tmp_path, max_epochs=2, callbacks=[cb], accumulate_grad_batches=2).fit(lit, loader(ds, 8))

    # The same run by hand: prepare, then plain PyTorch with accumulation over 2 micro-batches.
    prepare_qat(manual, manual.example_input_array, cb.config)
    opt = manual.configure_optimizers()
    manual.train()
    for _ in range(2):
        for i, (x, y) in enumerate(loader(ds, 8)):
            loss = F.cross_entropy(manual(x), y) / 2
            loss.backward()
            if i % 2 == 1:
                opt.step()
                opt.zero_grad()
    for (n, p), (_, q) in zip(lit.named_parameters(), manual.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5), n
    assert _ranges(lit) == pytest.approx(_ranges(manual), rel=1e-6)
    # the trained weights are float, not snapped to the int8 grid
    conv = lit.net.pw
    w, _ = conv.folded_weight_bias()
    wq, _ = reference.fake_quantize_per_channel(w.detach(), conv.weight_groups, conv.weight_bits)
    assert not torch.equal(w.detach(), wq)


def _fit_with_checkpoints(tmp_path, max_epochs: int, ckpt_path=None, model=None, **callback_kwargs):  # noqa: ANN001, ANN202
    ds = make_data()
    model = model or make_module(L.LightningModule)
    ckpt = L.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, every_n_epochs=1)
    cb = QATCallback(start_epoch=1, export_dir=None, log_every_n_steps=0, **callback_kwargs)
    t = _trainer(tmp_path, max_epochs=max_epochs, callbacks=[cb, ckpt], enable_checkpointing=True)
    t.fit(model, loader(ds), loader(ds), ckpt_path=ckpt_path)
    return model, cb


def test_resume_equals_uninterrupted_run(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    full, _ = _fit_with_checkpoints(tmp_path / "a", 4)
    torch.manual_seed(0)
    _fit_with_checkpoints(tmp_path / "b", 2)
    ckpts = sorted(glob.glob(str(tmp_path / "b" / "ckpt" / "epoch=1*.ckpt")))
    assert ckpts, os.listdir(tmp_path / "b" / "ckpt")
    state = torch.load(ckpts[0], map_location="cpu", weights_only=False)
    assert "ncnnqat" in state and any(k.endswith("input_quantizer.running_absmax") for k in state["state_dict"])
    # checkpoints hold float weights: the stored conv weight is not its fake-quantized value
    w = state["state_dict"]["net.down.weight"]
    assert not torch.equal(w, reference.fake_quantize_per_channel(w, w.shape[0], 8)[0])
    torch.manual_seed(0)
    resumed, cb = _fit_with_checkpoints(tmp_path / "c", 4, ckpt_path=ckpts[0], model=make_module(L.LightningModule))
    assert cb.active and isinstance(resumed.net.pw, QATConv2d)
    for (n, p), (_, q) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p, q), n


def test_checkpoint_loads_into_fresh_model_without_training(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model, _ = _fit_with_checkpoints(tmp_path, 2)
    ckpt = sorted(glob.glob(str(tmp_path / "ckpt" / "epoch=1*.ckpt")))[0]
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    # keys as DDP/DataParallel write them
    state["state_dict"] = {"module." + k: v for k, v in state["state_dict"].items()}
    fresh = restore_from_checkpoint(make_module(L.LightningModule), state)
    fresh.eval()
    model.eval()
    x = make_data(8, seed=3).tensors[0]
    assert torch.equal(fresh(x), model(x))


def test_first_batch_is_the_example_when_module_has_none(tmp_path) -> None:  # noqa: ANN001
    ds = make_data()
    cb = QATCallback(start_epoch=1, export_dir=str(tmp_path / "export"), verbose=False)
    model = make_module(L.LightningModule, example=False)
    _trainer(tmp_path, max_epochs=2, callbacks=[cb]).fit(model, loader(ds))
    assert cb.active and all(r > 0 for r in _ranges(model).values())
    # export traces with the same first-batch example, and its parity batch comes from the train loader
    assert (tmp_path / "export" / "model.int8.param").is_file()
    assert cb.export_report.ok


def test_bf16_mixed_precision(tmp_path) -> None:  # noqa: ANN001
    ds = make_data()
    cb = QATCallback(start_epoch=0, export_dir=None)
    model = make_module(L.LightningModule)
    t = _trainer(tmp_path, max_epochs=2, callbacks=[cb], precision="bf16-mixed", logger=L.loggers.CSVLogger(str(tmp_path)))
    t.fit(model, loader(ds), loader(ds))
    assert all(r > 0 for r in _ranges(model).values())
    assert torch.isfinite(t.callback_metrics["val_loss"])


def test_pytorch_lightning_trainer(tmp_path) -> None:  # noqa: ANN001
    pl = pytest.importorskip("pytorch_lightning")
    ds = make_data()
    cb = QATCallback(start_epoch=1, export_dir=None)
    model = make_module(pl.LightningModule)
    pl.Trainer(max_epochs=2, callbacks=[cb], enable_progress_bar=False, logger=False, enable_checkpointing=False,
               default_root_dir=str(tmp_path)).fit(model, loader(ds), loader(ds))
    assert cb.active and all(r > 0 for r in _ranges(model).values())
