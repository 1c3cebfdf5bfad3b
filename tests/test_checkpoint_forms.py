"""Every checkpoint form carries the QAT plan and loads back into the QAT model: full and
weights-only Lightning checkpoints, a bare ``state_dict()``, ``load_from_checkpoint`` in a fresh
process; ``strict=False`` never gives a float model silently; a load that fails leaves the model
as it was. Checkpoints are real: one short fit of a tiny model with QATCallback (no export)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_ncnnqat import QATCallback, QATConfig, load_from_checkpoint, prepare_qat, restore_from_checkpoint
from lightning_ncnnqat.__main__ import main
from lightning_ncnnqat.qat.checkpoint import CheckpointMismatchError
from lightning_ncnnqat.cli_inputs import build_model, load_checkpoint
from lightning_ncnnqat.qat.plan_state import PLAN_KEY, PlanMismatchError, checkpoint_plan, same_plan
from lightning_ncnnqat.qat.plan import get_plan
from lightning_ncnnqat.qat.prepared import input_quantizers
from lightning_ncnnqat.qat.prepare import unprepare
from lit_models import LitMixed, loader, make_data

HERE = Path(__file__).resolve().parent


def _trainer(root: Path, callbacks: list, **kw) -> L.Trainer:  # noqa: ANN001
    args = dict(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=str(root), num_sanity_val_steps=0)
    args.update(kw)
    return L.Trainer(callbacks=callbacks, **args)


@pytest.fixture(scope="module")
def run(tmp_path_factory):  # noqa: ANN001, ANN201
    """QAT from epoch 1 of 2; full and weights-only checkpoints of both epochs, a manual
    weights-only save, a bare state dict, and the QAT model's eval output on fixed inputs."""
    root = tmp_path_factory.mktemp("forms")
    torch.manual_seed(0)
    model = LitMixed()
    cbs = [
        QATCallback(start_epoch=1, export_dir=None, log_every_n_steps=0, verbose=False),
        ModelCheckpoint(dirpath=root / "full", filename="{epoch}", save_top_k=-1, every_n_epochs=1),
        ModelCheckpoint(dirpath=root / "wo", filename="{epoch}", monitor="val_loss", save_top_k=-1, every_n_epochs=1,
                        save_weights_only=True),  # monitor: a state_key of its own
    ]
    trainer = _trainer(root, cbs, enable_checkpointing=True)
    trainer.fit(model, loader(make_data()), loader(make_data(32, seed=3)))
    trainer.save_checkpoint(root / "manual_wo.ckpt", weights_only=True)
    torch.save(model.state_dict(), root / "state_dict.pt")
    x = make_data(16, seed=2).tensors[0]
    with torch.no_grad():
        ref = model.eval()(x)
    torch.save((x, ref), root / "ref.pt")
    forms = {
        "full": root / "full" / "epoch=1.ckpt", "weights_only": root / "wo" / "epoch=1.ckpt",
        "manual_weights_only": root / "manual_wo.ckpt", "state_dict": root / "state_dict.pt",
    }
    floats = {"full": root / "full" / "epoch=0.ckpt", "weights_only": root / "wo" / "epoch=0.ckpt"}
    return root, model, forms, floats, x, ref


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)  # every form loads without pickled code


FORMS = ["full", "weights_only", "manual_weights_only", "state_dict"]


@pytest.mark.parametrize("form", FORMS)
def test_every_form_carries_the_plan_and_restores_the_qat_model(run, form: str) -> None:  # noqa: ANN001
    root, model, forms, floats, x, ref = run
    ckpt = _load(forms[form])
    assert same_plan(checkpoint_plan(ckpt), get_plan(model))
    if form == "weights_only":
        assert "ncnnqat" not in ckpt and "callbacks" not in ckpt  # Lightning skipped the callback's hook
    fresh = LitMixed()
    restore_from_checkpoint(fresh, ckpt)
    assert same_plan(get_plan(fresh), get_plan(model))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), ref)


def test_float_checkpoints_carry_no_plan(run) -> None:  # noqa: ANN001
    root, model, forms, floats, x, ref = run
    for path in floats.values():
        ckpt = _load(path)
        assert checkpoint_plan(ckpt) is None and not any(PLAN_KEY in k for k in ckpt["state_dict"])
        with pytest.raises(ValueError, match="holds no QAT state"):
            restore_from_checkpoint(LitMixed(), ckpt)


def test_wrapper_prefixes_and_a_plain_module(tmp_path: Path) -> None:
    """Another model form: a plain nn.Module (no Lightning), its state dict saved under DDP's
    ``module.`` prefix, and a calibrated, fixed-range start."""
    torch.manual_seed(1)

    def make() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * 8 * 8, 3))

    model = make()
    data = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    prepare_qat(model, data[:1], QATConfig(range_init="absmax", ranges="fixed"), calibration_data=[data])
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ddp_sd.pt")
    fresh = make()
    restore_from_checkpoint(fresh, _load(tmp_path / "ddp_sd.pt"))
    assert same_plan(get_plan(fresh), get_plan(model))
    assert torch.equal(fresh.eval()(data), model.eval()(data))


# ---- strict=False and loads that fail


def test_strict_false_never_loads_a_qat_state_into_a_float_model(run) -> None:  # noqa: ANN001
    root, model, forms, floats, x, ref = run
    state = _load(forms["weights_only"])["state_dict"]
    m = LitMixed()
    restore_from_checkpoint(m, _load(forms["full"]))
    unprepare(m)  # float again (the hooks stay): a QAT state dict must not load as a float model
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(PlanMismatchError, match="restore_from_checkpoint"):
        m.load_state_dict(state, strict=False)
    assert get_plan(m) is None and all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    # a model prepared with another plan refuses it too, before copying anything
    other = LitMixed()
    prepare_qat(other, other.example_input_array, QATConfig(skip=("net.fc",)))
    kept = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(PlanMismatchError, match="another QAT plan"):
        other.load_state_dict(state, strict=False)
    assert all(torch.equal(v, kept[k]) for k, v in other.state_dict().items())


def _mismatched(path: Path, out: Path) -> Path:
    """The checkpoint with one weight of another shape (a model of another width, say)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    ckpt["state_dict"]["net.fc.weight"] = torch.zeros(7, 3)
    torch.save(ckpt, out)
    return out


def test_failed_test_ckpt_path_leaves_the_qat_model_as_it_was(run, tmp_path: Path) -> None:  # noqa: ANN001
    root, model, forms, floats, x, ref = run
    m = LitMixed()
    restore_from_checkpoint(m, _load(forms["full"]))
    plan = get_plan(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    data = loader(make_data(16, seed=1))
    bad_float = _mismatched(floats["full"], tmp_path / "bad_float.ckpt")
    with pytest.raises(CheckpointMismatchError, match=r"size mismatch for net\.fc\.weight.*left as it was"):
        _trainer(tmp_path, [QATCallback(export_dir=None, verbose=False)]).test(m, data, ckpt_path=bad_float, verbose=False)
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception):  # noqa: B017  (torch.load's own error)
        _trainer(tmp_path, [QATCallback(export_dir=None, verbose=False)]).test(
            m, data, ckpt_path=tmp_path / "garbage.ckpt", verbose=False)
    assert get_plan(m) is plan
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    with torch.no_grad():
        assert torch.equal(m.eval()(x), ref)


def test_failed_qat_load_leaves_the_float_model_float(run, tmp_path: Path) -> None:  # noqa: ANN001
    root, model, forms, floats, x, ref = run
    m = LitMixed()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    bad_qat = _mismatched(forms["weights_only"], tmp_path / "bad_qat.ckpt")
    with pytest.raises(CheckpointMismatchError, match="with the checkpoint's QAT plan"):
        _trainer(tmp_path, [QATCallback(export_dir=None, verbose=False)]).validate(
            m, loader(make_data(16, seed=1)), ckpt_path=bad_qat, verbose=False)
    assert get_plan(m) is None and list(m.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    with pytest.raises(CheckpointMismatchError):
        restore_from_checkpoint(m, _load(bad_qat))
    assert get_plan(m) is None


# ---- through Lightning: weights-only into the callback, resuming, a fresh process


def test_weights_only_checkpoint_through_the_callback(run, tmp_path: Path) -> None:  # noqa: ANN001
    root, model, forms, floats, x, ref = run
    m = LitMixed()
    cb = QATCallback(export_dir=None, verbose=False)
    _trainer(tmp_path, [cb]).test(m, loader(make_data(16, seed=1)), ckpt_path=forms["weights_only"], verbose=False)
    assert cb.active and same_plan(get_plan(m), get_plan(model))
    with torch.no_grad():
        assert torch.equal(m.eval()(x), ref)


def test_resume_fit_from_weights_only(run, tmp_path: Path) -> None:  # noqa: ANN001
    """Lightning refuses to resume fit from a weights-only checkpoint (no optimizer state); the
    way to go on is to load it and fit again: QAT goes on with the checkpoint's plan and ranges."""
    root, model, forms, floats, x, ref = run
    with pytest.raises(KeyError, match="save_weights_only"):
        _trainer(tmp_path, [QATCallback(start_epoch=1, export_dir=None, verbose=False)], max_epochs=3).fit(
            LitMixed(), loader(make_data()), ckpt_path=forms["weights_only"])
    m = load_from_checkpoint(LitMixed, forms["weights_only"])
    plan = get_plan(m)
    assert same_plan(plan, get_plan(model))
    ranges = {n: q.running_absmax.item() for n, q in input_quantizers(m).items()}
    cb = QATCallback(start_epoch=0, export_dir=None, log_every_n_steps=0, verbose=False)
    _trainer(tmp_path, [cb], max_epochs=1).fit(m, loader(make_data(32, seed=4)))
    assert cb.active and get_plan(m) is plan  # not prepared again
    assert any(q.running_absmax.item() != ranges[n] for n, q in input_quantizers(m).items())  # ranges moved on


_FRESH = """
import sys, warnings, torch
torch.set_num_threads(1)
sys.path.insert(0, {here!r})
from lit_models import LitMixed
x, ref = torch.load({ref!r})
for path in {paths!r}:
    try:
        LitMixed.load_from_checkpoint(path)
        print("LOADED")
    except Exception as e:
        print("ERR", str(e).replace(chr(10), " ")[:400])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = LitMixed.load_from_checkpoint(path, strict=False)
    print("WARN", any("lightning_ncnnqat.load_from_checkpoint" in str(i.message) for i in w))
    import lightning_ncnnqat as lq
    for strict in (True, False):
        m = lq.load_from_checkpoint(LitMixed, path, strict=strict)
        with torch.no_grad():
            print("EQUAL", torch.equal(m.eval()(x), ref), lq.prepare.get_plan(m) is not None)
"""


def test_load_from_checkpoint_in_a_fresh_process(run) -> None:  # noqa: ANN001
    root, model, forms, floats, x, ref = run
    paths = [str(forms["full"]), str(forms["weights_only"])]
    code = _FRESH.format(here=str(HERE), ref=str(root / "ref.pt"), paths=paths)
    env = dict(os.environ, PYTHONPATH=str(HERE))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stderr[-2000:]
    errs = [ln for ln in lines if ln.startswith("ERR")]
    assert len(errs) == 2 and all("lightning_ncnnqat.load_from_checkpoint" in e for e in errs), lines
    assert lines.count("WARN True") == 2, lines  # strict=False: Lightning's warning names the way
    assert lines.count("EQUAL True True") == 4, lines


# ---- the export command


def _cli(ckpt: Path, out: Path, capsys) -> tuple[int, str]:  # noqa: ANN001
    rc = main(["export", str(ckpt), "--model", "lit_models:LitMixed", "--export-dir", str(out), "--quiet",
               "--targets", "x86"])
    return rc, capsys.readouterr().err.strip()


def test_cli_weights_only_checkpoints(run, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    root, model, forms, floats, x, ref = run
    rc, err = _cli(floats["weights_only"], tmp_path / "f", capsys)
    assert rc == 2 and "is a float checkpoint (weights-only)" in err and "before QAT started" in err
    old = _load(forms["weights_only"])
    old["state_dict"] = {k: v for k, v in old["state_dict"].items() if PLAN_KEY not in k}  # saved by an older version
    torch.save(old, tmp_path / "old.ckpt")
    rc, err = _cli(tmp_path / "old.ckpt", tmp_path / "o", capsys)
    assert rc == 2 and "QAT weights (input ranges) but not the QAT plan" in err and err.count("\n") == 0
    for form in ("weights_only", "state_dict"):  # what the command rebuilds from either form
        built = build_model(load_checkpoint(forms[form]), "lit_models:LitMixed")
        with torch.no_grad():
            assert same_plan(get_plan(built), get_plan(model)) and torch.equal(built(x), ref)
    rc, err = _cli(forms["weights_only"], tmp_path / "w", capsys)
    assert rc in (0, 1), err  # exported (1: a layer flagged; the report says which)
    assert (tmp_path / "w" / "report.json").exists() and (tmp_path / "w" / "model.int8.param").exists()
