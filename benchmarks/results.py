"""The README's results table: float vs QAT vs ncnn int8 vs a post-training baseline, per backbone.

    python benchmarks/results.py                          # embedded digits data, CPU, a few minutes
    python benchmarks/results.py --dataset cifar10 --data-dir data --accelerator gpu \
        --float-epochs 60 --qat-epochs 10 --resnet-width 64 --mbv2-width-mult 1.0

Per backbone, one fit: float epochs, then QAT (QATCallback) for the last epochs with its export.
The float model is snapshotted when QAT starts; the post-training baseline (PTQ) is that
snapshot with the same ranges calibrated (same moving average) on one pass of the training
data, without QAT, exported the same way. Accuracy is on the whole validation split, in PyTorch
and in the ncnn runtime (default options); times are ncnn per image on this machine.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import lightning.pytorch as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from examples.cifar10 import CIFAR10DataModule, CIFARClassifier  # noqa: E402
from lightning_ncnnqat import QATCallback, export, prepare_qat  # noqa: E402
from lightning_ncnnqat.export.ncnn_runtime import NcnnNet  # noqa: E402
from lightning_ncnnqat.prepare import input_quantizers  # noqa: E402


class SnapshotFloat(L.Callback):
    """Keeps a copy of the float network as it is when QAT starts (runs before QATCallback)."""

    def __init__(self, start_epoch: int) -> None:
        self.start_epoch = start_epoch
        self.net: torch.nn.Module | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: CIFARClassifier) -> None:
        if trainer.current_epoch == self.start_epoch:
            self.net = copy.deepcopy(pl_module.net).cpu().eval()


def _val_arrays(dm: CIFAR10DataModule) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[(x, y) for x, y in dm.val_dataloader()])
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def _torch_acc(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net = net.cpu().eval()
    pred = torch.cat([net(x[i : i + 256]).argmax(1) for i in range(0, len(x), 256)])
    return (pred == y).float().mean().item()


def _ncnn_acc(export_dir: str, kind: str, x: torch.Tensor, y: torch.Tensor) -> float:
    base = os.path.join(export_dir, f"model.{kind}")
    net = NcnnNet(base + ".param", base + ".bin", int8=kind == "int8")
    pred = net.run_batch(x.numpy()).argmax(1)
    return float((pred == y.numpy()).mean())


def run_backbone(args: argparse.Namespace, backbone: str) -> dict[str, object]:
    L.seed_everything(args.seed, workers=True)
    dm = CIFAR10DataModule(dataset=args.dataset, data_dir=args.data_dir, batch_size=args.batch_size)
    model = CIFARClassifier(backbone=backbone, width=args.resnet_width, width_mult=args.mbv2_width_mult, lr=args.lr)
    out = os.path.join(args.out, f"{args.dataset}_{backbone}")
    start = args.float_epochs
    snap = SnapshotFloat(start)
    qat = QATCallback(start_epoch=start, export_dir=os.path.join(out, "qat"), verbose=False)
    trainer = L.Trainer(
        max_epochs=start + args.qat_epochs,
        accelerator=args.accelerator,
        devices=1,
        callbacks=[snap, qat],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    t0 = time.time()
    trainer.fit(model, datamodule=dm)
    train_s = time.time() - t0
    x, y = _val_arrays(dm)

    # Post-training baseline: the float snapshot, ranges calibrated on the training data.
    ptq = copy.deepcopy(snap.net)
    prepare_qat(ptq, x[:1], qat.config)
    ptq.eval()
    for q in input_quantizers(ptq).values():
        q.train()  # only the ranges move; BN and everything else stay in eval mode
    with torch.no_grad():
        for xb, _ in dm.train_dataloader():
            ptq(xb)
    ptq.eval()
    export(ptq, os.path.join(out, "ptq"), example_input=x[:1], held_batch=x[: args.held], verbose=False,
           timing_runs=5)

    report = qat.export_report
    return {
        "backbone": backbone,
        "float_torch": _torch_acc(snap.net, x, y),
        "qat_torch": _torch_acc(model.net, x, y),
        "int8_ncnn": _ncnn_acc(os.path.join(out, "qat"), "int8", x, y),
        # the PTQ export's float32 ncnn model is the float snapshot (BN folded): the float model in ncnn
        "float_ncnn": _ncnn_acc(os.path.join(out, "ptq"), "ncnn", x, y),
        "ptq_int8_ncnn": _ncnn_acc(os.path.join(out, "ptq"), "int8", x, y),
        "fp32_ms": report.timing.get("float32_ms"),
        "int8_ms": report.timing.get("int8_ms"),
        "threads": report.timing.get("threads"),
        "n_val": len(y),
        "train_s": train_s,
        "int8_vs_qat_top1": report.int8_vs_qat.top1_agreement if report.int8_vs_qat else None,
    }


def table(rows: list[dict[str, object]], args: argparse.Namespace) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        f"{args.dataset}, {rows[0]['n_val']} validation images; float {args.float_epochs} epochs + QAT "
        f"{args.qat_epochs} epochs; ncnn {_ncnn_version()} on {cpu} ({torch.get_num_threads()} cores), "
        f"ncnn times at {rows[0]['threads']} thread(s). Command: `python benchmarks/results.py "
        + " ".join(sys.argv[1:]) + "`",
        "",
        "| backbone | float (PyTorch) | QAT (PyTorch, eval) | QAT int8 (ncnn) | float (ncnn) | PTQ int8 (ncnn) "
        "| ncnn fp32 ms/img | ncnn int8 ms/img |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        f = lambda v: f"{100 * v:.2f}%"  # noqa: E731
        lines.append(
            f"| {r['backbone']} | {f(r['float_torch'])} | {f(r['qat_torch'])} | {f(r['int8_ncnn'])} "
            f"| {f(r['float_ncnn'])} | {f(r['ptq_int8_ncnn'])} | {r['fp32_ms']:.3f} | {r['int8_ms']:.3f} |"
        )
    return "\n".join(lines)


def _ncnn_version() -> str:
    try:
        from importlib.metadata import version

        return version("ncnn")
    except Exception:  # pragma: no cover
        return "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["resnet18", "mobilenetv2"])
    p.add_argument("--dataset", default="digits", choices=["digits", "cifar10"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--float-epochs", type=int, default=7)
    p.add_argument("--qat-epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--resnet-width", type=int, default=32)
    p.add_argument("--mbv2-width-mult", type=float, default=0.5)
    p.add_argument("--held", type=int, default=64)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "results"))
    args = p.parse_args()
    rows = []
    for b in args.backbones:
        r = run_backbone(args, b)
        print(f"{b}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
              flush=True)
        rows.append(r)
    print()
    print(table(rows, args))


if __name__ == "__main__":
    main()
