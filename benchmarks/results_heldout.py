"""Re-score a finished ``benchmarks/results.py`` run on Fashion-MNIST images it never used.

The benchmark trains on a balanced subset (``--train-samples``, 8000 of 60000) of Fashion-MNIST's
training split and calibrates on images of that subset, so the other 52000 training images are
as unseen as the 10000 test images. Six times more images narrow the paired 95% CI about
sqrt(6) times, enough to tell apart int8 models within ~0.1-0.2 points of each other. No
training: the saved models of the run(s) are scored again::

    python benchmarks/results_heldout.py --runs runs/results_seeds runs/results_seeds_b \\
        --variants ma:... aciq-fixed:... --out runs/results_heldout     # + the runs' data/model options

Scored per backbone: the float ncnn model and every ncnn2table + ncnn2int8 model (``ptq/``),
per seed the fine-tuned float (its cached ``ft_*.pt``, in PyTorch) and each QAT variant's int8
model (``qat_<name>[_s<seed>]/model.int8.*``), all in the ncnn runtime (x86, 1 thread) except
the PyTorch float. Paired statistics and the issue-12 targets as in the benchmark.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.results import _key, _model, _write, build_parser, parse_variant, torch_acc  # noqa: E402
from benchmarks.results_data import FASHION_FILES, FASHION_MNIST_DIR, _grey_to_input, _read_idx, _subset  # noqa: E402
from benchmarks.results_ptq import ModelResult, ncnn_accuracy  # noqa: E402
from benchmarks.results_table import FT, paired_stats, seed_label, targets  # noqa: E402


def heldout_images(data_dir: str | None, size: int, train_n: int, seed: int,
                   limit: int | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The training-split images outside the benchmark's training subset (same ``seed``),
    normalised with that subset's mean / std: float32 ``[N, 3, size, size]``, int64 labels ``[N]``."""
    root = Path(data_dir) if data_dir else FASHION_MNIST_DIR
    x, y = (_read_idx(root / f) for f in FASHION_FILES["train"])
    y = y.long()
    used = _subset(train_n, y, seed)
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[used] = False
    idx = torch.nonzero(rest).flatten()[:limit]
    x_used = _grey_to_input(x[used], size)
    mean, std = x_used.mean().item(), x_used.std().item()
    xh = (_grey_to_input(x[idx], size) - mean) / std
    note = (f"Fashion-MNIST ({root}), {size}x{size}: {len(idx)} held-out training-split images (not among the "
            f"{len(used)} the models were trained and calibrated on)")
    return xh, y[idx], note


def score(args: Any, runs: list[Path], backbone: str, x: torch.Tensor, y: torch.Tensor, log) -> dict[str, Any]:
    """The saved models of ``runs`` (same float model, disjoint seeds) on ``x``; rows as the benchmark's."""
    xv, yv = x.numpy(), y.numpy()
    rows: dict[str, ModelResult] = {}
    first = runs[0] / f"{args.dataset}_{backbone}"
    param, bin_ = first / "ptq" / "float.param", first / "ptq" / "float.bin"
    r = rows["float (ncnn fp32)"] = ModelResult()
    r.acc["x86"], _, r.pred = ncnn_accuracy(param, bin_, xv, yv)
    for m in args.methods:
        p = first / "ptq" / f"tool_{m}_int8.param"
        if p.is_file():
            r = rows[f"ncnn2table {m} + ncnn2int8"] = ModelResult()
            r.acc["x86"], _, r.pred = ncnn_accuracy(p, p.with_suffix(".bin"), xv, yv)
    log(f"  {backbone}: float + PTQ {[(k, rr.acc['x86']) for k, rr in rows.items()]}")
    seeds_of = {d: json.loads((d / "results.json").read_text()) for d in runs}
    seeds = [s for d in runs for res in seeds_of[d] if res["backbone"] == backbone for s in res["seeds"]]
    for d in runs:
        run_seeds = next(res["seeds"] for res in seeds_of[d] if res["backbone"] == backbone)
        work = d / f"{args.dataset}_{backbone}"
        for s in run_seeds:
            tag = "" if s == args.seed else f"_s{s}"
            ft = work / f"ft_{_key(args, backbone, args.ft_epochs, args.ft_lr, *([s] if tag else []))}.pt"
            m = _model(args, backbone, args.ft_lr, x)
            m.net.load_state_dict(torch.load(ft, weights_only=True))
            acc, pred = torch_acc(m.net, x, y)
            rows[seed_label(FT, s, seeds)] = ModelResult(acc={"x86": acc}, pred=pred)
            for spec in args.variants:
                name, _ = parse_variant(spec)
                p = work / f"qat_{name}{tag}" / "model.int8.param"
                r = rows[seed_label(f"QAT {name} int8", s, seeds)] = ModelResult()
                if not p.is_file():
                    r.error = f"no {p}"
                    continue
                r.acc["x86"], _, r.pred = ncnn_accuracy(p, p.with_suffix(".bin"), xv, yv)
            log(f"  {backbone} seed {s}: " + ", ".join(f"{k}: {rr.acc.get('x86')}" for k, rr in rows.items()
                                                    if k.endswith(f"[seed {s}]") or (len(seeds) == 1 and "QAT" in k)))
    return {"backbone": backbone, "rows": rows, "seeds": seeds, "y": yv, "timing": {}}


def main() -> None:
    p = build_parser()
    p.add_argument("--runs", nargs="+", required=True, help="--out folders of finished runs (disjoint --qat-seeds)")
    p.add_argument("--heldout-samples", type=int, default=None, help="score only the first N held-out images")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.arm_targets = []  # x86 only
    if args.dataset != "fashion_mnist":
        p.error("--dataset: held-out images exist only for fashion_mnist (the others use all their training images)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    t0 = time.time()
    x, y, note = heldout_images(args.data_dir, args.image_size, args.train_samples, args.seed, args.heldout_samples)
    log(note)
    results = []
    for b in args.backbones:
        res = score(args, [Path(d).resolve() for d in args.runs], b, x, y, log)
        res["paired"] = paired_stats(res["rows"], res["y"], res["seeds"])
        res["targets"] = targets(res["rows"], res["seeds"])
        results.append(res)
        np.savez_compressed(out / f"preds_{b}.npz", y=res["y"],
                            **{k: r.pred for k, r in res["rows"].items() if r.pred is not None})
        text = _write(results, args, f"{note}; models of {', '.join(args.runs)}", time.time() - t0, out)
    print(text)


if __name__ == "__main__":
    main()
