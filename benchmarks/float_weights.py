"""Float layers' weights in model.int8.bin: fp16 (ncnn2int8's) vs fp32, measured per target.

    python benchmarks/float_weights.py                                    # small models, main venv
    nice -n 10 .venv-zoo/bin/python benchmarks/float_weights.py --models regnet_x_400mf --targets x86

Per model: random weights, BatchNorm statistics from random data, ``prepare_qat`` (grouped convs
in float for the zoo models: ``quantize_grouped_convs=False``, so there are float layers to
store), a few training-mode forwards for the ranges, then ``export`` twice from the same QAT
model, ``float_weights="fp16"`` and ``"fp32"``. Printed per model and storage: int8 vs QAT
cosine / top-1 per target under ncnn's default options, the same on x86 with fp16 and packing
off (strict), the float32 floor (QAT model in float64 vs float32) and model.int8.bin's size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "examples"), str(ROOT / "tests")]

SMALL = ("resnet18_w16", "resnet18_w16_skip_ends", "mixednet_grouped_float", "mobilenetv2_x05_skip_ends")


def _ends(model: nn.Module) -> tuple[str, ...]:
    """The first conv and the last Linear: the layers users most often keep in float."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    fcs = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return (convs[0], fcs[-1])


def build(name: str) -> tuple[nn.Module, int, dict[str, Any]]:
    """(model, input size, QATConfig kwargs) for ``name``."""
    if name in SMALL:
        if name.startswith("mixednet"):
            from models import MixedNet

            return MixedNet(width=16), 32, {"quantize_grouped_convs": False}
        from cifar10 import build_backbone

        m = build_backbone("mobilenetv2", width_mult=0.5) if name.startswith("mobilenet") else build_backbone("resnet18", width=16)
        return m, 32, ({"skip": _ends(m)} if name.endswith("skip_ends") else {})
    import zoo

    source, size = zoo.MODELS[name]
    return zoo.build_model(name, source, Path(tempfile.mkdtemp())), size, {"quantize_grouped_convs": False}


def run(name: str, targets: list[str], held_n: int, workdir: Path) -> dict[str, Any]:
    import lightning_ncnnqat as lq
    import zoo
    from lightning_ncnnqat.qat.config import QATConfig

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model, size, cfg = build(name)
    zoo.warm_batchnorm(model, size, 4, g)
    example = torch.randn(1, 3, size, size, generator=g)
    plan = lq.prepare_qat(model, example, QATConfig(**cfg))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, size, size, generator=g))
    model.eval()
    held = torch.randn(held_n, 3, size, size, generator=g)
    row: dict[str, Any] = {"model": name, "size": size, "int8_layers": len(plan.layers),
                           "float_layers": sorted(plan.float_layers), "floor": zoo.float32_floor(model, held)}
    for fw in ("fp16", "fp32"):
        rep = lq.export(model, workdir / f"{name}_{fw}", example_input=example, held_batch=held, verbose=False,
                        timing_runs=0, layer_check_samples=1, check_onnx=False, targets=targets, float_weights=fw)
        r: dict[str, Any] = {"int8_bin": rep.sizes["int8_bin"]}
        for t, e in rep.runtime.items():
            a = e.get("int8_vs_qat") or {}
            a = a if isinstance(a, dict) else a.__dict__
            s = e.get("int8_vs_qat_strict") or {}
            r[t] = {"cos": a.get("cosine"), "top1": a.get("top1_agreement"), "strict_cos": s.get("cosine")}
        row[fw] = r
    return row


def _f(v: Any, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "-"


def table(rows: list[dict[str, Any]], targets: list[str]) -> str:
    head = "| model | float layers | storage | " + " | ".join(f"{t} cos (top-1)" for t in targets)
    head += " | x86 strict cos | float32 floor | int8 .bin bytes |"
    out = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        for fw in ("fp16", "fp32"):
            x = r[fw]
            cells = [f"{_f(x.get(t, {}).get('cos'), '.6f')} ({_f(100 * x[t]['top1'] if x.get(t, {}).get('top1') is not None else None, '.2f')}%)"
                     for t in targets]
            out.append(f"| {r['model']} | {len(r['float_layers'])} | {fw} | " + " | ".join(cells)
                       + f" | {_f(x.get('x86', {}).get('strict_cos'), '.6f')} | {r['floor']:.6f} | {x['int8_bin']} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(SMALL))
    ap.add_argument("--targets", default="x86,arm64-a53,arm64-a76", help="comma-separated export targets")
    ap.add_argument("--held", type=int, default=16, help="random images in the held batch")
    ap.add_argument("--out", default=None, help="also write the rows to this json file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    targets = args.targets.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ncnnqat_fw_") as tmp:
        for name in args.models:
            rows.append(run(name, targets, args.held, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows, targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
