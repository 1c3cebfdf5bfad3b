"""Does QAT beat ncnn's own post-training calibration? Every method on the same trained float model.

    apt-get install dataset-fashion-mnist     # once: Fashion-MNIST inside Debian's package (MIT)
    python benchmarks/results.py              # Fashion-MNIST, CPU, ~20 min on 2 shared cores
    python benchmarks/results.py --variants ma:range_init=first_batch kl-fixed:range_init=kl,ranges=fixed
    python benchmarks/results.py --qat-seeds 0 1 2 --variants ma:range_init=first_batch,ranges=moving_average \
        --out runs/results_seeds --float-from runs/results   # seeds on the cached float model
    python benchmarks/results.py --dataset cifar10 --data-dir data --accelerator gpu --image-size 32 \
        --float-epochs 50 --ft-epochs 5 --resnet-width 64 --mbv2-width-mult 1.0

Per backbone (cached in ``--out``, so re-runs with other variants re-use the float model):

1. the float model, trained ``--float-epochs`` (accuracy in PyTorch and, converted with pnnx, in
   ncnn float32);
2. the fine-tuned float baseline: that model trained ``--ft-epochs`` more at ``--ft-lr``
   without quantization (the same extra training QAT gets, so it is not counted as QAT's gain);
3. ncnn's real PTQ: ``ncnn2table`` (``--methods``: kl, aciq, eq) on the float ncnn model with
   ``--calib-samples`` training images (``.npy``, ``type=1``, ``thread=1``), then ``ncnn2int8``;
   a method that fails inside the tool is reported with its message;
4. the package's ``calibrate`` with the same method on the same inputs: its table (written as
   ncnn2table prints it) compared with the tool's, and its int8 model (through ncnn2int8);
5. QAT: the float model fine-tuned ``--ft-epochs`` at ``--ft-lr`` with
   ``QATCallback(start_epoch=0, config=QATConfig(...), export=ExportConfig(...))`` (the variant's fields split between them) for each ``--variants`` entry, exported; its int8
   model's accuracy on x86 and, on the first ``--arm-samples`` images, on the emulated
   Cortex-A53 / A76 (``python -m lightning_ncnnqat setup-arm``); int8 and float32 ms/img on x86.

With ``--qat-seeds S1 S2 ...`` steps 2 and 5 run once per seed on the same float model
(``seed_everything(S + 1)`` before each fit: batch order and augmentation); the table then gives
per-seed rows and mean / std / min per model, and the targets are checked on the mean and on the
worst seed. Every QAT variant is also compared image by image with the best ncnn2table model
and with the fine-tuned float (discordant counts, exact McNemar p, paired bootstrap 95% CI;
``benchmarks/results_stats.py``). Per-image predictions go to ``--out/preds_<backbone>.npz``.

Accuracy is top-1 on the validation images in the ncnn runtime (default options, 1 thread)
unless marked PyTorch. The targets (issue 12) are checked and printed under the table.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning.pytorch as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.results_data import DATASETS, SplitsDataModule, load_splits  # noqa: E402
from benchmarks.results_merge import load_runs  # noqa: E402
from benchmarks.results_ptq import ModelResult, float_ncnn, ncnn_accuracy, run_ptq, tools_present  # noqa: E402
from benchmarks.results_table import FT, paired_stats, render, seed_label, targets  # noqa: E402
from examples.cifar10 import CIFARClassifier  # noqa: E402
from lightning_ncnnqat import ExportConfig, QATCallback, QATConfig  # noqa: E402
from lightning_ncnnqat.ncnn.isolated import NcnnRuntimeError  # noqa: E402

DEFAULT_VARIANTS = [
    "ma:range_init=first_batch,ranges=moving_average",
    "kl-fixed:range_init=kl,ranges=fixed",
    "aciq-fixed:range_init=aciq,ranges=fixed",
    "kl-learned:range_init=kl,ranges=learned",
]


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME:key=value,key=value`` -> (NAME, QATCallback kwargs); values are Python literals
    or bare strings. Raises ValueError naming the spec."""
    name, _, rest = spec.partition(":")
    kw: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        k, eq, v = item.partition("=")
        if not eq:
            raise ValueError(f"--variants {spec!r}: {item!r} is not key=value")
        try:
            kw[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            kw[k.strip()] = v.strip()
    return name, kw


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def unsupported(kw: dict[str, Any]) -> list[str]:
    """Variant keywords that are neither QATConfig nor ExportConfig fields in this checkout (a
    variant that needs them is skipped)."""
    known = _fields(QATConfig) | _fields(ExportConfig)
    return [k for k in kw if k not in known]


def _trainer(args: argparse.Namespace, epochs: int, root: Path, callbacks: list) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs, accelerator=args.accelerator, devices=1, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(root),
    )


def _model(args: argparse.Namespace, backbone: str, lr: float, example: torch.Tensor) -> CIFARClassifier:
    m = CIFARClassifier(backbone=backbone, num_classes=10, width=args.resnet_width, width_mult=args.mbv2_width_mult,
                        lr=lr)
    m.example_input_array = example[:1].clone()
    return m


@torch.no_grad()
def torch_acc(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, np.ndarray]:
    """PyTorch top-1 on ``x`` and the predicted class per image ``[N]`` (int64)."""
    net = net.cpu().eval()
    pred = torch.cat([net(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return (pred == y).float().mean().item(), pred.numpy()


def _torch_row(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> ModelResult:
    acc, pred = torch_acc(net, x, y)
    return ModelResult(acc={"x86": acc}, pred=pred)


def _key(args: argparse.Namespace, backbone: str, *extra: object) -> str:
    fields = [args.dataset, args.image_size, args.train_samples, backbone, args.resnet_width, args.mbv2_width_mult,
              args.float_epochs, args.lr, args.batch_size, args.seed, *extra]
    return hashlib.sha1(repr(fields).encode()).hexdigest()[:10]


def trained(args: argparse.Namespace, backbone: str, dm: SplitsDataModule, work: Path, log) -> CIFARClassifier:
    """The float model after ``--float-epochs`` (state cached in ``work``)."""
    ex = dm.s.x_val
    path = work / f"float_{_key(args, backbone)}.pt"
    model = _model(args, backbone, args.lr, ex)
    if path.is_file() and not args.no_cache:
        model.net.load_state_dict(torch.load(path, weights_only=True))
        log(f"  float model from {path}")
        return model
    L.seed_everything(args.seed, workers=True)
    t0 = time.time()
    _trainer(args, args.float_epochs, work, []).fit(model, datamodule=dm)
    torch.save(model.net.state_dict(), path)
    log(f"  float training {time.time() - t0:.0f} s -> {path}")
    return model


def finetune(args: argparse.Namespace, backbone: str, float_model: CIFARClassifier, dm: SplitsDataModule, root: Path,
             callbacks: list, seed: int) -> tuple[CIFARClassifier, float]:
    """The float model trained ``--ft-epochs`` more at ``--ft-lr``.

    ``seed_everything(seed + 1)`` seeds the global RNGs the loader's shuffle and the
    augmentation draw from (``num_workers=0``), so one ``seed`` gives the fine-tuned float and
    every QAT variant the same batches, and another seed other batches."""
    model = _model(args, backbone, args.ft_lr, dm.s.x_val)
    model.net.load_state_dict(float_model.net.state_dict())
    L.seed_everything(seed + 1, workers=True)
    t0 = time.time()
    _trainer(args, args.ft_epochs, root, callbacks).fit(model, datamodule=dm)
    return model, time.time() - t0


def run_backbone(args: argparse.Namespace, backbone: str, dm: SplitsDataModule, log) -> dict[str, Any]:
    s = dm.s
    work = Path(args.out) / f"{args.dataset}_{backbone}"
    work.mkdir(parents=True, exist_ok=True)
    xv, yv = s.x_val.numpy(), s.y_val.numpy()
    xa, ya = xv[: args.arm_samples], yv[: args.arm_samples]
    rows: dict[str, ModelResult] = {}
    timing: dict[str, float] = {}
    seeds = list(args.qat_seeds or [args.seed])

    fm = trained(args, backbone, dm, work, log)
    rows["float (PyTorch)"] = _torch_row(fm.net, s.x_val, s.y_val)
    param, bin_ = float_ncnn(fm.net, s.x_val, work / "ptq")
    r = rows["float (ncnn fp32)"] = ModelResult()
    r.acc["x86"], r.ms_per_img, r.pred = ncnn_accuracy(param, bin_, xv, yv, time_runs=args.time_runs)
    log(f"  float: PyTorch {rows['float (PyTorch)'].acc['x86']:.4f}, ncnn {r.acc['x86']:.4f}")

    g = torch.Generator().manual_seed(args.seed + 2)
    x_cal = s.x_train[torch.randperm(len(s.x_train), generator=g)[: args.calib_samples]]
    ptq = run_ptq(fm.net, x_cal, xv, yv, work / "ptq", args.methods, args.eq_samples, args.tool_timeout, log)
    for k, v in ptq.items():
        kind, m = k.split("-", 1)
        rows[f"ncnn2table {m} + ncnn2int8" if kind == "tool" else f"calibrate {m} + ncnn2int8"] = v

    for seed in seeds:
        tag = "" if seed == args.seed else f"_s{seed}"  # the default seed keeps the earlier names and cache
        if len(seeds) > 1:
            log(f"  seed {seed}:")
        ft_path = work / f"ft_{_key(args, backbone, args.ft_epochs, args.ft_lr, *([seed] if tag else []))}.pt"
        ftm = _model(args, backbone, args.ft_lr, s.x_val)
        if ft_path.is_file() and not args.no_cache:
            ftm.net.load_state_dict(torch.load(ft_path, weights_only=True))
            log(f"  fine-tuned float from {ft_path}")
        else:
            ftm, timing[seed_label("fine-tune float s", seed, seeds)] = finetune(
                args, backbone, fm, dm, work / f"ft{tag}", [], seed)
            torch.save(ftm.net.state_dict(), ft_path)
        ft_row = rows[seed_label(FT, seed, seeds)] = _torch_row(ftm.net, s.x_val, s.y_val)
        log(f"  fine-tuned float: {ft_row.acc['x86']:.4f}")
        for spec in args.variants:
            name, kw = parse_variant(spec)
            _run_variant(args, backbone, name, kw, seed, seeds, tag, fm, dm, work, rows, timing, (xv, yv, xa, ya),
                         log)
    return {"backbone": backbone, "rows": rows, "timing": timing, "seeds": seeds, "y": yv}


def _run_variant(args: argparse.Namespace, backbone: str, name: str, kw: dict[str, Any], seed: int, seeds: list[int],
                 tag: str, fm: CIFARClassifier, dm: SplitsDataModule, work: Path, rows: dict[str, ModelResult],
                 timing: dict[str, float], data: tuple[np.ndarray, ...], log) -> None:
    """One QAT variant fine-tuned with ``seed``: its PyTorch and int8 rows (a failure is the row's error)."""
    xv, yv, xa, ya = data
    label = f"QAT {name}"
    torch_row, r = ModelResult(), ModelResult()
    rows[seed_label(f"{label} (PyTorch)", seed, seeds)] = torch_row
    rows[seed_label(f"{label} int8", seed, seeds)] = r
    missing = unsupported(kw)
    if missing:
        r.error = f"QATCallback has no {', '.join(missing)} in this checkout"
        log(f"  {label}: skipped, {r.error}")
        return
    export_dir = work / f"qat_{name}{tag}"
    try:
        export_kw = {"dir": str(export_dir), "targets": ["x86"], "held_batch_size": 64, "preflight": args.preflight}
        export_kw.update({k: v for k, v in kw.items() if k in _fields(ExportConfig)})
        config = QATConfig(**{k: v for k, v in kw.items() if k in _fields(QATConfig)})
        cb = QATCallback(start_epoch=0, config=config, export=ExportConfig(**export_kw), verbose=False)
        qm, timing[seed_label(f"{label} s", seed, seeds)] = finetune(
            args, backbone, fm, dm, work / f"qat_{name}{tag}_run", [cb], seed)
    except Exception as e:  # noqa: BLE001 - a failed variant is a row, not a crash
        r.error = f"{type(e).__name__}: {str(e)[:200]}"
        log(f"  {label}: failed, {r.error}")
        return
    torch_row.acc["x86"], torch_row.pred = torch_acc(qm.net, dm.s.x_val, dm.s.y_val)
    p, b = export_dir / "model.int8.param", export_dir / "model.int8.bin"
    if not b.is_file():
        r.error = f"no int8 model in {export_dir} (export failed; see report.json)"
        log(f"  {label}: PyTorch {torch_row.acc['x86']:.4f}, {r.error}")
        return
    try:
        r.acc["x86"], r.ms_per_img, r.pred = ncnn_accuracy(p, b, xv, yv, time_runs=args.time_runs)
        if args.arm_targets:
            r.acc["x86-arm-subset"] = float((r.pred[: len(ya)] == ya).mean())
        for t in args.arm_targets:
            r.acc[t], _, _ = ncnn_accuracy(p, b, xa, ya, target=t)
    except (NcnnRuntimeError, Exception) as e:  # noqa: BLE001 - e.g. ARM environment absent
        r.error = f"{type(e).__name__}: {str(e)[:200]}"
    log(f"  {label}: PyTorch {torch_row.acc['x86']:.4f}, int8 {r.acc} {r.error or ''}")


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options (``results_heldout.py`` adds its own to the same set)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["resnet18", "mobilenetv2"])
    p.add_argument("--dataset", default="fashion_mnist", choices=DATASETS)
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST idx folder / CIFAR-10's parent folder")
    p.add_argument("--image-size", type=int, default=16, help="Fashion-MNIST is resized (area) to this")
    p.add_argument("--train-samples", type=int, default=8000, help="balanced Fashion-MNIST training subset")
    p.add_argument("--val-samples", type=int, default=None, help="Fashion-MNIST test images (default: all 10000)")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--float-epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--ft-epochs", type=int, default=2, help="extra epochs of the fine-tuned float and of QAT")
    p.add_argument("--ft-lr", type=float, default=0.005)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--resnet-width", type=int, default=8)
    p.add_argument("--mbv2-width-mult", type=float, default=0.25)
    p.add_argument("--calib-samples", type=int, default=200, help="training images ncnn2table and calibrate read")
    p.add_argument("--methods", nargs="+", default=["kl", "aciq", "eq"])
    p.add_argument("--eq-samples", type=int, default=8,
                   help="inputs the tool's and calibrate's EQ read (slow: ~100 int8 runs per layer per sample)")
    p.add_argument("--tool-timeout", type=float, default=300.0, help="seconds per ncnn2table run")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                   help="QAT variants, NAME:key=value,... (QATCallback keywords)")
    p.add_argument("--preflight", action="store_true",
                   help="QATCallback(preflight=True) for every variant (default off: these backbones have no grouped "
                   "convs for it to re-plan, so it would only add time)")
    p.add_argument("--arm-samples", type=int, default=300, help="validation images run on the emulated ARM CPUs")
    p.add_argument("--arm-targets", nargs="*", default=["arm64-a53", "arm64-a76"])
    p.add_argument("--time-runs", type=int, default=50, help="timed ncnn inferences per model (1 thread)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0, help="data subsets, float training, calibration images")
    p.add_argument("--qat-seeds", type=int, nargs="+", default=None,
                   help="fine-tune the fine-tuned float and every QAT variant once per seed (seed_everything(S + 1): "
                   "batch order and augmentation) on the same float model; prints mean/std/min and checks the "
                   "targets on the mean and the worst seed (default: --seed only)")
    p.add_argument("--no-cache", action="store_true", help="retrain the float and fine-tuned float models")
    p.add_argument("--out", default=str(ROOT / "runs" / "results"))
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="run nothing: pool the seed rows of earlier runs' --out folders (same float model, different "
                   "--qat-seeds) into one table in --out; pass the runs' other options for the header")
    p.add_argument("--float-from", default=None,
                   help="another --out whose cached float / fine-tuned float models (float_*.pt, ft_*.pt, same "
                   "settings) are copied into --out first, so a new --out re-uses them")
    return p


def main() -> None:
    p = build_parser()
    args = p.parse_args()
    # absolute: QATCallback resolves a relative export_dir under the Trainer's default_root_dir
    args.out = str(Path(args.out).resolve())
    torch.set_num_threads(args.threads)
    for spec in args.variants:
        parse_variant(spec)  # fail early on a malformed spec
    if args.qat_seeds is not None and len(set(args.qat_seeds)) != len(args.qat_seeds):
        p.error(f"--qat-seeds must not repeat a seed, got {args.qat_seeds}")
    if args.float_from:
        _copy_cache(Path(args.float_from), Path(args.out), args)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    if args.merge:
        results = load_runs(args.merge)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for res in results:
            res["paired"] = paired_stats(res["rows"], res["y"], res["seeds"])
            res["targets"] = targets(res["rows"], res["seeds"])
        note = load_splits(args.dataset, args.data_dir, args.image_size, args.train_samples, args.val_samples,
                           args.seed).note
        wall = sum(v for r in results for v in r["timing"].values())
        print(_write(results, args, f"{note}; merged from {', '.join(args.merge)} (wall time: the training only)",
                     wall, out))
        return
    t0 = time.time()
    splits = load_splits(args.dataset, args.data_dir, args.image_size, args.train_samples, args.val_samples, args.seed)
    dm = SplitsDataModule(splits, args.batch_size)
    log(splits.note)
    results = []
    out = Path(args.out)
    for b in args.backbones:
        log(f"{b}:")
        res = run_backbone(args, b, dm, log)
        res["paired"] = paired_stats(res["rows"], res["y"], res["seeds"])
        res["targets"] = targets(res["rows"], res["seeds"])
        results.append(res)
        np.savez_compressed(out / f"preds_{b}.npz", y=res["y"],
                            **{k: r.pred for k, r in res["rows"].items() if r.pred is not None})
        text = _write(results, args, splits.note, time.time() - t0, out)  # each backbone's results as they come
    print()
    print(text)


def _write(results: list[dict[str, Any]], args: argparse.Namespace, note: str, wall_s: float, out: Path) -> str:
    """``out/results.md`` (the printed table) and ``out/results.json``; returns the table."""
    text = render(results, args, note, wall_s, _machine(), tools_present())
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(
        [{"backbone": r["backbone"], "timing": r["timing"], "seeds": r["seeds"],
          "rows": {k: v.as_json() for k, v in r["rows"].items()},
          "paired": [p.as_dict() for p in r["paired"]],
          "targets": [{"target": n, "passed": ok, "figures": f} for n, ok, f in r["targets"]]} for r in results],
        indent=1))
    return text


def _copy_cache(src: Path, dst: Path, args: argparse.Namespace) -> None:
    """Copy ``src/<dataset>_<backbone>/{float,ft}_*.pt`` into ``dst`` (the keys name the settings,
    so a model trained with other settings is never picked up). Raises FileNotFoundError when
    ``src`` has none of them."""
    n = 0
    for b in args.backbones:
        d = dst / f"{args.dataset}_{b}"
        d.mkdir(parents=True, exist_ok=True)
        for f in [*sorted((src / f"{args.dataset}_{b}").glob("float_*.pt")),
                  *sorted((src / f"{args.dataset}_{b}").glob("ft_*.pt"))]:
            if not (d / f.name).is_file():
                shutil.copy2(f, d / f.name)
            n += 1
    if n == 0:
        raise FileNotFoundError(f"--float-from {src}: no float_*.pt / ft_*.pt under {src}/{args.dataset}_<backbone>")


def _machine() -> str:
    try:
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        load = "?"
    try:
        from importlib.metadata import version

        ncnn_v = version("ncnn")
    except Exception:  # pragma: no cover
        ncnn_v = "?"
    return (f"{platform.machine()} {os.cpu_count()} cores, load average {load} at the end; torch "
            f"{torch.__version__} ({torch.get_num_threads()} thread(s)); ncnn {ncnn_v}")


if __name__ == "__main__":
    main()
