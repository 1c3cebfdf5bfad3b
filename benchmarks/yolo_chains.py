"""YOLOv8n with chained activations: SiLU float vs swapped + QAT int8 (runs in .venv-zoo).

    PYTHONPATH=. nice -n 5 .venv-zoo/bin/python benchmarks/yolo_chains.py [--variants relu hardswish --runs 15]

YOLOv8n (ultralytics 8.4.x, random init from its yaml, offline), 3x320x320. One model is
prepared as it is (SiLU everywhere); each variant is the same initial weights prepared with
``QATConfig(chain_activations=variant)``: the one documented switch, which swaps every SiLU
module at QAT start. Each gets the same QAT forwards on random images (ranges set, BatchNorm
statistics taken from those batches through ``freeze_bn_after``, then frozen; random init
needs that, see ``benchmarks/zoo.py``'s ``warm_batchnorm``), and is exported for x86 in its
deployment form (decoded boxes and class scores).

Printed:
* the QAT summary's chain note and the exported int8 models' requantized convs;
* decoded-output parity of each int8 model vs its QAT model: the export report's worst-output
  cosine, its float32 floor and the report's verdict (``policy.output_failing``);
* speed: the SiLU float model, the SiLU int8 model and each variant's float and int8 models
  timed alternately in ONE child process, 1 thread, ncnn's default options, process CPU time
  median [min-max] (the shared machine inflates wall time); the headline is SiLU float / variant
  int8 (the issue's target: >= 1.5x).

Speed only for the swapped models' accuracy: random weights, no training task (the digits
benchmark, ``benchmarks/swap_digits.py``, measures what the swap costs in accuracy).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.append(str(p))

from deploy_speed import machine  # noqa: E402
from zoo import build_model  # noqa: E402

from lightning_ncnnqat import QATConfig, export, prepare_qat  # noqa: E402
from lightning_ncnnqat.policy import output_failing  # noqa: E402
from lightning_ncnnqat.qat.bn_fold import set_bn_stats_frozen  # noqa: E402
from lightning_ncnnqat.speed.chains import NOTE_KEY  # noqa: E402
from lightning_ncnnqat.speed.plan import count_chains, time_models, whole_models  # noqa: E402

SIZE = 320


def qat_and_export(model: torch.nn.Module, chain: str, out: Path, steps: int, held: torch.Tensor) -> dict[str, Any]:
    """prepare_qat with ``chain_activations=chain``, ``steps`` QAT forwards that set the ranges and
    the BatchNorm statistics, export (x86); the facts printed."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:  # statistics of the QAT batches (cumulative average), as warm_batchnorm does
        m.reset_running_stats()
        m.momentum = None
    model.train()
    plan = prepare_qat(model, held[:1], QATConfig(chain_activations=chain, freeze_bn_after=1))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(4, 3, SIZE, SIZE, generator=g))
    set_bn_stats_frozen(model)
    model.eval()
    rep = export(model, out, held[:1], held, verbose=False, targets=["x86"], timing_runs=0, check_onnx=False,
                 layer_check_samples=1)
    if rep.failures:
        raise RuntimeError(f"export of {out.name} failed: {rep.failures}")
    chains = count_chains((out / "model.int8.param").read_text())
    floor = rep.float32_floor
    return {
        "note": plan.notes.get(NOTE_KEY), "requantized": chains.requantized, "int8_convs": chains.int8_convs,
        "breakers": chains.breakers, "cosine": rep.int8_vs_qat.cosine, "float32_floor": floor,
        "outputs": [(o.blob, o.int8_vs_qat.cosine) for o in rep.outputs if o.int8_vs_qat is not None],
        "verdict": "FAIL" if output_failing(rep.int8_vs_qat.cosine, floor) else "pass", "report_ok": rep.ok,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["relu", "hardswish"], help="QATConfig.chain_activations values")
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--steps", type=int, default=6, help="QAT forwards (batch 4) before the export")
    p.add_argument("--work", default=None, help="where the exports go (default: a temporary directory)")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    torch.set_num_threads(1)
    work = Path(a.work or tempfile.mkdtemp(prefix="yolo_chains_"))
    torch.manual_seed(0)
    base = build_model("yolov8n", "ultralytics", work)
    held = torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    facts: dict[str, Any] = {}
    for chain in ["off", *a.variants]:
        facts[chain] = qat_and_export(copy.deepcopy(base), chain, work / chain, a.steps, held)
        f = facts[chain]
        print(f"[{chain}] chain note: {f['note']}")
        print(f"[{chain}] exported int8: {f['requantized']} of {f['int8_convs']} convs requantized, breakers "
              f"{f['breakers'] or '-'}; int8 vs QAT (decoded outputs, worst) cosine {f['cosine']:.6f}, float32 floor "
              f"{f['float32_floor'] if f['float32_floor'] is None else round(f['float32_floor'], 6)}: {f['verdict']}",
              flush=True)
    models = []
    for chain in facts:
        fm, qm = whole_models(work / chain, 1)
        models += [_renamed(fm, f"{chain}.float"), _renamed(qm, f"{chain}.int8")]
    t = time_models(models, runs=a.runs, warmup=3)
    mi = machine()
    print(f"\nYOLOv8n 3x{SIZE}x{SIZE}, 1 thread, {a.runs} interleaved runs; {mi['cpu']}, load {mi['load_1min']:.1f}, "
          f"ncnn {mi['ncnn']}")
    print("| model | CPU ms median [min-max] | SiLU float / this (CPU) | requantized / int8 convs |\n|---|---|---|---|")
    ref = t["off.float"].ms("cpu")
    for k, v in t.items():
        chain, kind = k.split(".")
        ch = f"{facts[chain]['requantized']} / {facts[chain]['int8_convs']}" if kind == "int8" else "-"
        label = ("SiLU" if chain == "off" else f"chain_activations={chain!r}") + f" {kind}"
        print(f"| {label} | {v.cpu_median_ms:.2f} [{v.cpu_min_ms:.2f}-{v.cpu_max_ms:.2f}] | {ref / v.ms('cpu'):.2f}x | {ch} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"facts": facts, "machine": mi,
                                            "timing_cpu_ms": {k: [v.cpu_median_ms, v.cpu_min_ms, v.cpu_max_ms]
                                                              for k, v in t.items()}}, indent=2, default=str))
    return 0


def _renamed(m: Any, name: str) -> Any:
    return dataclasses.replace(m, name=name)


if __name__ == "__main__":
    sys.exit(main())
