"""Deployment speed: ncnn int8 vs the float ncnn model of the same export, timed side by side.

    python benchmarks/deploy_speed.py --models cifar10-resnet18 results-mobilenetv2 silu-cnn
    python benchmarks/deploy_speed.py --export-dir runs/export            # an existing export
    python benchmarks/deploy_speed.py --models silu-cnn --swap --layers   # + swapped variant, per layer
    python benchmarks/deploy_speed.py --models main-resnet18 cifar10-mobilenetv2 --start   # QAT start's decision
    .venv-zoo/bin/python benchmarks/deploy_speed.py --zoo mobilenet_v2 resnet18

Per built model: random init (seed 0), ``prepare_qat``, a few QAT steps on random data, export
(x86 only). Then for every thread count the float (``model.ncnn.*``) and int8 (``model.int8.*``)
models are timed in ONE child process, alternating (A B B A ...), with ncnn's default options
except ``num_threads``: median ms with min/max, the speed-up float/int8 and a verdict
(``faster``/``slower`` beyond 3%, else ``tie``). ``--start``: also the model prepared the way the
QAT start does it (``prepare_qat(targets=["x86"])``, ``QATConfig(prefer="speed")``: the int8
layers that lose here kept float), exported and timed beside the others, with the seconds the
QAT start took and the layers it kept float. The machine is named (CPU model, load, ncnn
version). Random weights: the speed of a layer does not depend on its values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from lightning_ncnnqat import QATConfig, export, prepare_qat  # noqa: E402
from lightning_ncnnqat.ncnn.machine import machine_info  # noqa: E402
from lightning_ncnnqat.ncnn.timing import paired_speedup  # noqa: E402
from lightning_ncnnqat.policy.speed import speed_verdict  # noqa: E402
from lightning_ncnnqat.speed.activation_swap import DEFAULT_SWAPS, swap_activations  # noqa: E402
from lightning_ncnnqat.speed.segments import time_side_by_side  # noqa: E402
from lightning_ncnnqat.speed.plan import (  # noqa: E402
    count_chains,
    judge,
    measure_layers,
    plan_speed,
    whole_models,
)


class SiLUCNN(nn.Module):
    """A small SiLU CNN (stem, depthwise-separable and plain 3x3 blocks, linear head)."""

    def __init__(self, num_classes: int = 10, width: int = 32, in_ch: int = 3) -> None:
        super().__init__()
        c = width

        def cbs(cin: int, cout: int, k: int, s: int = 1, g: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(cout), nn.SiLU()]

        self.features = nn.Sequential(
            *cbs(in_ch, c, 3), *cbs(c, c, 3), *cbs(c, 2 * c, 3, 2), *cbs(2 * c, 2 * c, 3, 1, 2 * c),
            *cbs(2 * c, 2 * c, 1), *cbs(2 * c, 4 * c, 3, 2), *cbs(4 * c, 4 * c, 3),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build(name: str) -> tuple[nn.Module, int]:
    """A model by name and its input size (square, 3 channels)."""
    if name in ("cifar10-resnet18", "results-resnet18", "results-mobilenetv2", "cifar10-mobilenetv2", "main-resnet18"):
        from examples.cifar10 import build_backbone

        return {
            "main-resnet18": lambda: (build_backbone("resnet18", 10, width=16), 32),  # examples/qat.yaml
            "cifar10-resnet18": lambda: (build_backbone("resnet18", 10, width=64), 32),
            "cifar10-mobilenetv2": lambda: (build_backbone("mobilenetv2", 10, width_mult=1.0), 32),
            "results-resnet18": lambda: (build_backbone("resnet18", 10, width=8), 16),
            "results-mobilenetv2": lambda: (build_backbone("mobilenetv2", 10, width_mult=0.25), 16),
        }[name]()
    if name == "silu-cnn":
        return SiLUCNN(), 32
    if name.startswith("zoo:"):
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import zoo  # the zoo bench's list (torchvision / timm), run in .venv-zoo

        source, size = getattr(zoo, "ALL_MODELS", zoo.MODELS)[name[4:]]
        model = zoo.build_model(name[4:], source, Path("."))
        # random-init BN statistics shrink deep nets towards 0 once folded: the zoo bench's fix
        zoo.warm_batchnorm(model, size, 2, torch.Generator().manual_seed(0))
        return model, size
    raise ValueError(f"unknown model {name!r}")


def prepare_and_export(model: nn.Module, size: int, out: Path, steps: int, swap: bool,
                       skip: list[str] | None = None, prefer: str | None = None) -> dict[str, Any]:
    """Swap (optional), prepare (``skip``: layers kept float; ``prefer``: the QAT start's speed
    decision on this machine, else every layer int8), a few QAT steps on random data, export to
    ``out``; facts."""
    torch.manual_seed(0)
    info: dict[str, Any] = {}
    x = torch.randn(8, 3, size, size)
    if swap:
        info["swap"] = swap_activations(model, example_input=x[:1]).summary()
        _warm_bn(model, x)  # BN statistics of the new activations (random-init nets diverge otherwise)
    model.train()
    if prefer is None:
        prepare_qat(model, x[:1], QATConfig(skip=tuple(skip or ())))
    else:
        t0 = time.perf_counter()
        plan = prepare_qat(model, x[:1], QATConfig(prefer=prefer), targets=["x86"], verbose=True)  # its lines logged
        info["start_s"] = time.perf_counter() - t0
        info["kept_float"] = {n: r for n, r in plan.float_layers.items() if "for speed" in r}
        info["speed_note"] = plan.notes.get("(speed on x86)")
        model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    for _ in range(steps):
        out_t = logits(model(x))
        loss = nn.functional.cross_entropy(out_t, torch.randint(0, out_t.shape[-1], (x.shape[0],)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    rep = export(model, out, x[:1], x, verbose=False, targets=["x86"], timing_runs=0, check_onnx=False,
                 layer_check_samples=1)
    if rep.failures:
        raise RuntimeError(f"export of {out.name} failed: {rep.failures}")
    info["int8_vs_qat_cosine"] = rep.int8_vs_qat.cosine if rep.int8_vs_qat else None
    return info


def logits(out: Any) -> torch.Tensor:
    """The class scores in a model's train-mode output: the output itself when it is a tensor,
    else the first tensor inside it, depth first (a namedtuple such as torchvision's
    ``GoogLeNetOutputs`` / ``InceptionOutputs`` puts the main logits first, auxiliary heads after;
    a dict: its ``"out"`` or ``"logits"`` entry if present, else its first value). Raises
    TypeError naming the output's type when it holds no tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        items = [out[k] for k in ("out", "logits") if k in out] + list(out.values())
    elif isinstance(out, (tuple, list)):
        items = list(out)
    else:
        items = []
    for item in items:
        try:
            return logits(item)
        except TypeError:
            continue
    raise TypeError(f"deploy_speed: the model's train-mode output ({type(out).__name__}) holds no tensor to train on")


def _warm_bn(model: nn.Module, x: torch.Tensor) -> None:
    """Reset every BatchNorm's running statistics to those of ``x`` (cumulative average)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom


def machine() -> dict[str, Any]:
    """CPU model and features (/proc/cpuinfo), cores, load, ncnn and torch versions."""
    return {**machine_info(), "torch": torch.__version__}


def planned(name: str, steps: int, out: Path) -> tuple[Path | None, dict[str, Any]]:
    """The model re-prepared with the layers plan_speed(prefer="speed") keeps float, exported
    (None when every layer would be float: int8 does not pay there)."""
    model, size = build(name)
    torch.manual_seed(0)
    x = torch.randn(8, 3, size, size)
    prepare_qat(model, x[:1])
    model.train()
    model(x)
    model.eval()
    plan = plan_speed(model, x[:1], runs=20)
    if not plan.int8_pays:
        return None, {"keep_float": plan.keep_float, "plan_layers": plan.layers, "summary": plan.summary()}
    model, size = build(name)
    info = prepare_and_export(model, size, out, steps, False, plan.keep_float)
    info["keep_float"] = plan.keep_float
    info["plan_layers"] = plan.layers
    return out, info


def time_export(d: Path, threads: list[int | None], runs: int, warmup: int, plan_dir: Path | None = None
                ) -> list[dict[str, Any]]:
    """Float vs int8 of export ``d`` for each thread count (None: ncnn's default); with
    ``plan_dir`` also that export's int8 model (``int8_planned``), in the same interleaved run."""
    rows = []
    chains = count_chains((d / "model.int8.param").read_text())
    for th in threads:
        f, q = whole_models(d, th)
        extra = []
        if plan_dir is not None:
            extra = [dataclasses.replace(whole_models(plan_dir, th)[1], name="int8_planned")]
        # a copy of the first and the last model around them: no model gets a warm second run
        t = time_side_by_side([f, q, *extra], runs=runs, warmup=warmup)
        on = "cpu" if th == 1 else "wall"  # 1 thread: CPU time, immune to preemption on a busy machine
        rows.append({"threads": "default" if th is None else th, "float": asdict(t["float"]), "int8": asdict(t["int8"]),
                     "speedup": t["float"].median_ms / t["int8"].median_ms,
                     "speedup_cpu": t["float"].ms("cpu") / t["int8"].ms("cpu"),
                     "verdict": f"{judge(t['int8'], t['float'], on=on)} ({on})",
                     "chains": asdict(chains), "load_1min": os.getloadavg()[0]})
        rows[-1]["paired"] = paired_speedup(t["float"], t["int8"], on)  # per round, float_r / int8_r
        rows[-1]["on"] = on
        if extra:
            rows[-1]["paired_planned"] = paired_speedup(t["float"], t["int8_planned"], on)
            rows[-1]["verdict_planned"] = speed_verdict(rows[-1]["paired_planned"])
            rows[-1]["int8_planned"] = asdict(t["int8_planned"])
            rows[-1]["speedup_planned_cpu"] = t["float"].ms("cpu") / t["int8_planned"].ms("cpu")
            rows[-1]["chains_planned"] = asdict(count_chains((plan_dir / "model.int8.param").read_text()))
    return rows


def _ms(t: dict[str, Any]) -> str:
    return f"{t['median_ms']:.3f} [{t['min_ms']:.3f}-{t['max_ms']:.3f}]"


def _on(t: dict[str, Any], on: str) -> str:
    if on == "cpu" and t.get("cpu_median_ms") is not None:
        return f"{t['cpu_median_ms']:.3f} [{t['cpu_min_ms']:.3f}-{t['cpu_max_ms']:.3f}]"
    return _ms(t)


def start_table(results: list[dict[str, Any]]) -> str:
    """Markdown: float, every layer int8, and int8 as the QAT start planned it (prefer='speed')."""
    out = ["| model | threads | clock | float ms median [min-max] | int8 (all) | float/int8 | int8 (QAT start, "
           "prefer='speed') | float/int8 | verdict | kept float | start s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        st = r.get("start")
        for row in r["rows"]:
            if st is None or "int8_planned" not in row:
                continue
            on = row["on"]
            out.append(f"| {r['model']} | {row['threads']} | {on} | {_on(row['float'], on)} | {_on(row['int8'], on)} | "
                       f"{row['paired']:.2f}x | {_on(row['int8_planned'], on)} | {row['paired_planned']:.2f}x | "
                       f"{row['verdict_planned']} | {len(st['kept_float'])} | {st['start_s']:.1f} |")
    return "\n".join(out)


def table(results: list[dict[str, Any]]) -> str:
    """Markdown table: one row per model and thread count."""
    out = ["| model | threads | float wall ms median [min-max] | int8 wall ms median [min-max] | float/int8 wall | "
           "float/int8 CPU time | verdict | requantized / int8 convs | chain breakers |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for row in r["rows"]:
            c = row["chains"]
            br = ", ".join(f"{k} {v}" for k, v in sorted(c["breakers"].items())) or "-"
            out.append(f"| {r['model']} | {row['threads']} | {_ms(row['float'])} | {_ms(row['int8'])} | "
                       f"{row['speedup']:.2f}x | {row['speedup_cpu']:.2f}x | {row['verdict']} | {c['requantized']} / {c['int8_convs']} | {br} |")
    return "\n".join(out)


def layer_table(d: Path, runs: int) -> str:
    """Per int8 layer, alone, 1 thread: int8 vs float median CPU ms, slowest ratio first."""
    lts = measure_layers(d, threads=1, runs=runs)
    out = ["| layer | type | int8 CPU ms | of which quantize | float CPU ms | float/int8 | requantized in model |",
           "|---|---|---|---|---|---|---|"]
    for t in sorted(lts, key=lambda t: t.speedup):
        out.append(f"| {t.ncnn_name} | {t.type} {t.kernel}x{t.kernel} | {t.int8.ms('cpu'):.4f} | {t.quantize.ms('cpu') if t.quantize else float('nan'):.4f} | {t.float.ms('cpu'):.4f} | "
                   f"{t.speedup:.2f}x | {t.requantized} |")
    by_type: dict[str, list[float]] = {}
    for t in lts:
        key = f"{t.type} {t.kernel}x{t.kernel}" if t.type in ("Convolution", "ConvolutionDepthWise") else t.type
        by_type.setdefault(key, [0.0, 0.0])
        by_type[key][0] += t.int8.ms("cpu")
        by_type[key][1] += t.float.ms("cpu")
    out.append("")
    out += [f"- {k}: int8 {v[0]:.3f} ms vs float {v[1]:.3f} ms summed alone ({v[1] / v[0]:.2f}x)" for k, v in by_type.items()]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=[], help="cifar10-resnet18 cifar10-mobilenetv2 results-resnet18 "
                   "results-mobilenetv2 silu-cnn")
    p.add_argument("--zoo", nargs="*", default=[], help="zoo architectures by name (benchmarks/zoo.py; .venv-zoo)")
    p.add_argument("--export-dir", nargs="*", default=[], help="existing export directories to time")
    p.add_argument("--threads", nargs="+", default=["1", "2"], help="ncnn threads per timing; 'default' = ncnn's")
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--qat-steps", type=int, default=3)
    p.add_argument("--swap", action="store_true", help="also time each built model with swap_activations() applied")
    p.add_argument("--layers", action="store_true", help="also time every int8 layer alone (int8 vs float)")
    p.add_argument("--plan", action="store_true", help="also export each built model with the layers "
                   "plan_speed(prefer='speed') keeps float, timed beside the others")
    p.add_argument("--start", action="store_true", help="also export each built model prepared as the QAT start "
                   "does (prefer='speed' on x86), timed beside the others")
    p.add_argument("--work", default="deploy_speed_out", help="where exports go")
    p.add_argument("--out", default=None, help="write all results as JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    threads = [None if t == "default" else int(t) for t in a.threads]
    work = Path(a.work)
    jobs: list[tuple[str, Path | None, bool]] = [(str(d), Path(d), False) for d in a.export_dir]
    for name in a.models + [f"zoo:{z}" for z in a.zoo]:
        jobs.append((name, None, False))
        if a.swap:
            jobs.append((name, None, True))
    results = []
    for label, d, swap in jobs:
        try:
            res = _one(label, d, swap, a, threads, work)
        except Exception as e:  # noqa: BLE001 - one model's failure is recorded; the others still run
            print(f"{label}{' +swap' if swap else ''}: FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
            results.append({"model": label + (" +swap" if swap else ""), "error": f"{type(e).__name__}: {e}", "rows": []})
            continue
        if res is None:
            continue
        results.append(res)
        if a.out:  # after every model: a later failure keeps what was measured
            Path(a.out).write_text(json.dumps({"machine": machine(), "results": results}, indent=1, default=str))
        print("\n".join(table([res]).splitlines()[2:]), flush=True)
    _print_all(results, a)
    return 0


def _one(label: str, d: Path | None, swap: bool, a: argparse.Namespace, threads: list[int | None], work: Path
         ) -> dict[str, Any] | None:
    """Build (or read), export and time one model; None when a swap variant has nothing to swap."""
    info: dict[str, Any] = {}
    if d is None:
        model, size = build(label)
        label = label + (" +swap" if swap else "")
        d = work / label.replace(":", "_").replace(" +", "_")
        if swap and not any(type(m) in DEFAULT_SWAPS for m in model.modules()):
            print(f"{label}: no activation module to swap; skipped", flush=True)
            return None
        info = prepare_and_export(model, size, d, a.qat_steps, swap)
        info["input"] = [3, size, size]
    plan_dir = None
    if a.plan and not Path(label).exists():
        plan_dir, pinfo = planned(label.split(" +")[0], a.qat_steps, work / (d.name + "_planned"))
        info["plan"] = {"keep_float": pinfo["keep_float"], "layers": pinfo["plan_layers"]}
    elif a.start and not Path(label).exists() and not swap:
        model, size = build(label)
        plan_dir = work / (d.name + "_start")
        info["start"] = prepare_and_export(model, size, plan_dir, a.qat_steps, False, prefer="speed")
    res = {"model": label, "export_dir": str(d), **info, "rows": time_export(d, threads, a.runs, a.warmup, plan_dir)}
    if a.layers:
        res["layers_md"] = layer_table(d, max(10, a.runs // 2))
    return res


def _print_all(results: list[dict[str, Any]], a: argparse.Namespace) -> None:
    m = machine()
    print(f"\nmachine: {m['cpu']} ({', '.join(m['features'])}), {m['cpus']} cpus, load {m['load_1min']:.2f}, "
          f"ncnn {m['ncnn']}; {a.runs} interleaved runs per model, ncnn default options except num_threads\n")
    print(table(results))
    if any("start" in r for r in results):
        print("\nfloat/int8: median of per-round ratios (each int8 run against the float run beside it)\n")
        print(start_table(results))
    for r in results:
        if "swap" in r:
            print(f"\n{r['model']}: {r['swap']}")
        if "plan" in r:
            print(f"\n{r['model']}: plan_speed keeps float {len(r['plan']['keep_float'])} of {len(r['plan']['layers'])} "
                  f"int8 layers: {', '.join(r['plan']['keep_float']) or '-'}")
            for row in r["rows"]:
                if "int8_planned" in row:
                    q = row["int8_planned"]
                    print(f"  {row['threads']} thread(s): float/int8 CPU {row['speedup_cpu']:.2f}x, float/int8-planned CPU "
                          f"{row['speedup_planned_cpu']:.2f}x (int8-planned CPU {q['cpu_median_ms']:.3f} ms "
                          f"[{q['cpu_min_ms']:.3f}-{q['cpu_max_ms']:.3f}], requantized "
                          f"{row['chains_planned']['requantized']} / {row['chains_planned']['int8_convs']})")
        if "start" in r:
            st = r["start"]
            print(f"\n{r['model']}: QAT start (prefer='speed', x86) took {st['start_s']:.1f} s, kept float "
                  f"{len(st['kept_float'])}: {', '.join(st['kept_float']) or '-'}; {st['speed_note']}")
            for row in r["rows"]:
                if "int8_planned" in row:
                    print(f"  {row['threads']} thread(s): float/int8 {row['speedup_cpu']:.2f}x, float/int8 as the QAT start "
                          f"planned {row['speedup_planned_cpu']:.2f}x (CPU time medians)")
        if "layers_md" in r:
            print(f"\n{r['model']} per layer, alone, 1 thread:\n{r['layers_md']}")
        if "error" in r:
            print(f"\n{r['model']}: FAILED: {r['error'][:300]}")
    if a.out:
        Path(a.out).write_text(json.dumps({"machine": m, "results": results}, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
