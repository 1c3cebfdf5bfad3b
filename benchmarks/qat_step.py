"""QAT training step time over the float step time, same model and batch, measured side by side.

    python benchmarks/qat_step.py                      # CPU: CIFAR ResNet-18, batch 64
    python benchmarks/qat_step.py --device cuda        # GPU: batch 256, fp16 autocast

Float and QAT copies of the same model alternate in rounds, so drift of the machine hits both.
With ``--with-reference`` a second process repeats the QAT measurement with the pure-PyTorch
reference ops (LIGHTNING_NCNNQAT_FORCE_REFERENCE=1), to show what the compiled kernels buy.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from examples.cifar10 import build_backbone  # noqa: E402
from lightning_ncnnqat import prepare_qat  # noqa: E402
from lightning_ncnnqat.ops import STATUS  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _step(model, opt, x, y, amp: torch.dtype | None, scaler) -> None:  # noqa: ANN001
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()


def measure(args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    device = args.device
    batch = args.batch or (256 if device == "cuda" else 64)
    amp = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.amp or ("fp16" if device == "cuda" else "none")]
    float_model = build_backbone(args.model, width=args.width).to(device)
    qat_model = copy.deepcopy(float_model)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    prepare_qat(qat_model, x[:1])
    models = {"float": float_model.train(), "qat": qat_model.train()}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}
    scalers = {k: (torch.amp.GradScaler(device) if amp is torch.float16 else None) for k in models}
    for k, m in models.items():  # warm-up (and initialise the QAT ranges)
        for _ in range(args.warmup):
            _step(m, opts[k], x, y, amp, scalers[k])
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.rounds):
        for k, m in models.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                _step(m, opts[k], x, y, amp, scalers[k])
            _sync(device)
            times[k].append((time.perf_counter() - t0) / args.steps)
    f, q = statistics.median(times["float"]), statistics.median(times["qat"])
    return {"float_s": f, "qat_s": q, "ratio": q / f, "batch": batch, "amp": str(amp), "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="resnet18", choices=["resnet18", "mobilenetv2"])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=0, help="default: 64 on CPU, 256 on GPU")
    p.add_argument("--amp", choices=["none", "fp16", "bf16"], default=None, help="default: fp16 on GPU, none on CPU")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--with-reference", action="store_true", help="also time QAT with the pure-PyTorch ops")
    p.add_argument("--json", action="store_true", help="print one JSON line (used for --with-reference)")
    args = p.parse_args()
    r = measure(args)
    if args.json:
        print(json.dumps(r))
        return
    kernels = f"compiled cpu={STATUS.cpu} cuda={STATUS.cuda}"
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {r['threads']} threads"
    print(f"{args.model} width {args.width}, batch {r['batch']}, amp {r['amp']}, on {dev} ({kernels})")
    print(f"{'':<28}{'step (ms)':>10}{'vs float':>10}")
    print(f"{'float':<28}{r['float_s'] * 1e3:>10.1f}{1.0:>10.3f}")
    print(f"{'QAT (our kernels)':<28}{r['qat_s'] * 1e3:>10.1f}{r['ratio']:>10.3f}")
    if args.with_reference:
        cmd = [sys.executable, __file__, "--json"] + [a for a in sys.argv[1:] if a != "--with-reference"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                             env=dict(os.environ, LIGHTNING_NCNNQAT_FORCE_REFERENCE="1"))
        ref = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{'QAT (PyTorch reference ops)':<28}{ref['qat_s'] * 1e3:>10.1f}{ref['ratio']:>10.3f}  (own float run)")


if __name__ == "__main__":
    main()
