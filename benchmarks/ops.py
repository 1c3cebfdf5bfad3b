"""Fake-quant op throughput against PyTorch's own fake-quant path and a clone() memory bound.

    python benchmarks/ops.py                         # CPU, all threads the machine gives
    python benchmarks/ops.py --device cuda           # GPU
    python benchmarks/ops.py --sizes 1M,16M --repeat 50

For each size N (float32 elements), side by side in one run:

* clone: ``x.clone()``, the memory bound (8 bytes moved per element: read + write);
* per-channel: ``ncnnqat.fake_quantize_per_channel`` on a weight-shaped [N/576, 64, 3, 3]
  tensor vs torch's path: ``torch.amax(|w|)`` per channel + ``torch.fake_quantize_per_channel_affine``;
* per-tensor (training: range update + quantize): ``ncnnqat.update_absmax_`` +
  ``ncnnqat.fake_quantize_per_tensor`` vs ``torch.fused_moving_avg_obs_fake_quant``;
* per-tensor backward: the clipped STE (``fake_quantize_per_tensor_backward``, a buffer range)
  vs a learned threshold's (``fake_quantize_per_tensor_threshold_backward``: the same STE plus
  the threshold's gradient, a float32 sum, in the same pass); "x ste" is their time ratio.

"% clone" is our op's bytes/s counting 12 bytes per element (read for the range, read + write
for the quantize) over clone's bytes/s counting 8: 100% means running at clone's bandwidth.
"x torch" is torch's time over ours. Times are medians over --repeat runs after --warmup runs
(CUDA: device events; inputs rotate among buffers so small sizes are not all L2 hits).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import lightning_ncnnqat.ops as ncnn_ops  # noqa: E402

GROUP = 576  # 64 * 3 * 3: one output channel of a 3x3 conv with 64 input channels
OUR_BYTES = 12
CLONE_BYTES = 8


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
    return int(float(text[:-1] if text[-1] in "KMG" else text) * mult)


def fmt_size(n: int) -> str:
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def time_it(fn: Callable[[int], object], device: str, warmup: int, repeat: int) -> float:
    """Median seconds of ``fn(i)`` (i = run index, to rotate inputs)."""
    for i in range(warmup):
        fn(i)
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for i in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for i in range(repeat):
            t0 = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_size(n: int, device: str, warmup: int, repeat: int) -> dict[str, float]:
    rows = max(1, n // GROUP)
    n = rows * GROUP
    # Rotate inputs on the GPU so that repeated runs are not served from L2 (about 50 MB).
    copies = max(1, min(4, (256 << 20) // (4 * n))) if device == "cuda" else 1
    gen = torch.Generator(device="cpu").manual_seed(0)
    xs = [(torch.randn(n, generator=gen) * 3).to(device) for _ in range(copies)]
    ws = [x.view(rows, 64, 3, 3) for x in xs]

    def pick(lst: list, i: int):  # noqa: ANN202
        return lst[i % len(lst)]

    res: dict[str, float] = {"n": n}
    res["clone"] = time_it(lambda i: pick(xs, i).clone(), device, warmup, repeat)

    res["pc_ours"] = time_it(
        lambda i: torch.ops.ncnnqat.fake_quantize_per_channel(pick(ws, i), rows, 8), device, warmup, repeat
    )
    zero_points = torch.zeros(rows, dtype=torch.int32, device=device)

    def torch_per_channel(i: int) -> torch.Tensor:
        w = pick(ws, i)
        absmax = torch.amax(torch.abs(w), dim=(1, 2, 3))
        scale = torch.clamp(absmax / 127.0, min=1e-12)
        return torch.fake_quantize_per_channel_affine(w, scale, zero_points, 0, -127, 127)

    res["pc_torch"] = time_it(torch_per_channel, device, warmup, repeat)

    running = torch.tensor([-1.0], device=device)

    def ours_per_tensor(i: int) -> torch.Tensor:
        x = pick(xs, i)
        torch.ops.ncnnqat.update_absmax_(x, running, 0.1)
        return torch.ops.ncnnqat.fake_quantize_per_tensor(x, running, 8)

    res["pt_ours"] = time_it(ours_per_tensor, device, warmup, repeat)
    on = torch.tensor([1], dtype=torch.long, device=device)
    rmin = torch.tensor([float("inf")], device=device)
    rmax = torch.tensor([float("-inf")], device=device)
    scale = torch.tensor([1.0], device=device)
    zp = torch.tensor([0], dtype=torch.int32, device=device)

    def torch_per_tensor(i: int) -> torch.Tensor:
        return torch.fused_moving_avg_obs_fake_quant(pick(xs, i), on, on, rmin, rmax, scale, zp, 0.1, -127, 127, 0,
                                                     False, True)

    res["pt_torch"] = time_it(torch_per_tensor, device, warmup, repeat)

    gys = [torch.randn(n, generator=gen).to(device) for _ in range(copies)]
    thr = torch.tensor([6.0], device=device)
    res["bwd_ste"] = time_it(
        lambda i: torch.ops.ncnnqat.fake_quantize_per_tensor_backward(pick(gys, i), pick(xs, i), thr, 8),
        device, warmup, repeat,
    )
    res["bwd_thr"] = time_it(
        lambda i: torch.ops.ncnnqat.fake_quantize_per_tensor_threshold_backward(pick(gys, i), pick(xs, i), thr, 8),
        device, warmup, repeat,
    )
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", default="64K,256K,1M,4M,16M,64M", help="comma separated, K/M/G suffixes")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=0, help="timed runs per measurement (default: by size)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: all the machine gives)")
    args = parser.parse_args()

    if args.device == "cpu":
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(args.threads or available)
        where = f"CPU, {torch.get_num_threads()} threads"
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/ops.py: --device cuda but torch.cuda.is_available() is False")
        where = f"{torch.cuda.get_device_name()} ({torch.version.cuda=})"
    status = ncnn_ops.STATUS
    compiled = status.cpu if args.device == "cpu" else status.cuda
    print(f"# {where}; torch {torch.__version__}; ncnnqat kernels: "
          f"{'compiled' if compiled else 'REFERENCE (' + status.reasons.get(args.device, '?') + ')'}")
    print(f"# median times in ms; '% clone' = our bytes/s ({OUR_BYTES} B/elem) over clone's ({CLONE_BYTES} B/elem)")
    header = (f"{'N':>6} {'clone':>8} {'GB/s':>7} | {'per-ch':>8} {'torch':>8} {'x torch':>7} {'% clone':>7} | "
              f"{'per-t':>8} {'torch':>8} {'x torch':>7} {'% clone':>7} | "
              f"{'ste-bwd':>8} {'thr-bwd':>8} {'x ste':>6}")
    print(header)
    print("-" * len(header))
    for text in args.sizes.split(","):
        n = parse_size(text)
        repeat = args.repeat or (50 if n <= (4 << 20) else 20)
        r = bench_size(n, args.device, args.warmup, repeat)
        clone_bw = CLONE_BYTES * r["n"] / r["clone"]
        ours_bw = lambda t: OUR_BYTES * r["n"] / t  # noqa: E731
        print(
            f"{fmt_size(n):>6} {r['clone'] * 1e3:8.3f} {clone_bw / 1e9:7.1f} | "
            f"{r['pc_ours'] * 1e3:8.3f} {r['pc_torch'] * 1e3:8.3f} {r['pc_torch'] / r['pc_ours']:7.2f} "
            f"{100 * ours_bw(r['pc_ours']) / clone_bw:6.0f}% | "
            f"{r['pt_ours'] * 1e3:8.3f} {r['pt_torch'] * 1e3:8.3f} {r['pt_torch'] / r['pt_ours']:7.2f} "
            f"{100 * ours_bw(r['pt_ours']) / clone_bw:6.0f}% | "
            f"{r['bwd_ste'] * 1e3:8.3f} {r['bwd_thr'] * 1e3:8.3f} {r['bwd_thr'] / r['bwd_ste']:6.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
