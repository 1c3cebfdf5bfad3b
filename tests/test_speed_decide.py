"""Int8 only where it pays (issue 20): the QAT start's speed decision (``speed.decide``), the
export's judged int8 vs float timing (``verification.speed``) and ``QATConfig.prefer``.

Real ncnn timings on tiny models whose layers are far from the decision margins: 3x3 depthwise
layers lose in int8 on x86 (no AVX int8 depthwise kernel; 0.42-0.56x alone here), wide 3x3 convs
gain. The rule itself (which candidate wins) is also tested on given figures."""

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
from lightning_ncnnqat.speed.decide import (
    LayerSpeed,
    ModelSpeed,
    SpeedMeasurement,
    _candidates,
    choose,
    decide_speed,
    speed_check,
)


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


# ------------------------------------------------------------------ the rule, on given figures


def _measurement(ratios: dict[str, float], models: dict[str, tuple[float, list[str]]]) -> SpeedMeasurement:
    layers = {n: LayerSpeed(n, 1.0, r) for n, r in ratios.items()}
    f = models["float"][0]
    return SpeedMeasurement("x86", "test", 1, "cpu", layers,
                            {k: ModelSpeed(ms, ms, ms, fl, f / ms) for k, (ms, fl) in models.items()})


def test_candidates_keep_one_layer_int8_and_choose_needs_a_clear_gain() -> None:
    ratios = {"a": 0.5, "b": 0.8, "c": 0.6}  # every layer loses: the best ("b") stays int8 in the candidate
    assert _candidates({n: LayerSpeed(n, 1.0, r) for n, r in ratios.items()}) == [["a", "c"]]
    assert _candidates({n: LayerSpeed(n, 1.0, r) for n, r in {"a": 0.5, "b": 0.95}.items()}) == [["a"]]
    # a layer that loses by its median but not by its fastest runs is noise, not a loser
    assert _candidates({"a": LayerSpeed("a", 1.0, 0.5), "b": LayerSpeed("b", 1.0, 0.8, "", 0.5, 0.6)}) == [["a"]]
    big = 1.0 / (1 + 2 * policy.SPEED_KEEP_FLOAT_GAIN)  # the candidate's ms against all-int8's 1.0
    small = 1.0 / (1 + (policy.SPEED_KEEP_FLOAT_GAIN + policy.SPEED_TIE_TOLERANCE) / 2)
    two = ["a", "c"]
    assert choose(_measurement(ratios, {"float": (1.2, []), "int8": (1.0, []), "int8-2f": (big, two)})) == "int8-2f"
    # int8 already faster than float: a gain within the noise keeps every layer int8
    assert choose(_measurement(ratios, {"float": (1.2, []), "int8": (1.0, []), "int8-2f": (small, two)})) == "int8"
    # int8 slower than float: the same gain is taken (int8 must not lose to float)
    assert choose(_measurement(ratios, {"float": (0.9, []), "int8": (1.0, []), "int8-2f": (small, two)})) == "int8-2f"
    # a toy model: twice as fast, but 5 us saved per inference is no reason to change the plan
    assert choose(_measurement(ratios, {"float": (0.009, []), "int8": (0.010, []), "int8-2f": (0.005, two)})) == "int8"


# ------------------------------------------------------------ measured: decide_speed / prepare_qat


def test_speed_keeps_losing_depthwise_float_and_int8_does_not() -> None:
    """prefer='speed': the depthwise layers are kept float with their figures, the wide convs stay
    int8, and the int8 model so planned is not slower than float; prefer='int8': every layer int8,
    and the start says plainly that this int8 model is slower than float here."""
    torch.manual_seed(0)
    fast, full = DepthwiseNet(), DepthwiseNet()
    full.load_state_dict(fast.state_dict())
    plan = prepare_qat(fast, _x(), QATConfig(prefer="speed"), targets=["x86"])
    assert DEPTHWISE <= set(plan.float_layers), plan.summary()
    assert "conv2.0" in plan.layers
    for name in DEPTHWISE:
        reason = plan.float_layers[name]
        assert "int8 slower than float on x86" in reason and " ms vs float " in reason, reason
    summary = plan.summary()
    assert all(n in summary for n in DEPTHWISE) and "(speed on x86)" in summary
    assert "int8 as planned" in plan.notes["(speed on x86)"] and ", slower)" not in plan.notes["(speed on x86)"]

    with pytest.warns(UserWarning, match="int8 does NOT pay on x86 for this model"):  # said plainly, QAT goes on
        plan8 = prepare_qat(full, _x(), QATConfig(prefer="int8"), targets=["x86"])
    assert DEPTHWISE <= set(plan8.layers) and not plan8.float_layers
    assert "0 layer(s) kept float" in plan8.notes["(speed on x86)"] and ", slower)" in plan8.notes["(speed on x86)"]


def test_decision_is_stable_across_runs() -> None:
    """Two measurements of one prepared model keep the same layers float (margins, CPU time)."""
    torch.manual_seed(1)
    m = DepthwiseNet(32, 96)
    x = _x(32)
    prepare_qat(m, x, QATConfig(prefer="int8"))
    a = decide_speed(m, x, "speed", speed_check("x86"))
    b = decide_speed(m, x, "speed", speed_check("x86"))
    assert a.measurement is not None and b.measurement is not None
    assert a.keep_float == b.keep_float and DEPTHWISE <= set(a.keep_float), (a.lines(), b.lines())
    assert a.verdict != "slower" and b.verdict != "slower", (a.lines(), b.lines())


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
    # the decision prepare_qat(targets=...) makes on this model (test above), with the same figures
    kept = {n: r for n, r in cb.plan.float_layers.items() if "kept float for speed" in r}
    assert {n.removeprefix("net.") for n in kept} == DEPTHWISE, cb.plan.summary()
    assert all("int8 slower than float on x86 (alone, 1 thread, cpu time: int8 " in r for r in kept.values())
    assert "int8 as planned" in cb.plan.notes["(speed on x86)"]
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
