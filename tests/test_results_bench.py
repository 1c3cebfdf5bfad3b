"""The results benchmark's own logic (fast, no training): variant specs, the idx reader, the
issue-12 target checks and table comparison that decide what the benchmark prints."""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import parse_variant, unsupported  # noqa: E402
from benchmarks.results_data import _read_idx, _subset, load_fashion_mnist  # noqa: E402
from benchmarks.results_ptq import ModelResult, compare_tables  # noqa: E402
from benchmarks.results_table import targets  # noqa: E402


def test_parse_variant_literals_and_strings() -> None:
    name, kw = parse_variant("kl-learned:range_init=kl,ranges=learned,range_lr=1e-3,calibration_batches=4")
    assert name == "kl-learned"
    assert kw == {"range_init": "kl", "ranges": "learned", "range_lr": 1e-3, "calibration_batches": 4}
    assert parse_variant("ma") == ("ma", {})
    with pytest.raises(ValueError, match="not key=value"):
        parse_variant("bad:range_init")


def test_unsupported_names_unknown_callback_keywords() -> None:
    assert unsupported({"momentum": 0.2}) == []
    assert unsupported({"momentum": 0.2, "no_such_option": 1}) == ["no_such_option"]


def _idx(path: Path, arr: torch.Tensor) -> None:
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.numpy().tobytes())


def test_fashion_mnist_reader_on_idx_files(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.arange(40, dtype=torch.uint8) % 10
    for split, n in (("train", 40), ("t10k", 20)):
        _idx(tmp_path / f"{split}-images-idx3-ubyte.gz", imgs[:n])
        _idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels[:n])
    assert torch.equal(_read_idx(tmp_path / "train-images-idx3-ubyte.gz"), imgs)
    s = load_fashion_mnist(tmp_path, 16, train_n=20, val_n=None, seed=0)
    assert s.x_train.shape == (20, 3, 16, 16) and s.x_val.shape == (20, 3, 16, 16)
    assert torch.bincount(s.y_train, minlength=10).tolist() == [2] * 10  # balanced subset
    assert abs(s.x_train.mean().item()) < 1e-5 and abs(s.x_train.std().item() - 1) < 1e-4
    assert len(_subset(None, labels.long(), 0)) == 40
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "absent", 16, None, None, 0)


def test_targets_pass_and_fail() -> None:
    rows = {
        "fine-tuned float (PyTorch)": ModelResult(acc={"x86": 0.900}),
        "ncnn2table kl + ncnn2int8": ModelResult(acc={"x86": 0.880}),
        "ncnn2table eq + ncnn2int8": ModelResult(error="ncnn2table method=eq failed (SIGSEGV)"),
        "calibrate kl + ncnn2int8": ModelResult(acc={"x86": 0.881}, table_check="equal"),
        "calibrate aciq + ncnn2int8": ModelResult(acc={"x86": 0.87}, table_check="weights equal, 1/9 input rows differ"),
        "QAT a int8": ModelResult(acc={"x86": 0.898}),
        "QAT b int8": ModelResult(acc={"x86": 0.879}),
    }
    got = {name: ok for name, ok, _ in targets(rows)}
    assert got["QAT a int8 >= best real PTQ"] is True
    assert got["QAT a int8 >= fine-tuned float - 0.3 points"] is True  # 0.898 >= 0.897
    assert got["QAT b int8 >= best real PTQ"] is False
    assert got["QAT b int8 >= fine-tuned float - 0.3 points"] is False
    assert got["calibrate kl table == ncnn2table's (byte-identical)"] is True
    assert got["calibrate aciq table == ncnn2table's (byte-identical)"] is False


def test_compare_tables(tmp_path: Path) -> None:
    tool = "conv_param_0 10.0 20.0\nconv 5.000000\nfc_param_0 3.0\nfc 2.000000\n"
    (tmp_path / "t").write_text(tool)
    (tmp_path / "same").write_text(tool)
    (tmp_path / "near").write_text(tool.replace("fc 2.000000", "fc 2.000002"))
    assert compare_tables(tmp_path / "same", tmp_path / "t") == "equal"
    assert compare_tables(tmp_path / "near", tmp_path / "t") == "weights equal, 1/2 input rows differ, max rel 1e-06"
