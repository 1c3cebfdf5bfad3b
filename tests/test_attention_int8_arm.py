"""ncnn's int8 MultiHeadAttention and SDPA on the emulated aarch64 targets (the pip wheel's
aarch64 build under qemu) against ops/attention_reference.py.

Cortex-A53 (default options) and Cortex-A76 with the fp16 options off match the reference to
float32 rounding, as x86 does; the A76 under its default options (fp16 storage and arithmetic)
departs by fp16 rounding, measured here: cosine >= 0.9999 and under 2 steps of absmax/127.
Skipped (or failed under LIGHTNING_NCNNQAT_REQUIRE_ARM=1) where the targets are not set up.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from attention_int8_cases import (
    FP32_OPTIONS,
    MhaCase,
    SdpaCase,
    agreement,
    assert_matches,
    float_reference,
    mha_inputs,
    mha_reference,
    sdpa_inputs,
    sdpa_reference,
    write_model,
)
from lightning_ncnnqat.ncnn.isolated import run_ncnn
from lightning_ncnnqat.ncnn.targets import SETUP_COMMAND, environment_problem

_problem = environment_problem()
if _problem is not None and os.environ.get("LIGHTNING_NCNNQAT_REQUIRE_ARM") == "1":
    raise RuntimeError(f"LIGHTNING_NCNNQAT_REQUIRE_ARM=1 but {_problem}")
pytestmark = pytest.mark.skipif(_problem is not None, reason=f"{_problem}; run `{SETUP_COMMAND}`")


def _one_net(tmp_path: Path, seed: int):
    """One net with a cross-attention MHA (3 heads, 2-D mask) and a grouped SDPA (per-head mask):
    one emulated run covers both layers."""
    rng = np.random.default_rng(seed)
    mha = MhaCase(embed=24, heads=3, seq_q=6, seq_k=5, kdim=8, vdim=16, mask=2)
    sdpa = SdpaCase(heads=4, groups=2, seq_q=5, seq_k=7, dim=8, dim_v=12, mask=3)
    paths = write_model(tmp_path, mha, sdpa, rng)
    x = {**mha_inputs(mha, rng, 3, "a"), **sdpa_inputs(sdpa, rng, 3, "s")}
    return paths, x, {"a": mha_reference(mha, x, "a"), "s": sdpa_reference(sdpa, x, "s")}, float_reference(mha, sdpa, x)


@pytest.mark.parametrize(
    "target, options", [("arm64-a53", {}), ("arm64-a76", FP32_OPTIONS)], ids=["a53-default", "a76-fp32"]
)
def test_attention_int8_matches_reference_on_arm(target: str, options: dict, tmp_path: Path) -> None:
    (_, _, ip, ib), x, ref, flt = _one_net(tmp_path, 1)
    got = run_ncnn(ip, ib, x, ["a", "s"], options, target=target).outputs
    for blob, what in (("a", "MultiHeadAttention"), ("s", "SDPA")):
        assert_matches(got[blob], ref[blob], flt[blob], f"{what} {target}")


def test_attention_int8_on_a76_default_options_within_fp16_rounding(tmp_path: Path) -> None:
    """Default A76 options store and add in fp16 around the int8 products: the measured gap."""
    (_, _, ip, ib), x, ref, _ = _one_net(tmp_path, 2)
    got = run_ncnn(ip, ib, x, ["a", "s"], {}, target="arm64-a76").outputs
    for blob in ("a", "s"):
        a = agreement(got[blob], ref[blob])
        assert a["cosine"] >= 0.9999 and a["max_steps"] < 2.0, (blob, a)
        assert a["close"] < 0.95, (blob, "A76 defaults were expected to use fp16", a)
