"""Int8 decisions from measurement: a layer the ncnn runtime computes wrongly is re-planned as
float at QAT start, before any training; the same layer type where the runtime gets it right
stays int8. Real export chain and real ncnn (x86 here; the ARM profiles are added where set up)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat import QATConfig, prepare_qat
from lightning_ncnnqat.export.preflight import keep_wrong_layers_in_float, measure_int8_layers
from lightning_ncnnqat.qat.plan import get_plan


class TwoGrouped(nn.Module):
    """Two grouped convs (8 channels per group): ``g``'s int8 output is dequantized (a residual
    add reads it), ``g2``'s is requantized straight into the next int8 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 1)
        self.g = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.g2 = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.pw = nn.Conv2d(32, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.g(x)) + x
        x = self.pw(F.relu(self.g2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_wrongly_computed_grouped_conv_is_replanned_float_and_the_right_one_stays_int8() -> None:
    torch.manual_seed(0)
    model = TwoGrouped()
    ex = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    config = QATConfig()  # quantize_grouped_convs="auto": int8, decided by measurement
    plan = prepare_qat(model, ex, config)
    assert {"g", "g2"} <= set(plan.layers)
    wrong = measure_int8_layers(model, ex, targets="x86")
    assert set(wrong["x86"]) == {"g"} and wrong["x86"]["g"] < 0.9  # measured, not guessed
    params_before = {n: p for n, p in model.named_parameters()}
    reasons = keep_wrong_layers_in_float(model, ex, config, targets="x86")
    assert list(reasons) == ["g"] and "x86" in reasons["g"] and "wrongly" in reasons["g"]
    plan = get_plan(model)
    assert "g" in plan.float_layers and "g" not in plan.layers
    assert plan.layers["g2"].kind == "ConvolutionDepthWise"  # requantized: right, stays int8
    assert plan.float_layers["g"] == reasons["g"] and "g" in plan.summary()
    # nothing trained is lost: the same Parameter objects, and g is a plain conv again
    assert {n: p for n, p in model.named_parameters()} == params_before
    assert type(model.g) is nn.Conv2d and type(model.g2) is not nn.Conv2d
    # measured again, every int8 layer is now right
    assert measure_int8_layers(model, ex, targets="x86") == {"x86": {}}


def test_forced_grouped_convs_stay_int8_even_where_measured_wrong() -> None:
    torch.manual_seed(0)
    model = TwoGrouped()
    ex = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    config = QATConfig(quantize_grouped_convs=True)  # the user knows the runtime
    prepare_qat(model, ex, config)
    assert keep_wrong_layers_in_float(model, ex, config, targets="x86") == {}
    assert "g" in get_plan(model).layers


def test_nothing_changes_when_every_layer_is_right() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4))
    ex = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    plan = prepare_qat(model, ex)
    assert keep_wrong_layers_in_float(model, ex, targets="x86") == {}
    assert get_plan(model) is plan and set(plan.layers) == {"0", "3"}
