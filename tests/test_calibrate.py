"""``calibrate()`` without ncnn's tools: the rules of ncnn2table, checked against literal scalar
re-statements of its C loops (float32 step by step), and the API's promises.

The comparison with the real ncnn2table binary is in ``test_ncnn_tools_calibrate.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ncnnqat.calibration import calibrate
from lightning_ncnnqat.calibration import eq as eq_mod
from lightning_ncnnqat.calibration.aciq import aciq_threshold
from lightning_ncnnqat.calibration.histogram import histogram_of
from lightning_ncnnqat.calibration.kl import kl_divergence, kl_threshold, kl_threshold_bin, normalize_histogram
from lightning_ncnnqat.calibration.weights import weight_scales

f32 = np.float32


# ------------------------------------------------------------------ literal restatement of the C


def c_kl(h: np.ndarray, T: int) -> np.float32:
    """ncnn2table's KL for one candidate, as scalar float32 operations in the C order."""
    eps = f32(0.0001)
    clip = [eps + h[j] for j in range(T)]
    for j in range(T, 2048):
        clip[T - 1] = f32(clip[T - 1] + h[j])
    npb = f32(T) / f32(128)
    q = [f32(0)] * 128
    spans = []
    for j in range(128):
        start, end = f32(j) * npb, f32(j + 1) * npb
        lu = int(math.ceil(start))
        ls = f32(lu) - start
        rl = int(math.floor(end))
        rs = end - f32(rl)
        spans.append((lu, ls, rl, rs))
        v = f32(0)
        if ls > 0:
            v = f32(v + ls * h[lu - 1])
        if rs > 0:
            v = f32(v + rs * h[rl])
        for k in range(lu, rl):
            v = f32(v + h[k])
        q[j] = f32(v / f32(f32(rl - lu) + ls + rs))
    e = [eps] * T
    for j, (lu, ls, rl, rs) in enumerate(spans):
        if ls > 0:
            e[lu - 1] = f32(e[lu - 1] + ls * q[j])
        if rs > 0:
            e[rl] = f32(e[rl] + rs * q[j])
        for k in range(lu, rl):
            e[k] = f32(e[k] + q[j])
    r = f32(0)
    for a, b in zip(clip, e):
        r = f32(r + a * f32(np.log(np.float64(f32(a / b)))))
    return r


def skewed_counts(seed: int, n: int = 20000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = np.abs(rng.standard_t(3, n))
    v = v / v.max()
    idx = np.minimum((v * 2048).astype(np.int64), 2047)
    return np.bincount(idx, minlength=2048)


@pytest.mark.parametrize("T", [128, 129, 200, 1000, 1537, 2047])
def test_kl_divergence_equals_the_c_loops_bit_for_bit(T: int) -> None:
    h = normalize_histogram(skewed_counts(0))
    assert kl_divergence(h, T) == c_kl(h, T)


def test_kl_threshold_is_the_first_minimum_of_the_c_divergences() -> None:
    counts = skewed_counts(1, 5000)
    h = normalize_histogram(counts)
    t = kl_threshold_bin(counts)
    # the C values around the choice: the chosen one is <= its neighbours
    near = {T: c_kl(h, T) for T in range(max(128, t - 3), min(2048, t + 4))}
    assert near[t] == min(near.values())
    assert all(v > near[t] for T, v in near.items() if T < t)
    thr = kl_threshold(counts, 3.0)[1]
    assert thr == float((f32(t) + f32(0.5)) * f32(3.0) / f32(2048))


def test_kl_on_an_empty_histogram_keeps_128_like_the_tool() -> None:
    assert kl_threshold_bin(np.zeros(2048, dtype=np.int64)) == 128


def test_histogram_bins_like_the_tool() -> None:
    absmax = 3.0
    x = torch.tensor([0.0, -0.0, 3.0, -3.0, 1.5, 1.5 - 1e-7, 3.0 / 2048, 2.9999], dtype=torch.float32)
    h = histogram_of(x, absmax).numpy()
    want = np.zeros(2048, dtype=np.int64)
    for v in x.tolist():
        if v == 0:
            continue  # zeros are skipped
        r = f32(f32(abs(v)) / f32(absmax)) * f32(2048)
        want[min(int(r), 2047)] += 1
    assert np.array_equal(h, want) and h.sum() == 6 and h[2047] == 3 and h[1024] == 1


def test_aciq_threshold_formula() -> None:
    c = 0.175 * (1 + math.sqrt(math.pi * math.log(4)))
    for absmax, n, bits, alpha in [(2.5, 3 * 16 * 16, 8, 3.92403714), (0.7, 27, 6, 3.28691474), (1.0, 9, 8, 3.92403714)]:
        std = float(f32(absmax)) * 2 * c / math.sqrt(2 * math.log(n))
        assert aciq_threshold(absmax, n, bits) == float(f32(float(f32(alpha)) * std))
    with pytest.raises(ValueError, match="at least 2"):
        aciq_threshold(1.0, 1)


def test_weight_scales_per_method_and_bits() -> None:
    w = torch.randn(4, 3, 3, 3)
    w[2] = 0  # a dead channel: scale 1, never inf
    a = w.reshape(4, -1).abs().amax(1).numpy()
    kl8 = weight_scales(w, 4, 8, "kl").numpy()
    kl6 = weight_scales(w, 4, 6, "kl").numpy()
    ac6 = weight_scales(w, 4, 6, "aciq").numpy()
    for i in (0, 1, 3):
        assert kl8[i] == f32(127) / f32(a[i]) and kl6[i] == f32(31) / f32(a[i])
        assert ac6[i] == f32(31) / f32(aciq_threshold(a[i], 27, 6))
    assert kl8[2] == kl6[2] == ac6[2] == 1.0
    with pytest.raises(ValueError, match="method"):
        weight_scales(w, 4, 8, "minmax")


# ------------------------------------------------------------------------------------- the API


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.a = nn.Conv2d(8, 8, 1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)  # reads the same tensor as `a`
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.dw(x))
        x = F.relu(self.a(x) + self.b(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def make_net() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.3, 0.3)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def data(n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 1.3 + 0.2


@pytest.fixture(scope="module")
def kl_result():
    net = make_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    res = calibrate(net, DataLoader(TensorDataset(data(), torch.zeros(24)), batch_size=8), method="kl")
    after = net.state_dict()
    assert type(net.stem) is nn.Conv2d and set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the user's model is untouched
    return net, res


def test_layers_are_the_qat_plan_layers_with_folded_weights(kl_result) -> None:
    net, res = kl_result
    assert list(res.layers) == ["stem", "dw", "a", "b", "fc"]
    c = res.layers["stem"]
    s = net.bn.weight / torch.sqrt(net.bn.running_var + net.bn.eps)
    assert torch.allclose(c.weight, net.stem.weight * s[:, None, None, None], rtol=1e-6, atol=1e-7)
    assert c.weight_bits == 6 and res.layers["b"].weight_bits == 6 and res.layers["a"].weight_bits == 8
    assert res.layers["dw"].kind == "ConvolutionDepthWise" and res.layers["dw"].weight_scales.shape == (8,)
    assert res.num_samples == 24
    # the stem's input is the data itself: its absmax is the data's
    assert res.layers["stem"].input_absmax == float(data().abs().max())
    # readers of one tensor: same statistics, same scale
    assert res.layers["a"].input_scale == res.layers["b"].input_scale
    for c in res.layers.values():
        assert 128 <= c.threshold_bin < 2048 and int(c.histogram.sum()) > 0
        assert c.input_scale == float(f32(127) / f32(c.input_threshold))
        assert 0 < c.input_threshold <= c.input_absmax * (1 + 1 / 2048)


def test_batches_in_any_form_give_the_same_result(kl_result) -> None:
    net, res = kl_result
    x = data()
    as_tensor = calibrate(net, x, method="kl")  # one tensor = one batch of 24
    for n, c in res.layers.items():
        assert np.array_equal(c.histogram, as_tensor.layers[n].histogram)
        assert c.input_scale == as_tensor.layers[n].input_scale
    as_dicts = calibrate(net, [{"image": x[:12]}, {"image": x[12:]}], method="aciq")
    for n, c in res.layers.items():
        assert c.input_absmax == as_dicts.layers[n].input_absmax
    half = calibrate(net, [x[:8], x[8:16], x[16:]], method="aciq", num_batches=1)
    assert half.num_samples == 8
    assert half.layers["stem"].input_absmax == float(x[:8].abs().max())


def test_aciq_uses_one_samples_element_count(kl_result) -> None:
    net, _ = kl_result
    res = calibrate(net, data(), method="aciq")
    c = res.layers["stem"]
    assert c.elements_per_sample == 3 * 16 * 16 and c.histogram is None
    assert c.input_threshold == aciq_threshold(c.input_absmax, 3 * 16 * 16)
    assert res.layers["fc"].elements_per_sample == 8


def test_errors_name_the_argument_or_layer(kl_result) -> None:
    net, _ = kl_result
    with pytest.raises(ValueError, match="method"):
        calibrate(net, data(), method="mse")
    with pytest.raises(ValueError, match="no calibration batch"):
        calibrate(net, [], method="kl")
    with pytest.raises(TypeError, match="batch 0"):
        calibrate(net, [("no", "tensor")], method="kl")
    bad = data()
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer 'stem'.*NaN"):
        calibrate(net, bad, method="kl")
    x = data()
    with pytest.raises(ValueError, match="`device` must be a torch device.*'gpu'"):
        calibrate(net, x, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="`device` is 'cuda'.*no CUDA"):
            calibrate(net, x, device="cuda")
    with pytest.raises(TypeError, match="batch 1 holds a torch.int64 input"):
        calibrate(net, [x[:4], x[4:8].long()])
    with pytest.raises(ValueError, match=r"batch 1 has shape \(4, 768\), unlike the example input \(4, 3, 16, 16\)"):
        calibrate(net, [x[:4], x[4:8].reshape(4, -1)])
    with pytest.raises(ValueError, match="one input tensor.*`example_input` is a tuple of 2 values"):
        calibrate(net, x, example_input=(x[:1], x[:1]))


def test_a_one_shot_iterator_cannot_be_read_twice(kl_result) -> None:
    """Without the cache, KL reads ``data`` twice: a generator would give an empty second pass
    (empty histograms, bin 128, scales 10x too large) or lose its first batch to the example."""
    net, res = kl_result
    x = data()
    with pytest.raises(ValueError, match="`cache_batches=False`.*one-shot generator"):
        calibrate(net, (b for b in [x[:12], x[12:]]), cache_batches=False)

    class Shrinking:
        """Re-iterable, but gives fewer samples the second time (a sampler that drops some)."""

        def __init__(self) -> None:
            self.calls = 0

        def __iter__(self):  # noqa: ANN204
            self.calls += 1
            return iter([x[:12], x[12:]] if self.calls == 1 else [x[:12]])

    with pytest.raises(ValueError, match="24 samples on the first pass and 12 on the second"):
        calibrate(net, Shrinking(), example_input=x[:1], cache_batches=False)
    again = calibrate(net, [x[:8], x[8:16], x[16:]], cache_batches=False)  # a list reads twice
    for n, c in res.layers.items():
        assert c.input_scale == again.layers[n].input_scale


def test_float64_batches_run_in_the_models_dtype(kl_result) -> None:
    net, res = kl_result
    x = data()
    got = calibrate(net, [x[:12].double(), x[12:].double()])
    for n, c in res.layers.items():
        assert c.input_scale == got.layers[n].input_scale


def test_eq_input_scale_is_the_best_candidate_of_the_tools_grid(kl_result) -> None:
    """EQ's last step keeps, of the 100 candidates around the KL input scale, the one with the
    largest summed int8-vs-float cosine (given EQ's weight scales); the weights were searched too."""
    net, kl = kl_result
    x = data()
    eq = calibrate(net, x, method="eq", eq_samples=20)
    from lightning_ncnnqat.calibration.api import _folded_copy
    from lightning_ncnnqat.calibration.histogram import tap_inputs

    folded, plan = _folded_copy(net, x[:1], None)
    inputs: dict[str, torch.Tensor] = {}
    with tap_inputs(folded, ["b", "fc"], inputs.__setitem__), torch.no_grad():
        folded(x[:20])
    mods = dict(folded.named_modules())
    for name in ("b", "fc"):
        layer = eq_mod.Int8Layer(mods[name], plan.layers[name].num_groups)
        xin = inputs[name]
        r = layer.m(xin).double().flatten(1)

        def cos_sum(ws: torch.Tensor, s: float) -> float:
            st = torch.tensor(s, dtype=torch.float32)
            out = layer.forward(eq_mod.quantize(xin, st), st, ws).double().flatten(1)
            return float(((out * r).sum(1) / out.norm(dim=1) / r.norm(dim=1)).sum())

        k, e = kl.layers[name], eq.layers[name]
        grid = eq_mod.candidates(k.input_scale)
        assert f32(e.input_scale) in grid
        sims = [cos_sum(e.weight_scales, float(c)) for c in grid]
        assert cos_sum(e.weight_scales, e.input_scale) >= max(sims) - 1e-9
        assert not torch.equal(e.weight_scales, k.weight_scales)
        assert e.input_threshold == float(f32(127) / f32(e.input_scale))


def test_eq_candidates_are_the_tools_grid() -> None:
    c = eq_mod.candidates(10.0)
    assert len(c) == 100 and c[0] == f32(5.0) and c[1] == f32(5.0) + f32(0.15)
    assert c[-1] == f32(5.0) + f32(99) * ((f32(20.0) - f32(5.0)) / f32(100))
