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

    python benchmarks/ops.py --layers --threads 1 --rounds 3   # ncnn's dynamic int8 layers

``--layers`` times a training step's forward + backward of the int8 Gemm op
(``ops.fake_quantize_gemm``) against a float ``F.linear`` of the same shapes, and of a small
attention block: ``mha_int8_ste`` against ``nn.MultiheadAttention``, ``sdpa_int8_ste`` against
``F.scaled_dot_product_attention``. Each figure is the median of --repeat steps; the table is
measured --rounds times and shows min / median / max of those medians (a shared machine is noisy).
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

import torch.nn.functional as F  # noqa: E402

import lightning_ncnnqat.ops as ncnn_ops  # noqa: E402
from lightning_ncnnqat.ops import attention_reference  # noqa: E402

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


# (name, x shape, N): Linear layers on tokens as ConvNeXt / ViT blocks have them (K > 1040 in the last).
GEMM_CASES = [("gemm 96->384", (8, 196, 96), 384), ("gemm 384->96", (8, 196, 384), 96),
              ("gemm 1536->384", (8, 64, 1536), 384)]


def layer_steps(device: str) -> list[tuple[str, Callable[[int], object], Callable[[int], object]]]:
    """(name, float step, int8 step): forward + backward with a fixed random output gradient."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape: int, grad: bool = True) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device).requires_grad_(grad)

    steps = []
    for name, shape, n in GEMM_CASES:
        x, w, b, gy = rnd(*shape), rnd(n, shape[-1]), rnd(n), rnd(*shape[:-1], n, grad=False)
        steps.append((name, lambda i, x=x, w=w, b=b, gy=gy: F.linear(x, w, b).backward(gy),
                      lambda i, x=x, w=w, b=b, gy=gy: ncnn_ops.fake_quantize_gemm(x, w, b).backward(gy)))
    e, h, length = 64, 4, 64
    mha = torch.nn.MultiheadAttention(e, h, batch_first=True).to(device)
    ws = {"q_weight": mha.in_proj_weight[:e], "k_weight": mha.in_proj_weight[e:2 * e],
          "v_weight": mha.in_proj_weight[2 * e:], "out_weight": mha.out_proj.weight, "q_bias": mha.in_proj_bias[:e],
          "k_bias": mha.in_proj_bias[e:2 * e], "v_bias": mha.in_proj_bias[2 * e:], "out_bias": mha.out_proj.bias}
    xq, gq = rnd(8, length, e), rnd(8, length, e, grad=False)
    steps.append((f"MHA E{e} H{h} L{length}", lambda i: mha(xq, xq, xq, need_weights=False)[0].backward(gq),
                  lambda i: attention_reference.mha_int8_ste(xq, xq, xq, ws, h).backward(gq)))
    q, k, v, go = rnd(8, 4, length, 16), rnd(8, 4, length, 16), rnd(8, 4, length, 16), rnd(8, 4, length, 16, grad=False)
    steps.append((f"SDPA 4x{length}x16", lambda i: F.scaled_dot_product_attention(q, k, v).backward(go),
                  lambda i: attention_reference.sdpa_int8_ste(q, k, v).backward(go)))
    return steps


def run_layers(device: str, warmup: int, repeat: int, rounds: int) -> None:
    steps = layer_steps(device)
    got: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in steps}
    for _ in range(rounds):
        for name, f_float, f_int8 in steps:
            got[name].append((time_it(f_float, device, warmup, repeat), time_it(f_int8, device, warmup, repeat)))
    print(f"# fwd+bwd ms, min / median / max over {rounds} rounds (each a median of {repeat} steps)")
    header = f"{'layer':>18} | {'float':>20} | {'int8 (ncnnqat)':>20} | {'int8 / float':>18}"
    print(header)
    print("-" * len(header))

    def mmm(v: list[float], fmt: str) -> str:
        return "/".join(format(t, fmt) for t in (min(v), statistics.median(v), max(v)))

    for name, pairs in got.items():
        fl = [a * 1e3 for a, _ in pairs]
        q8 = [b * 1e3 for _, b in pairs]
        ratio = [b / a for a, b in pairs]
        print(f"{name:>18} | {mmm(fl, '.2f'):>20} | {mmm(q8, '.2f'):>20} | {mmm(ratio, '.2f'):>18}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", default="64K,256K,1M,4M,16M,64M", help="comma separated, K/M/G suffixes")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=0, help="timed runs per measurement (default: by size)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: all the machine gives)")
    parser.add_argument("--layers", action="store_true", help="time the dynamic int8 Gemm / attention layers")
    parser.add_argument("--rounds", type=int, default=3, help="--layers: how many times the table is measured")
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
    if args.layers:
        load = f"; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs" if hasattr(os, "getloadavg") else ""
        print(f"# ncnnqat {os.path.dirname(ncnn_ops.__file__)}{load}")
        run_layers(args.device, args.warmup, args.repeat or 20, args.rounds)
        return
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
