"""Int8 only where it pays (issue 20): the QAT start's speed decision (``speed.decide``), the
export's judged int8 vs float timing (``verification.speed``) and ``QATConfig.prefer``.

Real ncnn timings on tiny models: 3x3 depthwise layers lose in int8 on x86 (no AVX int8
depthwise kernel), wide 3x3 convs gain. A CPU with fast int8 depthwise must not fail these, so
they assert the invariants (the deployed plan not slower than float beyond the tie tolerance,
figures in the reasons, the same plan twice or plans of the same speed), not which layers. The
rules on given figures: ``tests/test_speed_candidates.py``."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ncnnqat import QATCallback, QATConfig, export, prepare_qat
from lightning_ncnnqat.export.config import ExportConfig
from lightning_ncnnqat.errors import ConfigError
from lightning_ncnnqat.policy import speed as policy
from lightning_ncnnqat.export.api import preflight_export
from lightning_ncnnqat.ncnn.timing import ModelToTime, paired_speedup
from lightning_ncnnqat.speed.decide import SpeedDecision, decide_speed, speed_check
from lightning_ncnnqat.speed.plan import whole_models
from lightning_ncnnqat.speed.segments import time_side_by_side
from lightning_ncnnqat.speed.variants import write_variant


class DepthwiseNet(nn.Module):
    """Depthwise 3x3 (ReLU6) layers between wide 3x3 convs, input C x 16 x 16."""

    def __init__(self, c: int = 48, wide: int = 64) -> None:
        super().__init__()
        self.dw = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU6())
        self.conv = nn.Sequential(nn.Conv2d(c, wide, 3, 1, 1, bias=False), nn.BatchNorm2d(wide), nn.ReLU())
        self.dw2 = nn.Sequential(nn.Conv2d(wide, wide, 3, 1, 1, groups=wide, bias=False), nn.BatchNorm2d(wide), nn.ReLU6())
        self.conv2 = nn.Sequential(nn.Conv2d(wide, wide, 3, 1, 1, bias=False), nn.BatchNorm2d(wide), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.dw2(self.conv(self.dw(x))))


DEPTHWISE = {"dw.0", "dw2.0"}


def _x(c: int = 48) -> torch.Tensor:
    return torch.randn(1, c, 16, 16, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("bad", ["fast", "SPEED", "", 1, None])
def test_prefer_error_names_the_argument_and_value(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"`prefer` must be one of \('speed', 'int8', 'size'\)") as e:
        QATConfig(prefer=bad)  # type: ignore[arg-type]
    assert e.value.argument == "prefer" and repr(bad) in str(e.value)


def test_prefer_defaults_to_speed_and_round_trips() -> None:
    assert QATConfig().prefer == "speed"
    c = QATConfig(prefer="size")
    assert QATConfig.from_dict(c.to_dict()) == c


# ------------------------------------------------------------ measured: decide_speed / prepare_qat


def _not_slower(d: SpeedDecision) -> bool:
    return d.measurement is not None and d.verdict != "slower"


def test_speed_plans_a_model_not_slower_than_float_and_int8_keeps_every_layer() -> None:
    """prefer='speed': the planned int8 model is not slower than float here, every layer kept
    float has its figures in its reason; prefer='int8': every layer int8, the figures reported."""
    torch.manual_seed(0)
    fast, full = DepthwiseNet(), DepthwiseNet()
    full.load_state_dict(fast.state_dict())
    plan = prepare_qat(fast, _x(), QATConfig(prefer="speed"), targets=["x86"])
    note = plan.notes["(speed on x86)"]
    assert "int8 as planned" in note and ", slower)" not in note, plan.summary()
    kept = {n: r for n, r in plan.float_layers.items() if "kept float for speed" in r}
    for name, reason in kept.items():
        assert name in plan.summary() and " ms" in reason and "on x86 (" in reason, reason
    assert set(kept) | set(plan.layers) >= DEPTHWISE | {"conv.0", "conv2.0"} and plan.layers

    plan8 = prepare_qat(full, _x(), QATConfig(prefer="int8"), targets=["x86"])
    assert DEPTHWISE <= set(plan8.layers) and not plan8.float_layers
    assert "0 layer(s) kept float" in plan8.notes["(speed on x86)"]


def _plan_speeds(m: nn.Module, x: torch.Tensor, plans: list[list[str]], tmp: Path) -> list[float]:
    """float / int8 of each plan's int8 model (layers of ``plans`` float), side by side."""
    rep = preflight_export(m, x, export_dir=tmp)
    ncnn_of = {r.torch_name: r.ncnn_name for r in rep.layers if r.ncnn_name}
    fp, q = whole_models(tmp, 1, rep.io)
    models = [fp]
    for i, keep in enumerate(plans):
        text, blob = write_variant(tmp, {ncnn_of[n] for n in keep}, rep.float_weights or "fp32")
        (tmp / f"p{i}.param").write_text(text)
        (tmp / f"p{i}.bin").write_bytes(blob)
        models.append(ModelToTime(f"p{i}", str(tmp / f"p{i}.param"), str(tmp / f"p{i}.bin"), q.inputs, q.extract, q.options))
    t = time_side_by_side(models, runs=60)
    return [paired_speedup(t["float"], t[f"p{i}"], "cpu") for i in range(len(plans))]


def test_decision_is_stable_across_runs(tmp_path: Path) -> None:
    """Two measurements of one prepared model keep the same layers float, or plans of the same
    speed (timed side by side, within the rule's own bar for a change); neither is slower than
    float."""
    torch.manual_seed(1)
    m = DepthwiseNet(32, 96)
    x = _x(32)
    prepare_qat(m, x, QATConfig(prefer="int8"))
    a = decide_speed(m, x, "speed", speed_check("x86"))
    b = decide_speed(m, x, "speed", speed_check("x86"))
    assert _not_slower(a) and _not_slower(b), (a.lines(), b.lines())
    if a.keep_float != b.keep_float:
        sa, sb = _plan_speeds(m, x, [a.keep_float, b.keep_float], tmp_path)
        bar = 1 + policy.SPEED_KEEP_FLOAT_GAIN
        assert 1 / bar <= sa / sb <= bar, (a.keep_float, b.keep_float, sa, sb, a.lines(), b.lines())


def test_a_depthwise_heavy_model_gets_a_plan_not_slower_than_float() -> None:
    """Three 3x3 depthwise layers chained into one wide conv, 32x32: on x86 every layer int8 is
    slower than float here (no AVX int8 depthwise kernel); whatever this CPU does, the plan the
    start chooses is not slower than float, and where all-int8 was, layers are kept float."""
    torch.manual_seed(3)
    dw = [nn.Sequential(nn.Conv2d(48, 48, 3, 1, 1, groups=48, bias=False), nn.BatchNorm2d(48), nn.ReLU6()) for _ in range(3)]
    m = nn.Sequential(*dw, nn.Conv2d(48, 96, 3, 1, 1), nn.ReLU())
    x = torch.randn(1, 48, 32, 32, generator=torch.Generator().manual_seed(0))
    prepare_qat(m, x, QATConfig(prefer="int8"))
    d = decide_speed(m, x, "speed", speed_check("x86"))
    assert _not_slower(d), d.lines()
    meas = d.measurement
    if policy.speed_verdict(meas.reported("int8").speedup) == "slower":
        assert d.keep_float, d.lines()
    assert len(meas.units) == 1 and len(meas.units[0].layers) == 4  # one requantize chain, timed whole
    # the figure reported is the confirming timing's, of the plan deployed, against float
    assert {"float", d.chosen} <= set(meas.confirmed) and meas.reported(d.chosen) is meas.confirmed[d.chosen]


def test_a_model_where_int8_pays_everywhere_keeps_every_layer() -> None:
    """Wide 3x3 convs only: nothing loses clearly, nothing is kept float, int8 is not slower."""
    torch.manual_seed(2)
    m = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(64, 64, 3, padding=1), nn.ReLU())
    x = _x(32)
    prepare_qat(m, x, QATConfig(prefer="int8"))
    d = decide_speed(m, x, "speed", speed_check(["x86"]))
    assert d.keep_float == [] and d.verdict != "slower", d.lines()
    assert len(d.measurement.layers) == 3 and all(s.int8_ms > 0 and s.float_ms > 0 for s in d.measurement.layers.values())


def test_size_and_arm_only_targets_time_nothing() -> None:
    """prefer='size' times nothing; targets naming only emulated ARM CPUs are not timed here
    (emulated times are not speeds): the summary says why."""
    m = DepthwiseNet()
    prepare_qat(m, _x(), QATConfig(prefer="int8"))
    size = decide_speed(m, _x(), "size", speed_check("x86"))
    assert size.measurement is None and "prefer='size'" in size.lines()[0]
    check = speed_check(["arm64-a53"])
    assert check.timed == () and "arm64-a53" in check.others
    arm = decide_speed(m, _x(), "speed", check)
    assert arm.measurement is None and arm.keep_float == [] and "emulated" in arm.lines()[0]


def test_callback_takes_the_same_path_as_prepare_qat(tmp_path: Path) -> None:
    """QATCallback's QAT start keeps the same layers float for speed as prepare_qat(targets=...)
    (both run start_qat's speed step), and its export judges its own timing."""

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = DepthwiseNet()
            self.example_input_array = _x()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
            return self(batch[0]).float().pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    lit = Lit()
    data = DataLoader(TensorDataset(torch.randn(4, 48, 16, 16), torch.zeros(4)), batch_size=2)
    cb = QATCallback(start_epoch=0, config=QATConfig(prefer="speed"),
                     export=ExportConfig(dir=str(tmp_path / "export"), targets=["x86"], timing_runs=20,
                                         layer_check_samples=1, check_onnx=False), verbose=False)
    trainer = L.Trainer(max_steps=1, callbacks=[cb], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(lit, data)
    # the decision prepare_qat(targets=...) makes on this model (test above), with its figures
    kept = {n: r for n, r in cb.plan.float_layers.items() if "kept float for speed" in r}
    assert all("on x86 (" in r and "1 thread, cpu time" in r and " ms" in r for r in kept.values()), kept
    assert {n.removeprefix("net.") for n in kept} <= DEPTHWISE | {"conv.0", "conv2.0"}, cb.plan.summary()
    assert "int8 as planned" in cb.plan.notes["(speed on x86)"] and ", slower)" not in cb.plan.notes["(speed on x86)"]
    # the export at fit end judged its own timing, and DEPLOY.md says it per target
    rep = json.loads((tmp_path / "export" / "report.json").read_text())
    t = rep["timing"]
    assert t["target"] == "x86" and t["clock"] == "cpu" and t["verdict"] == policy.speed_verdict(t["speedup"], t["float32_ms"] - t["int8_ms"])
    assert "## Speed" in (tmp_path / "export" / "DEPLOY.md").read_text()


def test_export_says_plainly_when_int8_does_not_pay(tmp_path: Path) -> None:
    """Every depthwise layer int8 (prefer='int8'): the export's interleaved timing finds int8
    slower than float, a warning says so, and DEPLOY.md says int8 does not pay on x86."""
    torch.manual_seed(0)
    # depthwise layers only, at 32x32: ncnn's x86 int8 depthwise has no AVX/VNNI kernel, so every
    # layer loses, by far more than the 10 us tie floor (a wide conv would win some back)
    m = nn.Sequential(*[nn.Sequential(nn.Conv2d(48, 48, 3, 1, 1, groups=48, bias=False), nn.BatchNorm2d(48), nn.ReLU6())
                        for _ in range(4)])
    x = torch.randn(8, 48, 32, 32)
    prepare_qat(m, x[:1], QATConfig(prefer="int8"))
    m.train()
    m(x)
    m.eval()
    rep = export(m, tmp_path, x[:1], x, verbose=False, targets=["x86"], timing_runs=30, check_onnx=False,
                 layer_check_samples=1)
    t = rep.timing
    assert t["verdict"] == "slower", t
    assert t["float32_cpu_ms"][0] == t["float32_ms"] and t["int8_cpu_ms"][1] <= t["int8_ms"] <= t["int8_cpu_ms"][2]
    codes = {f.code for f in rep.findings}
    assert "int8_slower_than_float" in codes
    assert any("int8 does NOT pay on x86" in w for w in rep.warnings)
    deploy = (tmp_path / "DEPLOY.md").read_text()
    assert "int8 does not pay here" in deploy and f"{t['speedup']:.2f}x" in deploy


@pytest.mark.parametrize(("speedup", "runs", "diff_ms", "code", "severity"), [
    (0.80, 30, -0.2, "int8_slower_than_float", "warning"),
    (1.00, 30, 0.0, "int8_ties_float", "note"),
    (1.40, 30, 0.3, "int8_faster", "note"),
    (0.50, 30, -0.005, "int8_ties_float", "note"),  # 5 us per inference: within one Extractor run's fixed cost
    (0.50, 1, -0.2, "speed_not_judged", "note"),  # one run is a smoke test of the timing, not a measurement
])
def test_the_export_timing_is_judged(speedup: float, runs: int, diff_ms: float, code: str, severity: str) -> None:
    (f,) = policy.judge_speed("x86 (this machine)", speedup, "figures", runs, diff_ms)
    assert (f.code, f.severity, f.value) == (code, severity, speedup)
    assert "x86 (this machine)" in f.message and "figures" in f.message
