"""The results benchmark's own logic (fast, no training): variant specs, the idx reader, the
issue-12 target checks (one seed and several), the paired statistics (McNemar, bootstrap CI)
and table comparison that decide what the benchmark prints."""

from __future__ import annotations

import argparse
import gzip
import json
import math
import struct
import sys
from pathlib import Path

import numpy as np

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import parse_variant, unsupported  # noqa: E402
from benchmarks.results_data import _read_idx, _subset, load_fashion_mnist  # noqa: E402
from benchmarks.results_heldout import heldout_images  # noqa: E402
from benchmarks.results_merge import load_runs  # noqa: E402
from benchmarks.results_ptq import ModelResult, compare_tables  # noqa: E402
from benchmarks.results_stats import bootstrap_ci, mcnemar_exact, paired, seed_summary  # noqa: E402
from benchmarks.results_table import paired_stats, render, seed_label, targets  # noqa: E402


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


def _fake_fashion_mnist(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Idx files like Fashion-MNIST's in ``folder``: 40 training and 20 test images (random
    uint8 28x28, labels 0..9 cycling); returns the 40 training images and their labels."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.arange(40, dtype=torch.uint8) % 10
    for split, n in (("train", 40), ("t10k", 20)):
        _idx(folder / f"{split}-images-idx3-ubyte.gz", imgs[:n])
        _idx(folder / f"{split}-labels-idx1-ubyte.gz", labels[:n])
    return imgs, labels


def test_fashion_mnist_reader_on_idx_files(tmp_path: Path) -> None:
    imgs, labels = _fake_fashion_mnist(tmp_path)
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


def test_mcnemar_exact_is_the_binomial_tail() -> None:
    # b=8, c=2: 2 * P(Bin(10, 1/2) <= 2) = 2 * (1 + 10 + 45) / 1024
    assert mcnemar_exact(8, 2) == 2 * 56 / 1024
    assert mcnemar_exact(2, 8) == mcnemar_exact(8, 2)
    assert mcnemar_exact(0, 6) == 2 / 64
    assert mcnemar_exact(5, 5) == 1.0  # 2 * P(X <= 5) > 1: capped
    assert mcnemar_exact(0, 0) == 1.0
    # a large pair through exact integers: 2 * sum_{k<=30} C(90, k) / 2^90
    tail = sum(math.comb(90, k) for k in range(31))
    assert math.isclose(mcnemar_exact(60, 30), 2 * tail / 2**90, rel_tol=1e-12)
    assert 0.001 < mcnemar_exact(60, 30) < 0.005
    with pytest.raises(ValueError, match="b=-1"):
        mcnemar_exact(-1, 3)


def _pair(n: int, b: int, c: int, both: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image correctness of A and B with b images only A gets right, c only B, `both` both."""
    a = np.zeros(n, bool)
    o = np.zeros(n, bool)
    a[:b] = True
    o[b : b + c] = True
    a[b + c : b + c + both] = o[b + c : b + c + both] = True
    perm = np.random.default_rng(1).permutation(n)
    return a[perm], o[perm]


def test_paired_counts_pvalue_and_ci() -> None:
    a, o = _pair(2000, b=70, c=40, both=1500)
    r = paired(a, o, "QAT", "PTQ", "0")
    assert (r.b, r.c, r.n) == (70, 40, 2000)
    assert r.acc_a == 1570 / 2000 and r.acc_b == 1540 / 2000
    assert math.isclose(r.diff, 30 / 2000)
    assert r.p == mcnemar_exact(70, 40)
    lo, hi = r.ci
    assert lo < r.diff < hi
    # the bootstrap agrees with the Wald paired interval (n large): diff +- 1.96 sqrt(b + c - (b - c)^2 / n) / n
    half = 1.96 * math.sqrt(110 - 30**2 / 2000) / 2000
    assert abs(lo - (r.diff - half)) < 0.002 and abs(hi - (r.diff + half)) < 0.002
    assert paired(a, o, "QAT", "PTQ", "0").ci == r.ci  # fixed seed: reproducible
    with pytest.raises(ValueError, match="shapes"):
        paired(a, o[:10], "QAT", "PTQ", "0")


def test_paired_seed_means_and_no_discordance() -> None:
    a0, o = _pair(400, b=30, c=10, both=300)
    a1 = a0.copy()
    a1[np.flatnonzero(a0)[:20]] = False  # seed 1 loses 20 images seed 0 had
    r = paired(np.stack([a0, a1]), np.stack([o, o]), "QAT", "FT", "mean")
    assert r.b is None and r.c is None and r.p is None
    assert math.isclose(r.diff, ((a0.mean() + a1.mean()) / 2) - o.mean())
    assert r.ci[0] <= r.diff <= r.ci[1]
    same = paired(o, o, "A", "A", "0")
    assert (same.b, same.c, same.p, same.diff, same.ci) == (0, 0, 1.0, 0.0, (0.0, 0.0))
    assert bootstrap_ci(np.array([1.0, 1.0, 1.0])) == (1.0, 1.0)


def test_seed_summary() -> None:
    st = seed_summary([0.80, 0.82, 0.84])
    assert math.isclose(st["mean"], 0.82) and math.isclose(st["std"], 0.02) and st["min"] == 0.80
    assert seed_summary([0.5])["std"] == 0.0


def _seed_rows(y: np.ndarray) -> dict[str, ModelResult]:
    """Two seeds: QAT above PTQ on the mean, below it on seed 1; the fine-tuned float as given."""
    seeds = [0, 1]
    n = len(y)

    def row(k_right: int) -> ModelResult:
        pred = y.copy()
        pred[k_right:] = (y[k_right:] + 1) % 10
        return ModelResult(acc={"x86": k_right / n}, pred=pred)

    return {
        "ncnn2table kl + ncnn2int8": row(880),
        "ncnn2table aciq + ncnn2int8": row(870),
        seed_label("fine-tuned float (PyTorch)", 0, seeds): row(900),
        seed_label("QAT a int8", 0, seeds): row(900),
        seed_label("fine-tuned float (PyTorch)", 1, seeds): row(890),
        seed_label("QAT a int8", 1, seeds): row(875),
    }


def test_targets_on_mean_and_worst_seed() -> None:
    y = np.arange(1000) % 10
    rows = _seed_rows(y)
    got = {name: ok for name, ok, _ in targets(rows, [0, 1])}
    assert got["QAT a int8 >= best real PTQ, mean of 2 seeds"] is True  # 0.8875 >= 0.880
    assert got["QAT a int8 >= best real PTQ, worst seed"] is False  # seed 1: 0.875
    assert got["QAT a int8 >= fine-tuned float - 0.3 points, mean of 2 seeds"] is False  # 0.8875 < 0.895 - 0.003
    worst = "QAT a int8 >= fine-tuned float - 0.3 points, worst seed (vs that seed's fine-tuned float)"
    assert got[worst] is False  # seed 1: 0.875 vs 0.890
    rows[seed_label("QAT a int8", 1, [0, 1])] = ModelResult(error="boom")
    assert targets(rows, [0, 1])[0] == ("QAT a int8 on every seed", None, "no int8 result for seed(s) [1]")


def test_paired_stats_and_render() -> None:
    y = np.arange(1000) % 10
    rows = _seed_rows(y)
    ps = paired_stats(rows, y, [0, 1])
    assert [(p.b_name, p.seed) for p in ps] == [
        ("ncnn2table kl", "0"), ("ncnn2table kl", "1"), ("ncnn2table kl", "mean"),
        *[("fine-tuned float (PyTorch)", k) for k in ("0", "1", "mean")]]
    assert (ps[0].b, ps[0].c) == (20, 0) and (ps[1].b, ps[1].c) == (0, 5)  # nested right sets: no c / no b
    assert math.isclose(ps[2].diff, 0.0075) and math.isclose(ps[5].diff, -0.0075)
    args = argparse.Namespace(arm_samples=300, arm_targets=[], seed=0, float_epochs=1, lr=0.05, ft_epochs=1,
                              ft_lr=0.005, calib_samples=8, eq_samples=8, time_runs=0, variants=["a:"])
    res = {"backbone": "r", "rows": rows, "seeds": [0, 1], "paired": ps}
    text = render([res], args, "data", 60.0, "cpu", True)
    assert "| r | QAT a int8 | 2 | 88.75% | 1.77 | 87.50% | 90.00% | 0: 90.00%, 1: 87.50% |" in text
    assert "| r | QAT a int8 | ncnn2table kl | 0 | 90.00% | 88.00% | +2.00 | 20 | 0 |" in text
    assert "FAIL r: QAT a int8 >= best real PTQ, worst seed: seed 1: 87.50% vs 88.00%" in text


def _write_run(d: Path, rows: dict[str, ModelResult], seeds: list[int], y: np.ndarray) -> None:
    d.mkdir()
    (d / "results.json").write_text(json.dumps(
        [{"backbone": "r", "timing": {}, "seeds": seeds, "rows": {k: r.as_json() for k, r in rows.items()}}]))
    np.savez(d / "preds_r.npz", y=y, **{k: r.pred for k, r in rows.items() if r.pred is not None})


def test_merge_pools_seed_rows_of_two_runs(tmp_path: Path) -> None:
    y = np.arange(1000) % 10
    rows = _seed_rows(y)  # seeds 0 and 1
    later = {k.replace("[seed 0]", "[seed 2]").replace("[seed 1]", "[seed 3]"): r for k, r in rows.items()}
    _write_run(tmp_path / "a", rows, [0, 1], y)
    _write_run(tmp_path / "b", later, [2, 3], y)
    (m,) = load_runs([tmp_path / "a", tmp_path / "b"])
    assert m["seeds"] == [0, 1, 2, 3]
    assert list(m["rows"])[:2] == ["ncnn2table kl + ncnn2int8", "ncnn2table aciq + ncnn2int8"]
    assert list(m["rows"])[-1] == "QAT a int8 [seed 3]"
    assert np.array_equal(m["rows"]["QAT a int8 [seed 3]"].pred, rows["QAT a int8 [seed 1]"].pred)
    got = {name: fig for name, _, fig in targets(m["rows"], m["seeds"])}
    assert got["QAT a int8 >= best real PTQ, mean of 4 seeds"] == "88.75% vs 88.00% (ncnn2table kl)"
    with pytest.raises(ValueError, match=r"seed\(s\) \[0, 1\] already"):
        load_runs([tmp_path / "a", tmp_path / "a"])
    later["ncnn2table kl + ncnn2int8"] = ModelResult(acc={"x86": 0.5}, pred=y)
    _write_run(tmp_path / "c", later, [2, 3], y)
    with pytest.raises(ValueError, match="not the same float model"):
        load_runs([tmp_path / "a", tmp_path / "c"])


def test_heldout_images_are_the_training_split_minus_the_subset(tmp_path: Path) -> None:
    imgs, labels = _fake_fashion_mnist(tmp_path)
    s = load_fashion_mnist(tmp_path, 16, train_n=20, val_n=None, seed=3)
    x, y, note = heldout_images(str(tmp_path), 16, train_n=20, seed=3, limit=None)
    assert x.shape == (20, 3, 16, 16) and "20 held-out" in note
    both = torch.cat([s.x_train, x]).flatten(1)
    assert len(torch.unique(both, dim=0)) == 40  # together: every training image once
    assert sorted((torch.cat([s.y_train, y])).tolist()) == sorted(labels.long().tolist())
    rest = sorted(set(range(40)) - set(_subset(20, labels.long(), 3).tolist()))
    raw = torch.nn.functional.interpolate(imgs[rest].float().div(255).unsqueeze(1), size=(16, 16), mode="area")
    assert torch.allclose(x[:, :1] * s.std[0] + s.mean[0], raw, atol=1e-5)  # the subset's normalisation
    assert len(heldout_images(str(tmp_path), 16, 20, 3, limit=5)[0]) == 5
