"""The calibrated start (range_init) and fixed ranges: thresholds equal the package's ncnn2table
calibration on the same batches, in prepare_qat, in the callback and in the exported table."""

from __future__ import annotations

import copy

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from torch import nn

from lightning_ncnnqat import QATCallback, QATConfig, calibrate, prepare_qat
from lightning_ncnnqat.ncnn.table import parse_table
from lightning_ncnnqat.qat.plan import get_plan
from lightning_ncnnqat.qat.prepared import input_quantizers

from lit_models import loader, make_data, make_module
from models import MixedNet


def _batches(n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    ds = make_data(16 * n, seed=seed)
    return [ds.tensors[0][i * 16 : (i + 1) * 16] for i in range(n)]


def _trainer(tmp_path, **kw) -> L.Trainer:  # noqa: ANN001
    args = dict(max_epochs=2, enable_progress_bar=False, enable_model_summary=False, logger=False,
                enable_checkpointing=False, default_root_dir=str(tmp_path), deterministic=True)
    args.update(kw)
    return L.Trainer(**args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"range_init": "minmax"}, r"`range_init` must be one of \('first_batch', 'absmax', 'kl', 'aciq'\), got 'minmax'"),
        ({"ranges": "ema"}, r"`ranges` must be one of \('moving_average', 'fixed', 'learned'\), got 'ema'"),
        ({"calibration_batches": 0}, r"`calibration_batches` must be an int >= 1, got 0"),
        ({"range_lr": -1.0}, r"`range_lr` must be a positive float, got -1.0"),
    ],
)
def test_range_arguments_are_validated_when_made(kwargs, match) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=match):
        QATConfig(**kwargs)
    with pytest.raises(ValueError, match=match):
        QATCallback(**kwargs)


def test_prepare_qat_without_calibration_data_raises_before_changing_the_model() -> None:
    model = MixedNet().eval()
    with pytest.raises(ValueError, match=r"`calibration_data` is required with range_init='kl'"):
        prepare_qat(model, torch.randn(1, 3, 16, 16), QATConfig(range_init="kl"))
    assert get_plan(model) is None


@pytest.mark.parametrize("method", ["kl", "aciq"])
def test_prepare_qat_starts_from_the_calibration_thresholds(method: str) -> None:
    torch.manual_seed(0)
    model = MixedNet()
    model.eval()
    batches = _batches()
    expected = calibrate(copy.deepcopy(model), batches, method=method, num_batches=3)
    prepare_qat(model, batches[0][:1], QATConfig(range_init=method, calibration_batches=3), calibration_data=batches)
    qs = input_quantizers(model)
    assert qs
    for name, q in qs.items():
        t = expected.layers[name].input_threshold
        assert q.running_absmax.item() == np.float32(t), name
        # the table's scale is ncnn2table's: 127 / threshold in float32
        assert q.scale() == expected.layers[name].input_scale, name


def test_absmax_start_is_the_max_over_the_batches_of_each_folded_float_input() -> None:
    torch.manual_seed(0)
    model = MixedNet()
    model.eval()
    batches = _batches()
    prepare_qat(model, batches[0][:1], QATConfig(range_init="absmax", calibration_batches=2), calibration_data=batches)
    from lightning_ncnnqat import folded_float_model

    folded = folded_float_model(model).eval()
    seen: dict[str, float] = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, max(seen.get(n, 0.0), a[0].abs().max().item())))
        for n, m in folded.named_modules() if n in input_quantizers(model)
    ]
    with torch.no_grad():
        for x in batches[:2]:  # only calibration_batches are read
            folded(x)
    for h in hooks:
        h.remove()
    for name, q in input_quantizers(model).items():
        assert q.running_absmax.item() == pytest.approx(seen[name], rel=1e-6), name


def test_fixed_ranges_do_not_move_in_training_and_moving_averages_do() -> None:
    torch.manual_seed(0)
    batches = _batches()
    moved = {}
    for ranges in ("fixed", "moving_average"):
        model = MixedNet()
        model.eval()
        prepare_qat(model, batches[0][:1], QATConfig(range_init="aciq", ranges=ranges), calibration_data=batches)
        before = {n: q.running_absmax.clone() for n, q in input_quantizers(model).items()}
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for x in batches:
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        moved[ranges] = any(not torch.equal(before[n], q.running_absmax) for n, q in input_quantizers(model).items())
    assert moved == {"fixed": False, "moving_average": True}


def test_callback_calibrated_start_is_the_calibration_of_the_first_training_batches(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    ds = make_data(64)
    model = make_module(L.LightningModule)
    start: dict[str, float] = {}

    class Grab(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            if trainer.current_epoch == 1 and batch_idx == 0:
                start.update({n: q.running_absmax.item() for n, q in input_quantizers(pl_module).items()})

    cb = QATCallback(start_epoch=1, export_dir=str(tmp_path / "export"), verbose=False,  # preflight on
                     range_init="aciq", calibration_batches=2, ranges="fixed", targets=["x86"])
    snapshot: dict[str, nn.Module] = {}

    class Snap(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            if trainer.current_epoch == 1:
                snapshot["net"] = copy.deepcopy(pl_module.net)

    _trainer(tmp_path, callbacks=[Snap(), cb, Grab()]).fit(model, loader(ds))
    expected = calibrate(snapshot["net"].eval(), [ds.tensors[0][:16], ds.tensors[0][16:32]], method="aciq")
    assert start and set(start) == set(input_quantizers(model))
    for name, t in start.items():
        assert t == np.float32(expected.layers[name.removeprefix("net.")].input_threshold), name
    # fixed: the last epoch did not move them, and the exported table carries them
    for name, q in input_quantizers(model).items():
        assert q.running_absmax.item() == start[name], name
    _, inputs = parse_table((tmp_path / "export" / "model.ncnn.table").read_text())
    plan = get_plan(model)
    rows = [r for r in cb.export_report.layers if r.ncnn_name in inputs]
    assert len(rows) == len(plan.layers)
    for r in rows:
        owner = plan.layers[r.torch_name].input_owner
        assert np.float32(inputs[r.ncnn_name]) == np.float32(np.float32(127) / np.float32(start[owner])), r.torch_name


# ---- learned ranges ------------------------------------------------------------------------


def _learned_model(seed: int = 0) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = MixedNet()
    model.eval()
    batches = _batches()
    prepare_qat(model, batches[0][:1], QATConfig(range_init="aciq", ranges="learned"), calibration_data=batches)
    model.train()
    return model, batches


def test_learned_ranges_train_and_the_table_carries_exp_log_threshold() -> None:
    from lightning_ncnnqat.qat.ranges import LearnedRanges

    model, batches = _learned_model()
    start = {n: q.running_absmax.clone() for n, q in input_quantizers(model).items()}
    ranges = LearnedRanges(model, lr=0.05)
    for x in batches * 2:
        model(x).square().mean().backward()
        assert ranges.step()
    for name, q in input_quantizers(model).items():
        assert q.learned and torch.equal(q.running_absmax, q.log_threshold.exp()), name
        assert q.scale() == float(torch.tensor([127.0]) / q.log_threshold.exp()), name  # the table's row
    assert any(not torch.equal(start[n], q.running_absmax) for n, q in input_quantizers(model).items())


def test_learned_step_unscales_amp_gradients_and_skips_overflow() -> None:
    from lightning_ncnnqat.qat.ranges import LearnedRanges

    (a, batches), (b, _) = _learned_model(), _learned_model()
    ra, rb = LearnedRanges(a, lr=0.05), LearnedRanges(b, lr=0.05)
    for x in batches:
        a(x).square().mean().backward()
        (b(x).square().mean() * 1024.0).backward()  # a GradScaler's scaled loss
        assert ra.step() and rb.step(grad_divisor=1024.0)
    for (n, qa), qb in zip(input_quantizers(a).items(), input_quantizers(b).values()):
        assert torch.allclose(qa.log_threshold, qb.log_threshold, rtol=1e-6, atol=1e-7), n
    before = {n: q.log_threshold.clone() for n, q in input_quantizers(b).items()}
    (b(batches[0]).square().mean() * float("inf")).backward()
    assert not rb.step(grad_divisor=1.0) and rb.skipped_steps == 1
    assert all(torch.equal(before[n], q.log_threshold) for n, q in input_quantizers(b).items())


def _fit_learned(tmp_path, max_epochs: int, ckpt_path=None):  # noqa: ANN001, ANN202
    from test_callback import _fit_with_checkpoints

    return _fit_with_checkpoints(tmp_path, max_epochs, ckpt_path=ckpt_path, verbose=False, range_init="aciq",
                                 calibration_batches=2, ranges="learned", range_lr=0.05)


def test_learned_ranges_resume_equals_uninterrupted_run(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    full, cb_full = _fit_learned(tmp_path / "a", 4)
    torch.manual_seed(0)
    _fit_learned(tmp_path / "b", 3)
    ckpt = sorted((tmp_path / "b" / "ckpt").glob("epoch=2*.ckpt"))[0]
    torch.manual_seed(0)
    resumed, cb = _fit_learned(tmp_path / "c", 4, ckpt_path=str(ckpt))
    assert cb_full.state_dict()["learned_ranges"]["state"]  # Adam moments are saved and restored
    for (n, p), (_, q) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p, q), n
    assert any(k.endswith("log_threshold") for k in full.state_dict())


# ---- what users feed the calibrated start ------------------------------------------------------


def test_replanning_wrong_layers_keeps_the_calibrated_thresholds() -> None:
    from lightning_ncnnqat.export.preflight import keep_wrong_layers_in_float
    from test_measured_decisions import TwoGrouped

    torch.manual_seed(0)
    model = TwoGrouped()
    ex = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    prepare_qat(model, ex[:1], QATConfig(range_init="kl", ranges="fixed"), calibration_data=[ex])
    before = {n: q.running_absmax.item() for n, q in input_quantizers(model).items()}
    reasons = keep_wrong_layers_in_float(model, ex[:1], targets="x86")
    assert list(reasons) == ["g"]  # g moved to float; the other owners keep their KL thresholds
    after = {n: q.running_absmax.item() for n, q in input_quantizers(model).items()}
    assert after and all(after[n] == before[n] for n in after if n in before)


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):  # noqa: ANN204
        ds = make_data(64)
        return iter(zip(ds.tensors[0], ds.tensors[1]))


def test_calibrated_start_reads_an_iterable_dataset_loader(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = make_module(L.LightningModule)
    cb = QATCallback(start_epoch=0, export_dir=None, verbose=False, range_init="kl", calibration_batches=2)
    _trainer(tmp_path, max_epochs=1, callbacks=[cb]).fit(model, torch.utils.data.DataLoader(_Stream(), batch_size=16))
    assert all(q.running_absmax.item() > 0 for q in input_quantizers(model).values())


class _TwoInputs(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(aux)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        return self(batch[0], batch[0]).mean()

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_calibrated_start_on_a_two_input_model_fails_at_fit_start_naming_the_argument(tmp_path) -> None:  # noqa: ANN001
    cb = QATCallback(start_epoch=1, export_dir=None, range_init="kl")
    with pytest.raises(ValueError, match=r"range_init='kl'.*forward takes 2 \(x, aux\).*range_init='first_batch'"):
        _trainer(tmp_path, max_epochs=2, callbacks=[cb]).fit(_TwoInputs(), loader(make_data(16)))
    with pytest.raises(ValueError, match=r"prepare_qat\(range_init='aciq'.*forward takes 2"):
        x = torch.randn(1, 3, 8, 8)
        prepare_qat(_TwoInputs(), (x, x), QATConfig(range_init="aciq"), calibration_data=[x])


def test_dict_batch_gives_the_value_under_forwards_parameter_name() -> None:
    from lightning_ncnnqat.qat.batches import example_from_batch

    class Pixels(nn.Module):
        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return pixels

    x, y = torch.randn(2, 3), torch.tensor([1, 2])
    (args, kwargs) = example_from_batch({"label": y, "pixels": x}, Pixels())
    assert args[0] is x and not kwargs
