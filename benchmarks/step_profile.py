"""Where a QAT training step spends its time, next to the float step (a tool for developers).

    python benchmarks/step_profile.py --device cuda [--batch 256] [--amp fp16]

Prints, for the float model and the QAT model (and with ``--ablate`` for QAT without its input
quantizers or without its weight quantizers): the step time, the host time to enqueue one
forward+backward while the GPU is kept busy (so the host never waits), the kernel time per step,
and the ops that cost the most host and device time. Every variant is timed before the first
profile: once the profiler has attached CUPTI, kernel launches stay slower for the whole process.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from examples.cifar10 import build_backbone  # noqa: E402
from lightning_ncnnqat import prepare_qat  # noqa: E402
from lightning_ncnnqat.qat import modules as M  # noqa: E402


def fwd_bwd(model, x, y, amp, scaler):  # noqa: ANN001
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        loss = F.cross_entropy(model(x), y)
    (scaler.scale(loss) if scaler is not None else loss).backward()


def step(model, opt, x, y, amp, scaler):  # noqa: ANN001
    opt.zero_grad(set_to_none=True)
    fwd_bwd(model, x, y, amp, scaler)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def timings(model, x, y, amp, args) -> tuple[float, float]:  # noqa: ANN001
    """Median step time and median host time to enqueue one forward+backward (seconds)."""
    dev = x.device.type
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(dev) if amp is torch.float16 else None
    for _ in range(3):
        step(model, opt, x, y, amp, scaler)
    sync(dev)
    ts = []
    for _ in range(args.rounds):
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(model, opt, x, y, amp, scaler)
        sync(dev)
        ts.append((time.perf_counter() - t0) / args.steps)
    host = []
    for _ in range(args.rounds):
        opt.zero_grad(set_to_none=True)
        sync(dev)
        if dev == "cuda":
            torch.cuda._sleep(int(2e8))  # keep the GPU busy: the host never waits on it
        t0 = time.perf_counter()
        fwd_bwd(model, x, y, amp, scaler)
        host.append(time.perf_counter() - t0)
        sync(dev)
    return statistics.median(ts), statistics.median(host)


def profile_step(name, model, x, y, amp, args, step_s: float, host_s: float) -> None:  # noqa: ANN001
    dev = x.device.type
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(dev) if amp is torch.float16 else None
    step(model, opt, x, y, amp, scaler)
    sync(dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(args.steps):
            step(model, opt, x, y, amp, scaler)
        sync(dev)
    ka = prof.key_averages()
    dev_total = sum(getattr(e, "self_device_time_total", 0) for e in ka) / args.steps
    print(f"\n=== {name}: step {step_s * 1e3:.2f} ms, host fwd+bwd enqueue "
          f"{host_s * 1e3:.2f} ms, kernel time {dev_total / 1e3:.2f} ms/step")
    print(ka.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if dev == "cuda":
        print(ka.table(sort_by="self_device_time_total", row_limit=args.rows))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--amp", default="fp16", choices=["none", "fp16", "bf16"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--ablate", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    amp = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.amp]
    m = build_backbone("resnet18", width=64).to(args.device).train()
    x = torch.randn(args.batch, 3, 32, 32, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    q = copy.deepcopy(m)
    prepare_qat(q, x[:1])
    variants = [("float", m, None), ("qat", q, None)]
    if args.ablate:
        variants += [("qat, no input quantizers", q, "input"), ("qat, no weight quantizers", q, "weight")]
    orig_iq, orig_w = M.InputQuantizer.forward, M._QATLayer.quantized_weight_bias

    def ablate(what: str | None) -> None:
        M.InputQuantizer.forward = (lambda self, x, update=True: x) if what == "input" else orig_iq
        M._QATLayer.quantized_weight_bias = M._QATLayer.folded_weight_bias if what == "weight" else orig_w

    results = {}
    for name, model, what in variants:  # all timings first, then the profiles
        ablate(what)
        results[name] = timings(model, x, y, amp, args)
    for name, model, what in variants:
        ablate(what)
        profile_step(name, model, x, y, amp, args, *results[name])
    ablate(None)

if __name__ == "__main__":
    main()
