"""int8 vs float time of one ncnn MultiHeadAttention / SDPA layer (x86 by default).

    python benchmarks/attention_int8_speed.py [--target x86] [--threads 1] [--runs 20]

Builds each layer by hand (tests/attention_int8_cases.py: random weights, self-attention, no
mask), writes it in int8 as ``ncnn/int8_attention.py`` does and times both with the package's
isolated runner (median of ``--runs`` inferences after warm-up, best of two child processes).
Emulated ARM times say nothing about a device: use x86 or a real board.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

from attention_int8_cases import MhaCase, SdpaCase, mha_inputs, sdpa_inputs, write_model  # noqa: E402

from lightning_ncnnqat.ncnn.isolated import run_ncnn  # noqa: E402

#: (embed_dim, heads, tokens): a small ViT block, MobileViT-xxs-like and -xs-like widths.
SIZES = [(64, 2, 64), (128, 4, 256), (192, 4, 256)]


def _time(param: Path, bin_path: Path, x: dict, out: str, args: argparse.Namespace) -> float:
    opts = {"num_threads": args.threads}
    return min(run_ncnn(param, bin_path, x, [out], opts, target=args.target, time_runs=args.runs).info["time_ms"]
               for _ in range(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="x86")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    print("| layer | embed | heads | tokens | float ms | int8 ms | float / int8 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for e, h, n in SIZES:
        mha = MhaCase(embed=e, heads=h, seq_q=n, seq_k=n)
        sdpa = SdpaCase(heads=h, groups=h, seq_q=n, seq_k=n, dim=e // h, dim_v=e // h)
        for name in ("MultiHeadAttention", "SDPA"):
            rng = np.random.default_rng(0)
            with tempfile.TemporaryDirectory() as tmp:
                is_mha = name == "MultiHeadAttention"
                fp, fb, ip, ib = write_model(Path(tmp), mha if is_mha else None, None if is_mha else sdpa, rng)
                x = mha_inputs(mha, rng, 1, "a") if is_mha else sdpa_inputs(sdpa, rng, 1, "s")
                out = "a" if is_mha else "s"
                tf, ti = _time(fp, fb, x, out, args), _time(ip, ib, x, out, args)
            print(f"| {name} | {e} | {h} | {n} | {tf:.3f} | {ti:.3f} | {tf / ti:.2f} |")


if __name__ == "__main__":
    main()
