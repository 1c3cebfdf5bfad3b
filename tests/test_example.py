"""Tests of the CIFAR-10 / digits example (examples/cifar10.py, examples/qat.yaml).

Fast unit tests of the backbones and data modules, plus LightningCLI runs in subprocesses:
``--help`` with the callback's arguments, the YAML and flag forms parsed, and one tiny ``fit``
with QAT and export (marked ``slow``; ~30 s on 2 cores).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "cifar10.py"
CONFIG = REPO / "examples" / "qat.yaml"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from examples import cifar10 as ex  # noqa: E402

# Module types the backbones may contain: what ncnn runs (in int8 where it quantizes).
NCNN_FRIENDLY = (
    nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear, nn.Sequential,
)


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python examples/cifar10.py ARGS`` in a subprocess (as a user would run it)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


# ---- backbones -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs"), [("resnet18", {"width": 8}), ("mobilenetv2", {"width_mult": 0.25})]
)
def test_backbone_forward_backward(name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    net = ex.build_backbone(name, num_classes=7, **kwargs)
    x = torch.randn(4, 3, 32, 32)
    out = net(x)
    assert out.shape == (4, 7)
    assert torch.isfinite(out).all()
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 6])).backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert net.state_dict()  # has weights
    assert sum(p.grad.abs().sum() for p in net.parameters()) > 0
    bad = {type(m).__name__ for m in net.modules() if not isinstance(m, NCNN_FRIENDLY)}
    bad -= {type(net).__name__, "BasicBlock", "InvertedResidual"}
    assert not bad, f"non-ncnn-friendly modules: {bad}"
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())


def test_resnet18_shape_and_width() -> None:
    net = ex.ResNetCifar(num_classes=10, width=16)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].kernel_size == (3, 3) and convs[0].stride == (1, 1) and convs[0].out_channels == 16
    assert sum(isinstance(m, ex.BasicBlock) for m in net.modules()) == 8  # [2, 2, 2, 2]
    assert net.fc.in_features == 16 * 8
    # Every conv is followed by a BatchNorm of the same width.
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == len(convs) and [b.num_features for b in bns] == [c.out_channels for c in convs]
    # Stride-1 stem, three stride-2 stages: 32 -> 4 before pooling.
    feats = net.layers(net.stem(torch.randn(1, 3, 32, 32)))
    assert feats.shape == (1, 128, 4, 4)


def test_mobilenetv2_width_mult_and_depthwise() -> None:
    small, big = ex.MobileNetV2Cifar(10, 0.5), ex.MobileNetV2Cifar(10, 1.0)
    count = lambda n: sum(p.numel() for p in n.parameters())  # noqa: E731
    assert count(small) < count(big)
    dw = [m for m in big.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert dw and all(m.groups == m.in_channels == m.out_channels for m in dw)
    assert big.features(torch.randn(1, 3, 32, 32)).shape[-2:] == (4, 4)


def test_unknown_backbone_names_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"backbone.*resnet18.*mobilenetv2.*'vgg'"):
        ex.build_backbone("vgg")
    with pytest.raises(ValueError, match="backbone"):
        ex.CIFARClassifier(backbone="vgg")
    with pytest.raises(ValueError, match="optimizer"):
        ex.CIFARClassifier(optimizer="lbfgs")


def test_classifier_module() -> None:
    a, b = ex.CIFARClassifier(width=8), ex.CIFARClassifier(backbone="mobilenetv2", width_mult=0.25)
    for m in (a, b):
        x = m.example_input_array
        assert x.shape == (1, 3, 32, 32) and x.std() > 0.5  # fixed random, not zeros
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        assert isinstance(m.net, nn.Module) and m.forward(x).shape == m.net(x).shape
    assert torch.equal(a.example_input_array, b.example_input_array)  # fixed seed
    assert isinstance(a.net, ex.ResNetCifar) and isinstance(b.net, ex.MobileNetV2Cifar)
    assert a.hparams.width == 8 and a.hparams.backbone == "resnet18"
    a.eval()
    pred = a.predict_step((torch.randn(3, 3, 32, 32), torch.zeros(3, dtype=torch.long)), 0)
    assert pred.shape == (3,) and pred.dtype == torch.long


# ---- digits ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> ex.CIFAR10DataModule:
    dm = ex.CIFAR10DataModule(batch_size=32, seed=0)
    dm.setup("fit")
    return dm


def test_digits_split(digits: ex.CIFAR10DataModule) -> None:
    tr, va = digits.train_indices, digits.val_indices
    assert len(tr) + len(va) == 1797 and len(va) == 360
    assert not set(tr.tolist()) & set(va.tolist())
    # Fixed: same seed -> same split; another seed -> another split.
    again = ex.CIFAR10DataModule(seed=0)
    again.setup("fit")
    assert torch.equal(again.val_indices, va)
    other = ex.CIFAR10DataModule(seed=1)
    other.setup("fit")
    assert not torch.equal(other.val_indices, va)
    # Stratified: every class in validation, in proportion (~36 each).
    counts = torch.bincount(digits.val_set.labels, minlength=10)
    assert counts.min() >= 30 and counts.max() <= 42
    assert digits.test_set is digits.val_set


def test_digits_images(digits: ex.CIFAR10DataModule) -> None:
    x, y = next(iter(digits.val_dataloader()))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.long and 0 <= y.min() and y.max() <= 9
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # gray, replicated
    flat = x.flatten(1)
    assert (flat.std(dim=1) > 0.3).all()  # real digits, not constant images
    mean, std = digits.val_set.mean[0].item(), digits.val_set.std[0].item()
    assert x.min() >= (0 - mean) / std - 1e-5 and x.max() <= (1 - mean) / std + 1e-5
    assert x.min() < (0.05 - mean) / std and x.max() > (0.9 - mean) / std  # both ink and paper
    # Normalised with the training split's statistics.
    xs = torch.stack([digits.train_set[i][0] for i in range(0, len(digits.train_set), 7)])
    assert abs(xs.mean().item()) < 0.15 and 0.85 < xs.std().item() < 1.15
    # Matches scikit-learn's 8x8 image, downsampled back.
    from sklearn.datasets import load_digits

    i = int(digits.val_indices[0])
    img = x[0, 0] * std + mean
    small = torch.nn.functional.adaptive_avg_pool2d(img[None, None], 8)[0, 0]
    ref = torch.as_tensor(load_digits().images[i], dtype=torch.float32) / 16
    assert torch.corrcoef(torch.stack([small.flatten(), ref.flatten()]))[0, 1] > 0.9
    assert y[0].item() == int(load_digits().target[i])


def test_digits_preprocessing_is_the_normalisation_applied(digits: ex.CIFAR10DataModule) -> None:
    p = digits.preprocessing
    assert p is not None and p.channel_order == "RGB" and p.input_range == 1.0
    assert p.mean == (digits.val_set.mean[0].item(),) * 3 and p.std == (digits.val_set.std[0].item(),) * 3
    # 8-bit gray pixels replicated to RGB, normalised by the ncnn formula == the dataset's tensor
    img = (digits.val_set.images[0] * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    x = digits.val_set[0][0].numpy()
    ncnn_like = (img.astype(np.float32).transpose(2, 0, 1) - np.float32(p.mean_vals[0])) * np.float32(p.norm_vals[0])
    assert np.abs(ncnn_like - x).max() < 0.5 / 255 / p.std[0] + 1e-4  # within half a pixel level
    # saved in checkpoints (Lightning stores the datamodule's state_dict) and restored from them
    state = digits.state_dict()
    fresh = ex.CIFAR10DataModule()
    assert fresh.preprocessing is None
    fresh.load_state_dict(state)
    assert fresh.preprocessing == p


def test_digits_train_loader_shuffles_and_augments(digits: ex.CIFAR10DataModule) -> None:
    torch.manual_seed(0)
    a = digits.train_set[0][0]
    assert a.shape == (3, 32, 32)
    others = [digits.train_set[0][0] for _ in range(10)]
    assert any(not torch.equal(a, o) for o in others)  # random crop moves the digit
    no_aug = ex.CIFAR10DataModule(augment=False)
    no_aug.setup("fit")
    assert torch.equal(no_aug.train_set[0][0], no_aug.train_set[0][0])


def test_datamodule_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"dataset.*'mnist'"):
        ex.CIFAR10DataModule(dataset="mnist")
    with pytest.raises(ValueError, match=r"val_fraction.*1\.5"):
        ex.CIFAR10DataModule(val_fraction=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        ex.CIFAR10DataModule(batch_size=0)


# ---- cifar10 ---------------------------------------------------------------------------


def _write_fake_cifar(root: Path, per_batch: int = 20, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A tiny cifar-10-batches-py folder in the real pickle format (random non-zero uint8 images)."""
    rng = np.random.default_rng(seed)
    folder = root / ex.CIFAR10_FOLDER
    folder.mkdir(parents=True)
    written = {}
    for name in (*ex.CIFAR10_TRAIN_FILES, ex.CIFAR10_TEST_FILE):
        data = rng.integers(1, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        labels[:10] = list(range(10))  # every class present (stratified split)
        labels[10:20] = list(range(10))
        entry = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        written[name] = (data, labels)
    return written


def test_cifar10_reads_pickle_batches(tmp_path: Path) -> None:
    written = _write_fake_cifar(tmp_path)
    dm = ex.CIFAR10DataModule(data_dir=str(tmp_path), dataset="cifar10", batch_size=8, val_fraction=0.2, download=False)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 80 and len(dm.val_set) == 20 and len(dm.test_set) == 20
    assert not set(dm.train_indices.tolist()) & set(dm.val_indices.tolist())
    # Test image 3 == the pickle's row 3, as CHW (R plane, G plane, B plane), normalised.
    data, labels = written[ex.CIFAR10_TEST_FILE]
    x, y = dm.test_set[3]
    mean = torch.tensor(ex.CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(ex.CIFAR10_STD).view(3, 1, 1)
    expected = (torch.as_tensor(data[3], dtype=torch.float32).view(3, 32, 32) / 255 - mean) / std
    assert torch.allclose(x, expected, atol=1e-6) and y.item() == labels[3]
    # the recorded preprocessing reproduces it from the 8-bit HxWx3 pixels
    assert dm.preprocessing is not None and dm.preprocessing.mean == ex.CIFAR10_MEAN
    pixels = data[3].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.abs(dm.preprocessing.normalize(pixels) - x.numpy()).max() < 1e-5
    # Validation index i of the 50k training images -> batch i // 20, row i % 20.
    i = int(dm.val_indices[0])
    data_b, labels_b = written[ex.CIFAR10_TRAIN_FILES[i // 20]]
    xv, yv = dm.val_set[0]
    assert torch.allclose(xv * std + mean, torch.as_tensor(data_b[i % 20], dtype=torch.float32).view(3, 32, 32) / 255, atol=1e-5)
    assert yv.item() == labels_b[i % 20]
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (8, 3, 32, 32) and yb.shape == (8,)
    # Training crops pad with zeros (black): some augmented samples differ from the raw image.
    torch.manual_seed(0)
    raw = (dm.train_set.images[0].float() / 255 - mean) / std
    assert any(not torch.allclose(dm.train_set[0][0], raw) for _ in range(10))


def test_cifar10_offline_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def offline(url: str, filename: str | os.PathLike) -> None:
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(ex.urllib.request, "urlretrieve", offline)
    dm = ex.CIFAR10DataModule(data_dir=str(tmp_path / "data"), dataset="cifar10")
    with pytest.raises(FileNotFoundError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert calls == [ex.CIFAR10_URL]
    assert str(tmp_path / "data" / "cifar-10-batches-py") in msg
    assert "data_batch_1" in msg and "data_dir" in msg and "offline" in msg
    assert not list((tmp_path / "data").glob("*.part"))  # no partial download left behind
    # download=False: the same guidance, and no network access at all.
    calls.clear()
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        ex.CIFAR10DataModule(data_dir=str(tmp_path), dataset="cifar10", download=False).setup("fit")
    assert calls == []


def test_cifar10_download_checks_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def corrupt(url: str, filename: str | os.PathLike) -> None:
        Path(filename).write_bytes(b"not the cifar archive")

    monkeypatch.setattr(ex.urllib.request, "urlretrieve", corrupt)
    with pytest.raises(RuntimeError, match=ex.CIFAR10_MD5):
        ex.CIFAR10DataModule(data_dir=str(tmp_path), dataset="cifar10").prepare_data()


# ---- LightningCLI ----------------------------------------------------------------------


def test_cli_help_shows_model_data_and_callback_arguments() -> None:
    r = run_cli("fit", "--help")
    assert r.returncode == 0, r.stderr
    for flag in ("--model.backbone", "--model.width", "--data.dataset", "--data.data_dir", "--trainer.callbacks"):
        assert flag in r.stdout, flag
    r = run_cli("fit", "--trainer.callbacks.help", "lightning_ncnnqat.QATCallback")
    assert r.returncode == 0, r.stderr
    # QATConfig's and ExportConfig's fields nest under `config` and `export`
    for arg in ("start_epoch", "config", "config.help", "export", "export.help", "example_input", "verbose"):
        assert f"--trainer.callbacks.{arg}" in r.stdout, arg


def test_cli_yaml_and_flag_forms_parse() -> None:
    r = run_cli("fit", "--config", str(CONFIG), "--print_config")
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    (cb,) = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("QATCallback")]
    assert cb["class_path"] == "lightning_ncnnqat.QATCallback"
    assert 0 < cb["init_args"]["start_epoch"] < cfg["trainer"]["max_epochs"]
    assert cb["init_args"]["export"]["dir"].startswith("runs/")
    assert cfg["data"]["dataset"] == "digits" and cfg["model"]["backbone"] in ex.BACKBONES
    assert cfg["trainer"]["enable_progress_bar"] is True

    r = run_cli(
        "fit", "--trainer.callbacks+=lightning_ncnnqat.QATCallback", "--trainer.callbacks.start_epoch=5", "--print_config"
    )
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    (cb,) = cfg["trainer"]["callbacks"]
    assert cb["class_path"] == "lightning_ncnnqat.QATCallback" and cb["init_args"]["start_epoch"] == 5


def test_cli_rejects_unknown_backbone() -> None:
    r = run_cli("fit", "--model.backbone=vgg", "--trainer.fast_dev_run=true")
    assert r.returncode != 0
    assert "resnet18" in r.stderr and "vgg" in r.stderr


@pytest.mark.slow
def test_cli_tiny_fit_with_qat_exports(tmp_path: Path) -> None:
    export_dir = tmp_path / "export"
    r = run_cli(
        "fit",
        "--seed_everything=0",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu",
        "--model.width=8",
        "--data.batch_size=16",
        "--trainer.callbacks+=lightning_ncnnqat.QATCallback",
        "--trainer.callbacks.start_epoch=1",
        f"--trainer.callbacks.export.dir={export_dir}",
        cwd=tmp_path,  # nothing may be written to the repository or need it as cwd
        timeout=600,  # the export runs the ARM targets under emulation where they are set up
    )
    assert r.returncode == 0, f"stdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    assert (tmp_path / "lightning_logs" / "version_0" / "config.yaml").is_file()
    files = {p.name for p in export_dir.iterdir()}
    assert "model.int8.param" in files and "model.int8.bin" in files, files
    assert "report.json" in files, files
    param = (export_dir / "model.int8.param").read_text()
    assert param.startswith("7767517") and "Convolution" in param
    # the callback found the datamodule's normalisation: the note gives it in ncnn's terms
    dm = ex.CIFAR10DataModule(seed=0)
    dm.setup("fit")
    note = (export_dir / "DEPLOY.md").read_text()
    assert f"{dm.preprocessing.mean_vals[0]:.6g}f" in note and "substract_mean_normalize" in note
    # re-export from the run's checkpoint with the example's datamodule: real validation samples
    # for the parity report, and the normalisation in ncnn's terms in DEPLOY.md
    (ckpt,) = (tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt")
    re_dir = tmp_path / "re"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-m", "lightning_ncnnqat", "export", str(ckpt), "--model", "examples.cifar10:CIFARClassifier",
         "--datamodule", "examples.cifar10:CIFAR10DataModule", "--export-dir", str(re_dir), "--quiet"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode in (0, 1), r.stderr[-3000:]  # 1: a layer flagged (a 2-epoch model); not an error
    report = json.loads((re_dir / "report.json").read_text())
    assert report["held_batch"]["n"] == 64 and "CIFAR10DataModule.val_dataloader()" in report["held_batch"]["source"]
    note = (re_dir / "DEPLOY.md").read_text()
    assert "substract_mean_normalize" in note and "PIXEL_RGB" in note
