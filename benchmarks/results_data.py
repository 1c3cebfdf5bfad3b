"""Data for ``benchmarks/results.py``: Fashion-MNIST from Debian's package, digits, CIFAR-10.

Fashion-MNIST (Zalando, MIT licence; 60k train / 10k test 28x28 grey images of 10 clothing
classes) ships inside Debian's ``dataset-fashion-mnist`` package as the original idx files::

    apt-get install dataset-fashion-mnist      # -> /usr/share/datasets/fashion-mnist/*.gz

Nothing is downloaded at run time. It is used here because int8 matters on it: small CNNs
reach about 90%, with many near-confusable classes (shirt / T-shirt / pullover / coat), so a
coarse activation range costs accuracy, unlike the embedded 8x8 digits (every method at 99%).

Every dataset comes as normalised float32 ``[N, 3, S, S]`` tensors (grey images replicated to
three channels so the CIFAR backbones apply unchanged) and int64 labels.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
DATASETS = ("fashion_mnist", "digits", "cifar10")


@dataclass
class Splits:
    """Normalised float32 images ``[N, 3, S, S]`` and int64 labels, plus the normalisation used."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment_pad: int
    flip: bool
    note: str


def _read_idx(path: Path) -> Tensor:
    """An idx file (gzipped or not) as a uint8 tensor of its shape (MNIST's format)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not a uint8 idx file (header {zero:#x} {dtype:#x})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).reshape(shape)


def _grey_to_input(x: Tensor, size: int) -> Tensor:
    """uint8 ``[N, H, W]`` -> float ``[N, 3, size, size]`` in [0, 1] (area resize when smaller)."""
    x = x.float().div_(255.0).unsqueeze(1)
    if x.shape[-1] != size:
        mode = "area" if size < x.shape[-1] else "bilinear"
        x = F.interpolate(x, size=(size, size), mode=mode).clamp_(0.0, 1.0)
    return x.expand(-1, 3, -1, -1).contiguous()


def _subset(n: int | None, y: Tensor, seed: int) -> Tensor:
    """Seeded class-balanced subset of ``n`` indices (all when ``n`` is None or too large)."""
    if n is None or n >= len(y):
        return torch.arange(len(y))
    g = torch.Generator().manual_seed(seed)
    classes = y.unique()
    per = n // len(classes)
    idx = [torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)[:per]] for c in classes]
    return torch.cat(idx).sort().values


def load_fashion_mnist(data_dir: str | Path | None, size: int, train_n: int | None, val_n: int | None,
                       seed: int) -> Splits:
    """Fashion-MNIST's train split (a balanced subset of ``train_n``) and test split (``val_n``).

    Raises FileNotFoundError with the install command when the idx files are absent.
    """
    root = Path(data_dir) if data_dir else FASHION_MNIST_DIR
    paths = {k: [root / f for f in v] for k, v in FASHION_FILES.items()}
    missing = [str(p) for v in paths.values() for p in v if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST idx files not found: {', '.join(missing)}. Install Debian's package "
            "(`apt-get install dataset-fashion-mnist`, files in /usr/share/datasets/fashion-mnist) or pass "
            "--data-dir pointing to a folder holding the four *-ubyte.gz files"
        )
    xtr, ytr = (_read_idx(p) for p in paths["train"])
    xte, yte = (_read_idx(p) for p in paths["test"])
    ytr, yte = ytr.long(), yte.long()
    tr, te = _subset(train_n, ytr, seed), _subset(val_n, yte, seed + 1)
    x_train, x_val = _grey_to_input(xtr[tr], size), _grey_to_input(xte[te], size)
    mean, std = x_train.mean().item(), x_train.std().item()
    return Splits(
        (x_train - mean) / std, ytr[tr], (x_val - mean) / std, yte[te], (mean,) * 3, (std,) * 3,
        augment_pad=2, flip=True,
        note=f"Fashion-MNIST ({root}), {size}x{size}, {len(tr)} training images of 60000, "
        f"{len(te)} test images of 10000",
    )


def load_example_data(dataset: str, data_dir: str | None, seed: int) -> Splits:
    """digits / CIFAR-10 through the example's datamodule (its split, its normalisation)."""
    from examples.cifar10 import CIFAR10DataModule

    dm = CIFAR10DataModule(data_dir=data_dir, dataset=dataset, augment=False, seed=0)
    dm.prepare_data()
    dm.setup("fit")
    val = dm.val_set if dataset == "digits" else dm.test_set

    def stack(ds: Dataset) -> tuple[Tensor, Tensor]:
        xs, ys = zip(*[ds[i] for i in range(len(ds))])
        return torch.stack(xs), torch.stack(ys)

    xtr, ytr = stack(dm.train_set)
    xva, yva = stack(val)
    pre = dm.preprocessing
    return Splits(xtr, ytr, xva, yva, tuple(pre.mean), tuple(pre.std),
                  augment_pad=2 if dataset == "digits" else 4, flip=dataset == "cifar10",
                  note=f"{dataset}: {len(ytr)} training, {len(yva)} validation images (the example's split)")


def load_splits(dataset: str, data_dir: str | None, size: int, train_n: int | None, val_n: int | None,
                seed: int) -> Splits:
    if dataset == "fashion_mnist":
        return load_fashion_mnist(data_dir, size, train_n, val_n, seed)
    if dataset in ("digits", "cifar10"):
        return load_example_data(dataset, data_dir, seed)
    raise ValueError(f"`dataset` must be one of {DATASETS}, got {dataset!r}")


class _Augmented(Dataset):
    """Normalised images; random translation by up to ``pad`` pixels (zero = the normalised 0
    pixel's value) and optional horizontal flips, on access."""

    def __init__(self, x: Tensor, y: Tensor, pad: int, flip: bool, fill: Tensor) -> None:
        self.x, self.y, self.pad, self.flip, self.fill = x, y, pad, flip, fill.view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.x[i]
        if self.pad:
            h, w = x.shape[-2:]
            x = F.pad(x - self.fill, (self.pad,) * 4) + self.fill
            dy, dx = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = x[:, dy : dy + h, dx : dx + w]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.y[i]


class SplitsDataModule(LightningDataModule):
    """Lightning loaders over :class:`Splits`; ``preprocessing`` is the export's normalisation."""

    def __init__(self, splits: Splits, batch_size: int, augment: bool = True) -> None:
        super().__init__()
        from lightning_ncnnqat import Preprocessing

        self.s = splits
        self.batch_size = batch_size
        self.augment = augment
        self.preprocessing = Preprocessing(splits.mean, splits.std)

    def train_dataloader(self) -> DataLoader:
        s = self.s
        fill = -torch.tensor(s.mean) / torch.tensor(s.std)  # a black pixel, normalised
        ds = _Augmented(s.x_train, s.y_train, s.augment_pad if self.augment else 0, s.flip and self.augment, fill)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(torch.utils.data.TensorDataset(self.s.x_val, self.s.y_val), batch_size=256)
