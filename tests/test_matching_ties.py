"""Layers with identical weights are matched by their place in the graph (issue 19, item 8).

Freshly initialised networks hold equal weights: zero-initialised residual branches (timm's
ResNets zero the last BN's gamma of each block; after the fold every such conv is all zeros), a
head deep-copied from another, tied weights. Each model here exports with parity, and each torch
layer's table rows are its own: checked independently of the matcher by running the float ncnn
model and comparing the blob each matched ncnn layer reads with the torch layer's own input, and
by reading the scales written into model.ncnn.table / model.table against the QAT model's.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat import prepare_qat
from lightning_ncnnqat.export import export
from lightning_ncnnqat.errors import LayerError
from lightning_ncnnqat.conversion.graph_match import Wiring
from lightning_ncnnqat.ncnn.isolated import run_ncnn
from lightning_ncnnqat.conversion.matching import WeightOwner, match_owners
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.qat.prepared import input_quantizers, quantized_layers

torch.set_num_threads(1)


class ZeroBNBlock(nn.Module):
    """conv-BN-relu-conv-BN + identity, the last BN's gamma zero (timm ``zero_init_last``)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        nn.init.zeros_(self.b2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


class ZeroConvBlock(nn.Module):
    """No BN: the branch's last conv has zero weight and bias (a "ReZero"-like start)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.c2.weight)
        nn.init.zeros_(self.c2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c2(torch.tanh(self.c1(x)))


class ResNet(nn.Module):
    def __init__(self, block: type[nn.Module], n: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*[block(8) for _ in range(n)])
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(F.relu(self.stem(x))).mean((2, 3)))


class CopiedHead(nn.Module):
    """A backbone and two heads, the second a deep copy of the first (one-to-one detection heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
        self.head2 = copy.deepcopy(self.head)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(x)
        return self.head(f), torch.sigmoid(self.head2(f.detach()))


class TiedBranches(nn.Module):
    """Two convs with one weight tensor in parallel branches reading one tensor, with different
    downstream ops, concatenated; a third with the same weight on a different tensor further on."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.b.weight, self.b.bias = self.a.weight, self.a.bias  # tied
        self.mix = nn.Conv2d(16, 8, 1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.c.weight, self.c.bias = self.a.weight, self.a.bias
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.stem(x))
        z = torch.cat([F.relu(self.a(y)), torch.sigmoid(self.b(y)) * 2.0], 1)
        return self.fc(self.c(F.relu(self.mix(z))).mean((2, 3)))


def _table(path: Path) -> dict[str, list[float]]:
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            k, *v = line.split()
            rows[k] = [float(x) for x in v]
    return rows


def _torch_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, np.ndarray]:
    """Each named module's input on ``x`` (eval, folded or not: the QAT model's own layers)."""
    got, mods, hs = {}, dict(model.named_modules()), []
    for n in names:
        hs.append(mods[n].register_forward_pre_hook(lambda m, a, n=n: got.__setitem__(n, a[0].detach().clone())))
    with torch.no_grad():
        model.eval()(x)
    for h in hs:
        h.remove()
    return {n: t.numpy() for n, t in got.items()}


class CopiedHeadTwoLevels(nn.Module):
    """One head and its deep copy on two feature levels (a detection head per stride)."""

    def __init__(self) -> None:
        super().__init__()
        self.p3 = nn.Conv2d(3, 8, 3, padding=1)
        self.p4 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
        self.head4 = copy.deepcopy(self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f3 = F.relu(self.p3(x))
        f4 = F.relu(self.p4(f3))
        return torch.cat([self.head(f3).flatten(2), self.head4(f4).flatten(2)], 2)


def _export_and_check(model: nn.Module, tmp_path: Path, shape=(3, 8, 8), merged: bool = False) -> dict:
    """Prepare, one training-mode forward (ranges, weights untouched: still freshly initialised),
    export; then check every layer's match independently. Returns report.json."""
    torch.manual_seed(0)
    x = torch.randn(6, *shape)
    prepare_qat(model, x[:1])
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    rep = export(model, tmp_path, x[:1], x, targets=["x86"], verbose=False, timing_runs=0)
    assert rep.ok, rep.summary()
    assert rep.int8_vs_qat.cosine > 0.999, rep.summary()
    infos = {i.name: i for i in quantized_layers(model)}
    names = {r.torch_name: r.ncnn_name for r in rep.layers}
    onnx_names = {r.torch_name: r.onnx_name for r in rep.layers}
    assert set(names) == set(infos)
    assert merged or len(set(names.values())) == len(names)  # one converted layer per torch layer unless merged
    # the scales written per layer are that layer's own
    for table, key in ((_table(tmp_path / "model.ncnn.table"), names), (_table(tmp_path / "model.table"), onnx_names)):
        for t, info in infos.items():
            assert table[key[t]] == pytest.approx([float(info.input_scale)], rel=1e-6), (t, key[t])
            assert table[f"{key[t]}_param_0"] == pytest.approx(info.weight_scales.reshape(-1).tolist(), rel=1e-6)
    # the blob each ncnn layer reads is the torch layer's own input (float ncnn model vs QAT model's float path)
    param = NcnnParam.parse((tmp_path / "model.ncnn.param").read_text())
    bottoms = {t: param.layer(n).bottoms[0] for t, n in names.items()}
    res = run_ncnn(tmp_path / "model.ncnn.param", tmp_path / "model.ncnn.bin", {"in0": x[:2].numpy()},
                   sorted(set(bottoms.values())), {"num_threads": 1, "use_fp16_storage": False}, light_mode=False)
    from lightning_ncnnqat.qat.prepared import folded_float_model

    want = _torch_inputs(folded_float_model(model), list(infos), x[:2])
    for t, b in bottoms.items():
        g, w = res.outputs[b].reshape(2, -1).astype(np.float64), want[t].reshape(2, -1).astype(np.float64)
        cos = float((g * w).sum() / (np.linalg.norm(g) * np.linalg.norm(w) + 1e-30))
        assert cos > 0.9999, (t, names[t], cos)
    return json.loads((tmp_path / "report.json").read_text())


@pytest.mark.parametrize("block", [ZeroBNBlock, ZeroConvBlock])
def test_zero_initialised_residual_branches_export(block: type[nn.Module], tmp_path: Path) -> None:
    model = ResNet(block)
    _export_and_check(model, tmp_path)
    infos = quantized_layers(model)
    zero = [i.name for i in infos if not i.weight.any()]
    assert len(zero) == 3  # the three branch ends really are identical (all zero) when matched


def test_deep_copied_head_exports_two_outputs(tmp_path: Path) -> None:
    """Both heads read one tensor: pnnx computes the copy once; both torch heads use its rows."""
    model = CopiedHead()
    d = _export_and_check(model, tmp_path, merged=True)
    assert len(d["outputs"]) == 2
    assert any("computes them once" in n and "'head2.0'" in n for n in d["notes"]), d["notes"]


def test_deep_copied_head_on_two_levels(tmp_path: Path) -> None:
    model = CopiedHeadTwoLevels()
    d = _export_and_check(model, tmp_path)
    by = {r["torch_name"]: r["ncnn_name"] for r in d["layers"]}
    assert by["head.0"] != by["head4.0"] and by["head.2"] != by["head4.2"]


def test_tied_parallel_branches_with_different_downstream_ops(tmp_path: Path) -> None:
    model = TiedBranches()
    d = _export_and_check(model, tmp_path, merged=True)
    # a and b read one tensor with one weight: pnnx computes them once, and the report says so;
    # c (same weight, another tensor) is told apart by its place: its own layer and input scale
    assert any("['a', 'b']" in n and "computes them once" in n for n in d["notes"]), d["notes"]
    by = {r["torch_name"]: r["ncnn_name"] for r in d["layers"]}
    assert by["a"] == by["b"] != by["c"]


class TiedLinearHeads(nn.Module):
    """Two Linear heads sharing ONE weight Parameter (own biases) on different inputs, concatenated
    (weight tying, torch's word_language_model): fed by the same layer, feeding the same output, so
    their place is the same; the exporter keeps one weight initializer for both Gemms. Their
    biases tell them apart."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU())
        self.h1 = nn.Linear(16, 8)
        self.h2 = nn.Linear(16, 8)
        self.h2.weight = self.h1.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.f(x).mean((2, 3))
        return torch.cat([self.h1(z), self.h2(torch.relu(z) * 0.5)], 1)


class TiedConvs(nn.Module):
    """Two convs sharing one weight Parameter (own biases) on different inputs (a feature map and
    its tanh), added: same place on both sides, told apart by their biases."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.b.weight = self.a.weight
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.stem(x))
        y2 = torch.tanh(F.max_pool2d(y, 3, 1, 1))
        return self.fc((F.relu(self.a(y)) + torch.sigmoid(self.b(y2))).mean((2, 3)))


@pytest.mark.parametrize("cls, pair", [(TiedLinearHeads, ("h1", "h2")), (TiedConvs, ("a", "b"))])
def test_tied_weights_on_different_inputs_get_their_own_rows(cls: type[nn.Module], pair: tuple[str, str],
                                                             tmp_path: Path) -> None:
    """Exports ok; each tied layer has its own converted layer, and the input scale and weight
    scales written for it in model.ncnn.table and model.table are its own (``_export_and_check``)."""
    model = cls()
    assert getattr(model, pair[0]).weight is getattr(model, pair[1]).weight
    d = _export_and_check(model, tmp_path)
    by = {r["torch_name"]: (r["ncnn_name"], r["onnx_name"]) for r in d["layers"]}
    assert by[pair[0]][0] != by[pair[1]][0] and by[pair[0]][1] != by[pair[1]][1]
    infos = {i.name: i for i in quantized_layers(model)}
    # the two inputs really differ, so a swap would write the wrong input scale
    assert float(infos[pair[0]].input_scale) != pytest.approx(float(infos[pair[1]].input_scale), rel=1e-3)


def test_tied_weight_and_bias_on_alike_places_are_named_not_guessed(tmp_path: Path) -> None:
    """Tied heads sharing weight AND bias, fed and feeding alike: nothing tells them apart, so the
    export fails naming both and the way out, never writing one's rows for the other."""
    from lightning_ncnnqat.errors import ExportError

    torch.manual_seed(0)
    model = TiedLinearHeads()
    model.h2.bias = model.h1.bias
    x = torch.randn(6, 3, 8, 8)
    prepare_qat(model, x[:1])
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    with pytest.raises(ExportError, match=r"'h1' cannot be told apart.*\['h1', 'h2'\].*tied.*QATConfig\(skip"):
        export(model, tmp_path, x[:1], x, targets=["x86"], verbose=False, timing_runs=0)


def test_onnx_owners_carry_biases_for_tied_gemms() -> None:
    """The ONNX owners hold each Gemm's / Conv's constant bias (a Gemm's C times beta)."""
    from lightning_ncnnqat.conversion.onnx import export_onnx, onnx_weight_owners

    torch.manual_seed(1)
    model = TiedLinearHeads().eval()
    res = export_onnx(model, [torch.randn(1, 3, 8, 8)])
    owners = {tuple(np.round(o.weight[:3], 6)): o for o in onnx_weight_owners(res.model_bytes) if o.kind == "InnerProduct"}
    gemms = [o for o in onnx_weight_owners(res.model_bytes) if o.kind == "InnerProduct"]
    assert len(gemms) == 2 and len(owners) == 1  # one weight, two layers
    got = sorted(tuple(np.round(o.bias, 6)) for o in gemms)
    want = sorted(tuple(np.round(m.bias.detach().numpy(), 6)) for m in (model.h1, model.h2))
    assert got == want


def _info(name: str, w: torch.Tensor, scale: float) -> object:
    from types import SimpleNamespace

    return SimpleNamespace(name=name, kind="Convolution", weight=w, bias=None, input_scale=scale, weight_bits=8,
                           num_groups=1, weight_scales=None)


def test_alike_layers_reading_different_tensors_are_named_not_guessed() -> None:
    """Two torch layers with one weight, fed and feeding alike but reading different tensors
    (different input scales): no place tells them apart, so the error names both."""
    w = torch.ones(2, 2, 1, 1)
    infos = [_info("p", w, 1.0), _info("q", w, 2.0)]
    owners = [WeightOwner("L1", "Convolution", w.numpy().ravel(), None, 1),
              WeightOwner("L2", "Convolution", w.numpy().ravel(), None, 2)]
    torch_w = Wiring([("p", ["0"], ["1"]), ("relu@2", ["0"], ["2"]), ("q", ["2"], ["3"]), ("add@4", ["1", "3"], ["4"])],
                     ["0"], ["4"])
    ncnn_w = Wiring([("L1#1", ["in0"], ["a"]), ("R#2b", ["in0"], ["b"]), ("L2#2", ["b"], ["c"]),
                     ("S#4", ["a", "c"], ["out0"])], ["in0"], ["out0"])
    # both are fed by in:0 and feed out:0 on either side: their place is the same, their inputs
    # (and input scales) differ, so no pairing is safe
    with pytest.raises(LayerError, match=r"cannot be told apart.*\['p', 'q'\]"):
        match_owners(infos, owners, "ncnn model", graphs=(torch_w, ncnn_w))


def _owners(w: torch.Tensor, *keys: tuple[str, int]) -> list[WeightOwner]:
    return [WeightOwner(n, "Convolution", w.numpy().ravel(), None, i) for n, i in keys]


def test_place_not_order_decides_when_the_converter_reorders_branches() -> None:
    """Two equal-weight layers feeding different outputs; the converted graph lists them in the
    other order: each is matched by the output it reaches, not by position."""
    w = torch.full((2, 2, 1, 1), 0.5)
    infos = [_info("a", w, 1.0), _info("b", w, 2.0)]
    torch_w = Wiring([("a", ["x"], ["ya"]), ("relu@1", ["x"], ["r"]), ("b", ["r"], ["yb"])], ["x"], ["ya", "yb"])
    ncnn_w = Wiring([("R#1", ["in0"], ["r"]), ("B#2", ["r"], ["out1"]), ("A#3", ["in0"], ["out0"])],
                    ["in0"], ["out0", "out1"])
    found = match_owners(infos, _owners(w, ("B", 2), ("A", 3)), "ncnn model", graphs=(torch_w, ncnn_w))
    assert {t: o.name for t, o in found.items()} == {"a": "A", "b": "B"}


def test_interchangeable_layers_are_paired_in_graph_order_with_a_note() -> None:
    """Equal weights, one input tensor (through a Split in ncnn), equal rows, same place: which is
    which changes nothing; they are paired in graph order and the report is told."""
    w = torch.full((2, 2, 1, 1), 0.5)
    infos = [_info("p", w, 1.0), _info("q", w, 1.0)]
    torch_w = Wiring([("p", ["x"], ["1"]), ("q", ["x"], ["2"]), ("add@2", ["1", "2"], ["3"])], ["x"], ["3"])
    ncnn_w = Wiring([("S#1", ["in0"], ["s0", "s1"]), ("L1#2", ["s0"], ["a"]), ("L2#3", ["s1"], ["b"]),
                     ("Add#4", ["a", "b"], ["out0"])], ["in0"], ["out0"], {"s0": "in0", "s1": "in0"})
    notes: list[str] = []
    found = match_owners(infos, _owners(w, ("L1", 2), ("L2", 3)), "ncnn model", graphs=(torch_w, ncnn_w), notes=notes)
    assert {t: o.name for t, o in found.items()} == {"p": "L1", "q": "L2"}
    assert len(notes) == 1 and "['p', 'q']" in notes[0] and "same table rows" in notes[0]
    # different input scales: not interchangeable, so named instead of paired
    with pytest.raises(LayerError, match="cannot be told apart"):
        match_owners([infos[0], _info("q", w, 3.0)], _owners(w, ("L1", 2), ("L2", 3)), "ncnn model",
                     graphs=(torch_w, ncnn_w))


def test_calibrate_with_ncnn_activations_on_zero_initialised_blocks() -> None:
    """calibrate(activations="ncnn") finds each zero-initialised conv's bottom blob by place: each
    calibrated input threshold matches the PyTorch calibration of that same layer."""
    from lightning_ncnnqat.calibration import calibrate

    torch.manual_seed(0)
    model = ResNet(ZeroConvBlock).eval()
    xs = torch.randn(8, 3, 8, 8)
    ours = calibrate(model, xs, method="kl", activations="ncnn")
    ref = calibrate(model, xs, method="kl")
    zero = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and not m.weight.any()]
    assert len(zero) == 3
    for n in zero:  # their inputs differ per block: a swapped blob would give another block's threshold
        assert float(ours.layers[n].input_scale) == pytest.approx(float(ref.layers[n].input_scale), rel=0.05), n
    assert len({round(float(ref.layers[n].input_scale), 3) for n in zero}) == 3
