"""``python -m lightning_ncnnqat export``: one-line errors (exit 2) for every argument mistake,
and the held batch from a file (.npy/.npz/.pt) or from the checkpoint's datamodule.

Checkpoints are real: a short Lightning fit of a tiny model with QATCallback (no export), saved
with ``trainer.save_checkpoint``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import pytest
import torch

from lightning_ncnnqat import QATCallback
from lightning_ncnnqat.__main__ import main
from lightning_ncnnqat.cli_inputs import UsageError, load_held_batch
from lightning_ncnnqat.preprocessing import Preprocessing
from lit_models import LitMixed, loader, make_data

ROOT = Path(__file__).resolve().parents[1]
PRE = Preprocessing((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


class TinyDM(L.LightningDataModule):
    """Data for LitMixed with a `preprocessing` attribute, saved in checkpoints."""

    def __init__(self, n_val: int = 96, batch_size: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.preprocessing: Preprocessing | None = None

    def setup(self, stage: str | None = None) -> None:
        self.preprocessing = PRE

    def train_dataloader(self):  # noqa: ANN201
        return loader(make_data(64, 16, seed=0), self.hparams.batch_size)

    def val_dataloader(self):  # noqa: ANN201
        return loader(make_data(self.hparams.n_val, 16, seed=2), self.hparams.batch_size)

    def state_dict(self) -> dict:
        return {} if self.preprocessing is None else {"preprocessing": self.preprocessing.to_dict()}


class NoExample(LitMixed):
    """LitMixed's weights, without example_input_array."""

    def __init__(self) -> None:
        super().__init__(example=False)


class Narrow(L.LightningModule):
    """Same module names as LitMixed, other widths: the state dict does not fit."""

    def __init__(self) -> None:
        super().__init__()
        from models import MixedNet

        self.net = MixedNet(width=8)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """One fit, QAT from epoch 1 of 2: the checkpoint of epoch 0 is float, that of epoch 1 is QAT."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    tmp = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp,
        callbacks=[
            QATCallback(start_epoch=1, export_dir=None, verbose=False),
            ModelCheckpoint(dirpath=tmp, filename="{epoch}", save_top_k=-1, every_n_epochs=1),
        ],
    )
    trainer.fit(LitMixed(), datamodule=TinyDM(n_val=80))
    return {"float": tmp / "epoch=0.ckpt", "qat": tmp / "epoch=1.ckpt"}


class TwoIn(L.LightningModule):
    """A model with two image inputs, forward(x, y); batches are (x, y, target)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 10)
        g = torch.Generator().manual_seed(1)
        self.example_input_array = (torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x) + self.b(y))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(h, 1).flatten(1))

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y, t = batch
        return torch.nn.functional.cross_entropy(self(x, y), t)

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def two_in_data(n: int, seed: int) -> torch.utils.data.TensorDataset:
    x, t = make_data(n, 16, seed=seed).tensors
    return torch.utils.data.TensorDataset(x, x.flip(-1) * 0.5, t)


class TwoInDM(L.LightningDataModule):
    def __init__(self, n_val: int = 72) -> None:
        super().__init__()
        self.save_hyperparameters()

    def val_dataloader(self):  # noqa: ANN201
        return torch.utils.data.DataLoader(two_in_data(self.hparams.n_val, 3), batch_size=16)


@pytest.fixture(scope="module")
def two_in_ckpt(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("two_in")
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp,
        callbacks=[QATCallback(start_epoch=1, export_dir=None, verbose=False)],
    )
    trainer.fit(TwoIn(), torch.utils.data.DataLoader(two_in_data(64, 0), batch_size=16))
    trainer.save_checkpoint(tmp / "two_in.ckpt")
    return tmp / "two_in.ckpt"


def _error(capsys, *argv: str) -> str:  # noqa: ANN001
    """Run the command; it must fail with exit code 2 and one line 'error: ...'."""
    rc = main(["export", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _args(ckpt: Path, out: Path, model: str = "lit_models:LitMixed") -> list[str]:
    return [str(ckpt), "--model", model, "--export-dir", str(out), "--quiet", "--targets", "x86"]


# ---- errors


def test_missing_checkpoint(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    msg = _error(capsys, *_args(tmp_path / "nope.ckpt", tmp_path / "out"))
    assert "nope.ckpt' does not exist" in msg
    assert not (tmp_path / "out").exists()


def test_file_that_is_not_a_checkpoint(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    assert "notes.txt' is not a PyTorch checkpoint" in _error(capsys, *_args(tmp_path / "notes.txt", tmp_path / "o"))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert "list.pt' is not a Lightning checkpoint: it holds list" in _error(
        capsys, *_args(tmp_path / "list.pt", tmp_path / "o")
    )
    torch.save({"weights": torch.ones(2)}, tmp_path / "sd.pt")
    assert "keys ['weights'], no 'state_dict'" in _error(capsys, *_args(tmp_path / "sd.pt", tmp_path / "o"))


def test_float_checkpoint_says_qat_had_not_started(ckpts, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    msg = _error(capsys, *_args(ckpts["float"], tmp_path / "o"))
    assert "float checkpoint" in msg and "before QAT started" in msg
    assert "start_epoch=1" in msg and "at epoch 0" in msg
    assert "saved after QAT started" in msg and "ckpt_path" in msg  # what to do


def test_wrong_model_class_names_the_keys(ckpts, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    msg = _error(capsys, *_args(ckpts["qat"], tmp_path / "o", "models:MixedNet"))
    assert "--model models:MixedNet does not fit the checkpoint" in msg
    assert "missing keys ['bn_a.bias'" in msg and "unexpected keys ['net.bn_a.bias'" in msg
    msg = _error(capsys, *_args(ckpts["qat"], tmp_path / "o", "test_cli:Narrow"))
    assert "does not fit the checkpoint" in msg and "size mismatch for net." in msg
    msg = _error(capsys, *_args(ckpts["qat"], tmp_path / "o", "lit_models:Nothing"))
    assert "module 'lit_models' has no attribute 'Nothing'" in msg
    assert "must be 'package.module:ClassName'" in _error(capsys, *_args(ckpts["qat"], tmp_path / "o", "lit_models"))


def test_export_dir_that_cannot_be_created(ckpts, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    msg = _error(capsys, *_args(ckpts["qat"], blocker / "out"))
    assert "--export-dir" in msg and "a_file/out' cannot be created or written" in msg
    assert "exists and is not a directory" in _error(capsys, *_args(ckpts["qat"], blocker))


def test_no_example_input_names_input_shape(ckpts, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    msg = _error(capsys, *_args(ckpts["qat"], tmp_path / "o", "test_cli:NoExample"))
    assert "NoExample has no example_input_array" in msg and "--input-shape" in msg


def test_held_batch_mistakes(ckpts, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    base = _args(ckpts["qat"], tmp_path / "o")
    assert "held.npy' does not exist" in _error(capsys, *base, "--held-batch", str(tmp_path / "held.npy"))
    np.save(tmp_path / "pixels.npy", np.ones((4, 3, 16, 16), np.uint8))
    assert "holds torch.uint8 values" in _error(capsys, *base, "--held-batch", str(tmp_path / "pixels.npy"))
    np.savez(tmp_path / "two.npz", a=np.ones((4, 3, 16, 16), np.float32), b=np.ones(4, np.float32))
    assert "holds arrays ['a', 'b']" in _error(capsys, *base, "--held-batch", str(tmp_path / "two.npz"))
    np.save(tmp_path / "small.npy", np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    msg = _error(capsys, *base, "--held-batch", str(tmp_path / "small.npy"))
    assert "(4, 3, 8, 8)" in msg  # the shape mismatch with the model input, in one line
    msg = _error(capsys, *base, "--datamodule", "test_cli:Missing")
    assert "--datamodule: module 'test_cli' has no attribute 'Missing'" in msg
    assert "--preprocessing" in _error(capsys, *base, "--preprocessing", '{"mean": [0.5], "std": [0.0]}')
    assert "unknown target(s) ['riscv']" in _error(capsys, *base, "--targets", "riscv")


def test_real_entry_point_prints_no_traceback(ckpts, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_ncnnqat", "export", str(ckpts["float"]), "--model", "lit_models:LitMixed",
         "--export-dir", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ") and "float checkpoint" in proc.stderr


# ---- held batch sources


def test_held_batch_file_formats(tmp_path: Path) -> None:
    x = make_data(8, 16, seed=5).tensors[0]
    y = torch.arange(8)
    np.save(tmp_path / "a.npy", x.numpy())
    np.savez(tmp_path / "one.npz", anything=x.numpy())
    np.savez(tmp_path / "named.npz", images=x.numpy(), labels=y.numpy())
    torch.save(x, tmp_path / "t.pt")
    torch.save((x, y), tmp_path / "batch.pt")
    torch.save({"image": x, "label": y}, tmp_path / "d.pth")
    for name in ("a.npy", "one.npz", "named.npz", "t.pt", "batch.pt", "d.pth"):
        got = load_held_batch(tmp_path / name)
        assert got.dtype == torch.float32 and torch.equal(got, x), name
    torch.save({"label": y}, tmp_path / "labels.pt")
    with pytest.raises(UsageError, match="holds torch.int64 values"):
        load_held_batch(tmp_path / "labels.pt")


def test_held_batch_from_npz_with_size(ckpts, tmp_path: Path) -> None:
    held = make_data(40, 16, seed=7).tensors[0].numpy()
    np.savez(tmp_path / "held.npz", x=held)
    out = tmp_path / "out"
    rc = main(["export", *_args(ckpts["qat"], out), "--held-batch", str(tmp_path / "held.npz"), "--held-batch-size", "20"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["held_batch"]["n"] == 20 and "held.npz" in report["held_batch"]["source"]
    assert (out / "DEPLOY.md").is_file() and (out / "run_int8.py").is_file()
    # the checkpoint's datamodule state carries the preprocessing, even without --datamodule
    assert "substract_mean_normalize" in (out / "DEPLOY.md").read_text()


def test_held_batch_from_the_datamodule(ckpts, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["export", *_args(ckpts["qat"], out), "--datamodule", "test_cli:TinyDM"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["held_batch"]["n"] == 64  # the default, from the 80 validation samples
    assert "test_cli:TinyDM.val_dataloader()" in report["held_batch"]["source"]
    note = (out / "DEPLOY.md").read_text()
    assert "127.5f, 127.5f, 127.5f" in note  # PRE's mean_vals: 0.5 * 255
    out2 = tmp_path / "out2"
    assert main(["export", *_args(ckpts["qat"], out2), "--datamodule", "test_cli:TinyDM", "--held-batch-size", "500"]) == 0
    # built from the checkpoint's datamodule hyper-parameters: n_val=80, not the default 96
    assert json.loads((out2 / "report.json").read_text())["held_batch"]["n"] == 80


def test_two_input_model_held_batch_from_npz_pt_and_datamodule(two_in_ckpt, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    ds = two_in_data(24, 5)
    x, y, t = ds.tensors
    np.savez(tmp_path / "held.npz", y=y.numpy(), x=x.numpy())  # named after forward's parameters
    torch.save((x, y, t), tmp_path / "held.pt")  # a dataloader batch
    for name in ("held.npz", "held.pt"):
        out = tmp_path / name.replace(".", "_")
        rc = main(["export", *_args(two_in_ckpt, out, "test_cli:TwoIn"), "--held-batch", str(tmp_path / name)])
        assert rc == 0, capsys.readouterr().err
        report = json.loads((out / "report.json").read_text())
        assert report["held_batch"]["n"] == 24
        assert [i["blob"] for i in report["io"]["inputs"]] == ["in0", "in1"]
        assert "| input | `in1` | (3, 16, 16) |" in (out / "DEPLOY.md").read_text()
    # the same numbers from both files: the arrays were matched to x and y by name, not by order
    a = json.loads((tmp_path / "held_npz" / "report.json").read_text())["int8_vs_qat"]
    b = json.loads((tmp_path / "held_pt" / "report.json").read_text())["int8_vs_qat"]
    assert a == b and a["cosine"] >= 0.999
    out = tmp_path / "dm"
    assert main(["export", *_args(two_in_ckpt, out, "test_cli:TwoIn"), "--datamodule", "test_cli:TwoInDM"]) == 0
    assert json.loads((out / "report.json").read_text())["held_batch"]["n"] == 64
    np.savez(tmp_path / "one.npz", x=x.numpy())
    msg = _error(capsys, *_args(two_in_ckpt, tmp_path / "o", "test_cli:TwoIn"), "--held-batch", str(tmp_path / "one.npz"))
    assert "does not hold the model's inputs (Tensor(3, 16, 16), Tensor(3, 16, 16), per sample)" in msg


def test_help_documents_the_held_batch(capsys) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--held-batch ", "--datamodule", "--held-batch-size", "--input-shape", "--preprocessing", ".npz"):
        assert flag in text, flag
