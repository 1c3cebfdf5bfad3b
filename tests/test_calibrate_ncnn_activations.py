"""``calibrate(..., activations="ncnn")``: layer inputs computed by ncnn's float runtime.

Needs only the pip ``ncnn`` and ``pnnx`` (no C++ tools): each layer must read the ncnn blob that
is its own input (a wrong blob shows as a different absmax), the statistics must equal those of
the same blobs extracted directly, and bad arguments fail early with a message naming them.
The comparison with the real ncnn2table is in ``test_ncnn_tools_calibrate.py``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat.calibration import calibrate
from lightning_ncnnqat.calibration.api import _folded_copy
from lightning_ncnnqat.calibration.histogram import histogram_of
from lightning_ncnnqat.calibration.ncnn_activations import NCNN2TABLE_OPTIONS, convert_float
from lightning_ncnnqat.ncnn.isolated import run_ncnn


class Net(nn.Module):
    """A 3x3 conv wide enough for Winograd, a depthwise conv, a residual add and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.body = nn.Conv2d(16, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.body(x) + x)
        x = F.relu(self.pw(F.relu(self.dw(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.fixture(scope="module")
def model_and_data():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    m = Net().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 1.5)
    xs = torch.randn(6, 3, 16, 16)
    return m, xs


def test_each_layer_reads_its_own_blob(model_and_data) -> None:
    """ncnn activations agree with PyTorch's to float rounding on every layer (a layer mapped to
    another layer's blob would be off by far more), and the statistics are exactly those of the
    blobs ncnn's runtime gives for the same inputs with ncnn2table's options."""
    m, xs = model_and_data
    ours = calibrate(m, [xs[:4], xs[4:]], method="kl", activations="ncnn")
    ref = calibrate(m, [xs[:4], xs[4:]], method="kl")
    assert ours.activations == "ncnn" and ref.activations == "torch"
    assert list(ours.layers) == list(ref.layers) == ["stem", "body", "dw", "pw", "fc"]
    for name, c in ours.layers.items():
        r = ref.layers[name]
        assert c.input_absmax == pytest.approx(r.input_absmax, rel=1e-5), name
        assert c.elements_per_sample == r.elements_per_sample
        assert torch.equal(c.weight_scales, r.weight_scales)  # weights do not depend on activations
        assert c.input_absmax > 0 and c.histogram.sum() > 0

    # the same blobs, extracted directly
    folded, _ = _folded_copy(m, xs[:1], None)
    with tempfile.TemporaryDirectory() as tmp:
        fm = convert_float(folded, xs[:1], list(ours.layers.values()), Path(tmp))
        res = run_ncnn(fm.param, fm.bin, {fm.input_blob: xs.numpy()}, list(fm.bottom_blobs.values()), NCNN2TABLE_OPTIONS)
    for name, c in ours.layers.items():
        x = torch.from_numpy(res.outputs[fm.bottom_blobs[name]])
        assert c.input_absmax == float(np.float32(x.abs().max()))
        assert np.array_equal(c.histogram, histogram_of(x, c.input_absmax).numpy())


def test_eq_runs_on_ncnn_activations(model_and_data) -> None:
    m, xs = model_and_data
    kl = calibrate(m, xs, method="kl", activations="ncnn")
    eq = calibrate(m, xs, method="eq", activations="ncnn", eq_samples=2)
    for name, c in eq.layers.items():
        s = kl.layers[name].input_scale
        assert 0.5 * s <= c.input_scale < 2.0 * s, name
        assert torch.isfinite(c.weight_scales).all() and (c.weight_scales > 0).all()


def test_bad_activations_argument_is_named(model_and_data) -> None:
    m, xs = model_and_data
    with pytest.raises(ValueError, match=r"`activations` must be 'torch' or 'ncnn', got 'onnx'"):
        calibrate(m, xs, activations="onnx")


@pytest.mark.parametrize("activations", ["torch", "ncnn"])
def test_two_input_model_is_refused_early(activations: str) -> None:
    class TwoIn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(y)

    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="one input tensor.*`example_input` is a dict of 2 values"):
        calibrate(TwoIn().eval(), [x], example_input={"x": x, "y": x}, activations=activations)


def test_dict_outputs_and_small_batches(model_and_data) -> None:
    """A model returning a dict converts (the export's flat outputs); batches of one sample are
    grouped per child process and give exactly the statistics of one batch of six."""
    m, xs = model_and_data

    class DictOut(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            y = self.net(x)
            return {"logits": y, "prob": y.softmax(1)}

    whole = calibrate(m, xs, method="kl", activations="ncnn")
    ones = calibrate(DictOut(m).eval(), [x[None] for x in xs], method="kl", activations="ncnn")
    assert [n.split(".", 1)[1] for n in ones.layers] == list(whole.layers)
    for name, c in whole.layers.items():
        o = ones.layers[f"net.{name}"]
        assert o.input_scale == c.input_scale and np.array_equal(o.histogram, c.histogram), name
