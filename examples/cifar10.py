"""CIFAR-10 / digits image classification with ncnn quantization-aware training, via LightningCLI.

Run from the repository root::

    python examples/cifar10.py fit --config examples/qat.yaml
    python examples/cifar10.py fit --trainer.callbacks+=lightning_ncnnqat.QATCallback \\
        --trainer.callbacks.start_epoch=5
    python examples/cifar10.py fit --trainer.callbacks.help lightning_ncnnqat.QATCallback

The default data set (``--data.dataset=digits``) is scikit-learn's handwritten digits, which ships
inside the scikit-learn package, so the example runs offline. ``--data.dataset=cifar10`` reads the
standard python-pickle batches from ``--data.data_dir`` (downloading them when online).

The backbones are written here with plain ncnn-friendly ops only (conv, batch norm, ReLU/ReLU6,
``+``, global average pooling, flatten, linear) so that the whole network quantizes and exports.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

# Run from a checkout without `pip install -e .`: make `lightning_ncnnqat` (the callback's
# class path) importable. Appended, so an installed copy still takes precedence.
_REPO_ROOT = Path(__file__).resolve().parents[1]
if (_REPO_ROOT / "lightning_ncnnqat").is_dir() and str(_REPO_ROOT) not in sys.path:
    sys.path.append(str(_REPO_ROOT))

from lightning.pytorch import LightningDataModule, LightningModule  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from torchmetrics.classification import MulticlassAccuracy  # noqa: E402

from lightning_ncnnqat.preprocessing import Preprocessing  # noqa: E402

__all__ = [
    "BasicBlock",
    "ResNetCifar",
    "InvertedResidual",
    "MobileNetV2Cifar",
    "build_backbone",
    "CIFARClassifier",
    "CIFAR10DataModule",
    "BACKBONES",
    "DATASETS",
    "CIFAR10_URL",
    "CIFAR10_MD5",
    "main",
]

BACKBONES = ("resnet18", "mobilenetv2")
DATASETS = ("digits", "cifar10")

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


# --------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """Conv (no bias: the BN that follows has one) + BatchNorm2d."""
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(cout)]


def _init_weights(net: nn.Module) -> None:
    """He init for convs, unit BN, small normal for the classifier (torchvision's recipe)."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-bn, identity (or 1x1 conv-bn) shortcut, ReLU after the add."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(*_conv_bn(cin, cout, 1, stride))
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class ResNetCifar(nn.Module):
    """CIFAR-style ResNet: 3x3 stride-1 stem, no max-pool, four stages of BasicBlocks.

    ``blocks=(2, 2, 2, 2)`` is ResNet-18. Stage widths are ``width * (1, 2, 4, 8)``; ``width=64``
    is the usual model (11M parameters), 16-32 trains in minutes on a CPU.
    """

    def __init__(self, num_classes: int = 10, width: int = 64, blocks: tuple[int, ...] = (2, 2, 2, 2)) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"ResNetCifar: `width` must be >= 1, got {width!r}")
        self.stem = nn.Sequential(*_conv_bn(3, width, 3), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        cin = width
        for stage, n in enumerate(blocks):
            cout = width * 2**stage
            for i in range(n):
                layers.append(BasicBlock(cin, cout, stride=2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.pool(self.layers(self.stem(x)))))


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` without going below 90% (MobileNet rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (ReLU6), 3x3 depthwise (ReLU6), 1x1 linear project, ``+`` skip."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = cin * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [*_conv_bn(cin, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True)]
        layers += _conv_bn(hidden, cout, 1)
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2Cifar(nn.Module):
    """MobileNetV2 adjusted for 32x32 inputs: stride-1 stem and stride-1 second stage (32->4 px).

    ``width_mult`` scales every layer's channel count (rounded to multiples of 8), as in the paper.
    """

    # (expand ratio t, channels c, repeats n, first stride s); s of stage 2 is 1 instead of 2.
    CONFIG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"MobileNetV2Cifar: `width_mult` must be > 0, got {width_mult!r}")
        cin = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [*_conv_bn(3, cin, 3), nn.ReLU6(inplace=True)]
        for t, c, n, s in self.CONFIG:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers += [*_conv_bn(cin, last, 1), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(last, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


def build_backbone(name: str, num_classes: int = 10, width: int = 64, width_mult: float = 1.0) -> nn.Module:
    """Build a backbone by name: ``resnet18`` (uses ``width``) or ``mobilenetv2`` (uses ``width_mult``)."""
    if name == "resnet18":
        return ResNetCifar(num_classes, width)
    if name == "mobilenetv2":
        return MobileNetV2Cifar(num_classes, width_mult)
    raise ValueError(f"`backbone` must be one of {BACKBONES}, got {name!r}")


# --------------------------------------------------------------------------------------------
# LightningModule
# --------------------------------------------------------------------------------------------


class CIFARClassifier(LightningModule):
    """Image classifier for 3x32x32 inputs; the plain backbone is ``self.net`` (what gets exported).

    Args:
        backbone: ``resnet18`` or ``mobilenetv2``.
        num_classes: number of classes (10 for both digits and CIFAR-10).
        lr: peak learning rate; decays to 0 with a per-step cosine over the whole run.
        weight_decay: L2 penalty (SGD) or decoupled decay (AdamW).
        width: base channel count of ``resnet18`` (64 is the standard model).
        width_mult: channel multiplier of ``mobilenetv2``.
        momentum: SGD momentum (Nesterov).
        optimizer: ``sgd`` or ``adamw``.
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int = 10,
        lr: float = 0.05,
        weight_decay: float = 5e-4,
        width: int = 64,
        width_mult: float = 1.0,
        momentum: float = 0.9,
        optimizer: str = "sgd",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"`optimizer` must be 'sgd' or 'adamw', got {optimizer!r}")
        if lr <= 0:
            raise ValueError(f"`lr` must be > 0, got {lr!r}")
        self.save_hyperparameters()
        self.net = build_backbone(backbone, num_classes, width, width_mult)
        # Fixed-seed random input (not zeros: zeros would give the export's parity check and
        # activation ranges nothing to look at). Used for summaries, tracing and export.
        self.example_input_array = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, num_classes)``."""
        return self.net(x)

    def _loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self._loss(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", self._loss(logits, y), prog_bar=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.log("test_loss", self._loss(logits, y))
        self.log("test_acc", self.test_acc)

    def predict_step(self, batch: Tensor | tuple[Tensor, ...] | list[Tensor], batch_idx: int) -> Tensor:
        """Predicted class indices; accepts ``(x, y)`` batches or bare images."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=1)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # No weight decay on BN parameters and biases (the usual, slightly better recipe).
        decay = [p for p in self.parameters() if p.ndim > 1]
        no_decay = [p for p in self.parameters() if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if hp.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=True)
        else:
            opt = torch.optim.AdamW(groups, lr=hp.lr)
        # Cosine over the whole run (max_epochs x batches, respecting limit_train_batches),
        # stepped per batch so short runs still decay smoothly.
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class _ImageDataset(Dataset):
    """Images in [0, 1] (float) or uint8, ``(N, 3, 32, 32)``; normalised (and augmented) on access."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        pad: int = 0,
        flip: bool = False,
    ) -> None:
        self.images = images
        self.labels = labels.long()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.pad = pad
        self.flip = flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.images[i]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if self.pad:  # random crop with zero padding (translation by up to `pad` pixels)
            h, w = x.shape[-2:]
            x = F.pad(x, (self.pad,) * 4)
            dy, dx = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = x[:, dy : dy + h, dx : dx + w]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return (x - self.mean) / self.std, self.labels[i]


def _stratified_split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded stratified split of indices into (train, val)."""
    from sklearn.model_selection import train_test_split

    idx = torch.arange(len(labels)).numpy()
    tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=labels.numpy())
    return torch.as_tensor(tr).sort().values, torch.as_tensor(va).sort().values


def load_digits_32() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1797 handwritten digits as ``(N, 3, 32, 32)`` floats in [0, 1] and labels.

    The 8x8 images (values 0-16) are scaled to [0, 1], resized bilinearly to 32x32 and replicated
    to three channels so the CIFAR backbones apply unchanged.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    return x.expand(-1, 3, -1, -1).contiguous(), torch.as_tensor(d.target, dtype=torch.long)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_cifar_batches(folder: Path, names: tuple[str, ...] | list[str]) -> tuple[Tensor, Tensor]:
    """Read CIFAR-10 python-pickle batches into uint8 ``(N, 3, 32, 32)`` images and labels."""
    xs, ys = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        data = entry.get(b"data", entry.get("data"))
        labels = entry.get(b"labels", entry.get("labels"))
        if data is None or labels is None:
            raise ValueError(f"{folder / name} is not a CIFAR-10 batch (no 'data'/'labels' entries)")
        xs.append(torch.as_tensor(data, dtype=torch.uint8).reshape(-1, 3, 32, 32))
        ys.append(torch.as_tensor(labels, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


class CIFAR10DataModule(LightningDataModule):
    """Data for the example: the embedded ``digits`` set (default, offline) or ``cifar10``.

    Args:
        data_dir: where ``cifar-10-batches-py/`` lives or is downloaded to (default ``./data``);
            unused for ``digits``.
        dataset: ``digits`` (scikit-learn's 1797 8x8 digits, resized to 32x32; no download) or
            ``cifar10``.
        batch_size: batch size of every loader.
        num_workers: DataLoader worker processes.
        val_fraction: fraction held out for validation, stratified and seeded: of the 1797 digits,
            or of CIFAR-10's 50k training images. The digits test set is that validation split;
            CIFAR-10's test set is ``test_batch``.
        seed: seed of the split (fixed, independent of the training seed).
        augment: random crop with padding (4 px CIFAR-10, 2 px digits) and, for CIFAR-10 only,
            horizontal flips (flipping digits would change their meaning).
        download: download CIFAR-10 when the files are missing.

    Attributes:
        preprocessing: the input normalisation (:class:`~lightning_ncnnqat.preprocessing.Preprocessing`:
            ``Normalize(mean, std)`` on pixels / 255, RGB), known for CIFAR-10 from the start and for
            digits after ``setup()`` (the training split's statistics). It is saved in checkpoints
            (``state_dict``) and read by the export, which writes it in ncnn's terms
            (``mean_vals``/``norm_vals``) into DEPLOY.md.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        dataset: str = "digits",
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.2,
        seed: int = 0,
        augment: bool = True,
        download: bool = True,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"`dataset` must be one of {DATASETS}, got {dataset!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction!r}")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size!r}")
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers!r}")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir) if data_dir is not None else Path("data")
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.seed = seed
        self.augment = augment
        self.download = download
        self.train_set: _ImageDataset | None = None
        self.val_set: _ImageDataset | None = None
        self.test_set: _ImageDataset | None = None
        # Indices (into the full digits set / the 50k CIFAR-10 training images) of the split.
        self.train_indices: Tensor | None = None
        self.val_indices: Tensor | None = None
        self.preprocessing: Preprocessing | None = (
            Preprocessing(CIFAR10_MEAN, CIFAR10_STD) if dataset == "cifar10" else None
        )

    @property
    def cifar_folder(self) -> Path:
        return self.data_dir / CIFAR10_FOLDER

    def _cifar_present(self) -> bool:
        return all((self.cifar_folder / n).is_file() for n in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE))

    def _download_cifar10(self) -> None:
        """Fetch and extract the official tarball (md5-checked); clear error when offline."""
        hint = (
            f"CIFAR-10 not found in {self.cifar_folder}. Put the python version of CIFAR-10 there "
            f"(the folder '{CIFAR10_FOLDER}' with data_batch_1..5 and test_batch, extracted from "
            f"{CIFAR10_URL}), or pass --data.data_dir=DIR pointing to its parent"
        )
        if not self.download:
            raise FileNotFoundError(hint + " (download=False).")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        archive = self.data_dir / "cifar-10-python.tar.gz"
        if not archive.is_file() or _md5(archive) != CIFAR10_MD5:
            tmp = archive.with_suffix(".part")
            try:
                urllib.request.urlretrieve(CIFAR10_URL, tmp)
            except (urllib.error.URLError, OSError) as e:
                tmp.unlink(missing_ok=True)
                raise FileNotFoundError(f"{hint}. Downloading it failed (offline?): {e}") from e
            os.replace(tmp, archive)
        if (got := _md5(archive)) != CIFAR10_MD5:
            raise RuntimeError(f"{archive}: md5 {got} != expected {CIFAR10_MD5}; delete it and retry")
        with tarfile.open(archive, "r:gz") as tar:
            if sys.version_info >= (3, 12):
                tar.extractall(self.data_dir, filter="data")
            else:
                tar.extractall(self.data_dir)  # noqa: S202 (official archive, md5-verified)

    def prepare_data(self) -> None:
        if self.dataset == "cifar10" and not self._cifar_present():
            self._download_cifar10()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.dataset == "digits":
            x, y = load_digits_32()
            tr, va = self.train_indices, self.val_indices = _stratified_split(y, self.val_fraction, self.seed)
            mean, std = x[tr].mean().item(), x[tr].std().item()
            stats = ((mean,) * 3, (std,) * 3)
            # gray digits replicated to RGB: deploy with PIXEL_GRAY2RGB, or PIXEL_RGB on RGB pixels
            self.preprocessing = Preprocessing(*stats)
            self.train_set = _ImageDataset(x[tr], y[tr], *stats, pad=2 if self.augment else 0)
            self.val_set = _ImageDataset(x[va], y[va], *stats)
            self.test_set = self.val_set
        else:
            if not self._cifar_present():  # setup() without prepare_data() (e.g. used directly)
                self._download_cifar10()
            x, y = _read_cifar_batches(self.cifar_folder, CIFAR10_TRAIN_FILES)
            xt, yt = _read_cifar_batches(self.cifar_folder, (CIFAR10_TEST_FILE,))
            tr, va = self.train_indices, self.val_indices = _stratified_split(y, self.val_fraction, self.seed)
            stats = (CIFAR10_MEAN, CIFAR10_STD)
            self.train_set = _ImageDataset(x[tr], y[tr], *stats, pad=4 if self.augment else 0, flip=self.augment)
            self.val_set = _ImageDataset(x[va], y[va], *stats)
            self.test_set = _ImageDataset(xt, yt, *stats)

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints by Lightning: the normalisation, so an export from the checkpoint has it."""
        return {} if self.preprocessing is None else {"preprocessing": self.preprocessing.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("preprocessing") is not None:
            self.preprocessing = Preprocessing.from_dict(state_dict["preprocessing"])

    def _loader(self, ds: Dataset | None, shuffle: bool) -> DataLoader:
        if ds is None:
            raise RuntimeError("CIFAR10DataModule: call setup() before asking for a dataloader")
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(args: list[str] | None = None) -> LightningCLI:
    """``python examples/cifar10.py {fit,validate,test,predict} ...`` (LightningCLI)."""
    return LightningCLI(CIFARClassifier, CIFAR10DataModule, save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()
