"""The float conversion is judged on its own (issue 19, item 7).

pnnx changes some models' meaning without failing: a circularly padded conv becomes zero padded,
a functional circular pad likewise, floor division and ``remainder`` are computed otherwise. The
int8 model then follows the wrong float model exactly, so its own checks pass. Each departure here
makes ``report.ok`` false through ``report.conversion`` (apart from int8's flagged layers) and
names where the float ncnn model first departs; faithful converter rewrites (reflect padding as a
Padding layer, ``align_corners`` interpolation, ceil-mode pooling) are not flagged; and the
preflight at QAT start warns of a departure naming the layer.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat import prepare_qat
from lightning_ncnnqat.export import export
from lightning_ncnnqat.export.preflight import preflight

torch.set_num_threads(1)


class CircularSecond(nn.Module):
    """A faithful first conv, then a circularly padded one: the FIRST departing layer is the second."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular", bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.c2(F.relu(self.c1(x)))))
        return self.fc(y.mean((2, 3)))


class FunctionalCircularPad(nn.Module):
    """``F.pad(mode="circular")`` between two convs: the departure is before the second."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(F.pad(F.relu(self.c1(x)), (1, 1, 1, 1), mode="circular"))


class RemainderHead(nn.Module):
    """``torch.remainder`` after the last layer: the departure is after every matched layer."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.remainder(self.fc(F.relu(self.c1(x)).mean((2, 3))), 0.3)


class FloorDivBetween(nn.Module):
    """Floor division between two convs (pnnx rounds otherwise): before the second conv."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.div(self.c1(x), 0.3, rounding_mode="floor"))


class FaithfulRewrites(nn.Module):
    """Rewrites pnnx makes faithfully: reflect padding (a Padding layer), bilinear align_corners
    interpolation, ceil-mode pooling without padded counts, a SiLU."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.interpolate(F.silu(self.c1(x)), scale_factor=2, mode="bilinear", align_corners=True)
        return self.c2(F.avg_pool2d(y, 3, 2, 1, ceil_mode=True, count_include_pad=False))


def _export(model: nn.Module, tmp_path: Path) -> tuple:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    prepare_qat(model, x[:1])
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    rep = export(model, tmp_path, x[:1], x, targets=["x86"], verbose=False, timing_runs=0, check_onnx=False)
    return rep, json.loads((tmp_path / "report.json").read_text())


@pytest.mark.parametrize(
    "make, where, layer",
    [
        (CircularSecond, "in", "c2"),
        (FunctionalCircularPad, "in", "c2"),  # pnnx merges the pad into the conv (padconv)
        (FloorDivBetween, "before", "c2"),
        (RemainderHead, "after", "fc"),
    ],
)
def test_a_departing_conversion_fails_and_is_located(make, where: str, layer: str, tmp_path: Path) -> None:
    rep, d = _export(make(), tmp_path)
    assert rep.failures == [] and rep.flagged_layers == []  # the int8 side is right: not an int8 error
    assert rep.conversion["faithful"] is False and not rep.ok and d["ok"] is False
    assert d["conversion"]["faithful"] is False
    bad = [o for o in rep.conversion["outputs"] if o["departs"]]
    assert bad and bad[0]["cosine"] < 0.9999 and bad[0]["cosine"] == pytest.approx(rep.float_vs_torch_fp32_storage.cosine, abs=1e-6)
    dep = rep.conversion["first_departure"]
    assert (dep["where"], dep["torch_layer"]) == (where, layer), dep
    assert f"'{layer}'" in dep["message"]
    assert any("changed the model's meaning" in w and f"'{layer}'" in w for w in rep.warnings), rep.warnings
    assert "DEPARTS" in rep.summary()
    if make is CircularSecond:  # the layer's input agrees, its output does not; the module is named as it is
        assert dep["input_cosine"] > 0.9999 > dep["output_cosine"] and "circular" in dep["message"]
    if make is FunctionalCircularPad:  # merged into the conv: the op before it is named on the PyTorch side
        assert dep["input_cosine"] is None and dep["output_cosine"] < 0.9999 and "pad" in dep["torch_ops"], dep
    if where == "before":  # the weightless op between is named on the PyTorch side
        assert dep["input_cosine"] < 0.9999 and "div" in dep["torch_ops"], dep


def test_faithful_rewrites_are_not_flagged(tmp_path: Path) -> None:
    rep, d = _export(FaithfulRewrites(), tmp_path)
    assert rep.conversion["faithful"] is True and "first_departure" not in rep.conversion
    assert rep.conversion["cosine"] > 0.99999
    assert rep.ok and d["ok"] is True
    assert not any("meaning" in w for w in rep.warnings)


def _preflight_warnings(model: nn.Module) -> list[str]:
    torch.manual_seed(1)
    x = torch.randn(1, 3, 8, 8)
    prepare_qat(model, x)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        preflight(model, x)
    return [str(w.message) for w in got]


def test_preflight_warns_of_a_departure_at_qat_start() -> None:
    msgs = [m for m in _preflight_warnings(CircularSecond()) if "QAT start" in m and "meaning" in m]
    assert len(msgs) == 1 and "'c2'" in msgs[0] and "circular" in msgs[0], msgs


def test_preflight_is_quiet_on_a_faithful_conversion() -> None:
    assert not [m for m in _preflight_warnings(FaithfulRewrites()) if "meaning" in m]


class Cancelling(nn.Module):
    """``a(x) - b(swap(x))`` with weights ~1000 and biases 0.3..0.6 apart: the output is a small
    difference of large sums, so ncnn's float32 summation order alone moves it beyond the float32
    floor, while the converted graph is right (int8, accumulating exactly, matches the QAT model)."""

    def __init__(self, c: int = 64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c = c
        self.a, self.b = nn.Conv2d(c, 8, 3, padding=1), nn.Conv2d(c, 8, 3, padding=1)
        with torch.no_grad():
            w = torch.randn(8, c, 3, 3, generator=g) * 1000
            self.a.weight.copy_(w)
            self.b.weight.copy_(torch.cat([w[:, c // 2 :], w[:, : c // 2]], 1))
            bias = torch.randn(8, generator=g) * 1000
            self.a.bias.copy_(bias)
            self.b.bias.copy_(bias - 0.3 * (1 + torch.rand(8, generator=g)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c // 2
        return self.a(x) - self.b(torch.cat([x[:, h:], x[:, :h]], 1))


def test_float_rounding_on_a_cancelling_model_is_a_note_not_a_departure(tmp_path: Path) -> None:
    model = Cancelling()
    x = torch.randn(8, 64, 8, 8, generator=torch.Generator().manual_seed(1))
    prepare_qat(model, x[:1])
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    rep = export(model, tmp_path, x[:1], x, targets=["x86"], verbose=False, timing_runs=0, check_onnx=False)
    out = rep.conversion["outputs"][0]
    assert out["float_failing"] and out["int8_failing"] is False  # the float figure alone would flag it
    assert rep.conversion["faithful"] is True and rep.ok
    assert any("float32 summation" in n for n in rep.notes), rep.notes


def test_prepare_qat_with_targets_warns_at_qat_start() -> None:
    """The Trainer-less QAT start (prepare_qat(targets=...), the callback's own path) warns too."""
    torch.manual_seed(2)
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        prepare_qat(FunctionalCircularPad(), x[:1], targets=["x86"])
    msgs = [str(w.message) for w in got if "meaning" in str(w.message)]
    assert len(msgs) == 1 and "'c2'" in msgs[0] and "pad" in msgs[0], msgs
