"""Folded activations on the emulated ARM targets: the requantize through a fused HardSwish /
ReLU6 / LeakyReLU is ncnn's ARM code (``requantize_arm.cpp``, ``activation_ps``), not x86's.

Each model is exported once for x86, Cortex-A53 and Cortex-A76 (default options); the int8
model chains through its activations and every target's int8-vs-QAT parity passes the export's
own verdict, with no layer flagged. Skipped (or failed under LIGHTNING_NCNNQAT_REQUIRE_ARM=1)
where the emulated targets are not set up.
"""

from __future__ import annotations

import os

import pytest

from lightning_ncnnqat import export
from lightning_ncnnqat.ncnn.targets import SETUP_COMMAND, environment_problem
from lightning_ncnnqat.speed.plan import count_chains
from test_chains import parity_failures, qat_model

_problem = environment_problem()
if _problem is not None and os.environ.get("LIGHTNING_NCNNQAT_REQUIRE_ARM") == "1":
    raise RuntimeError(f"LIGHTNING_NCNNQAT_REQUIRE_ARM=1 but {_problem}")
pytestmark = pytest.mark.skipif(_problem is not None, reason=f"{_problem}; run `{SETUP_COMMAND}`")

TARGETS = ["x86", "arm64-a53", "arm64-a76"]


@pytest.mark.parametrize("name, seed", [("hardswish", 1), ("leaky_dw_relu6", 2)])
def test_chained_activations_keep_parity_on_every_target(name: str, seed: int, tmp_path) -> None:
    model, held = qat_model(name, seed)
    report = export(model, tmp_path, held[:1], held, verbose=False, timing_runs=0, layer_check_samples=1,
                    targets=TARGETS, check_onnx=False)
    chains = count_chains((tmp_path / "model.int8.param").read_text())
    assert (chains.requantized, chains.breakers) == (2, {}), chains
    assert sorted(report.runtime) == sorted(TARGETS)
    assert parity_failures(report) == [], (name, {t: e.get("int8_vs_qat") for t, e in report.runtime.items()})
    assert report.flagged_layers == [], report.flagged_layers
    for target in TARGETS[1:]:
        assert report.runtime[target]["int8_vs_qat"]["cosine"] >= 0.999, (target, report.runtime[target]["int8_vs_qat"])
