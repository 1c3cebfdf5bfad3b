"""What pnnx turns torch layers into, and finding each one by its weights whatever its ncnn type:
a 1x1 conv on a 1x1 map becomes InnerProduct (squeeze-excitation), Linear on 3-D/4-D input
becomes Gemm, a reflect-padded conv gets a Padding layer, a constant used twice gives repeated
``splitncnn_N`` names. The int8 writer quantizes each as the layer it became."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import ncnn
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat.errors import LayerError
from lightning_ncnnqat.ncnn.int8_writer import Int8Spec, write_int8
from lightning_ncnnqat.conversion.matching import converted_int8_kind, match_by_weights, match_owners, ncnn_weight_owners
from lightning_ncnnqat.ncnn.param import NcnnParam, bin_layout
from lightning_ncnnqat.conversion.pnnx import convert_with_pnnx
from lightning_ncnnqat.ncnn.table import TableRow, format_table


class SqueezeExcite(nn.Module):
    """reflect-padded stem, SE block (1x1 convs on the pooled map), 1x1 depthwise on a 1x1
    map, Linear after flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.se1, self.se2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.dw = nn.Conv2d(8, 8, 1, groups=8)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = x * torch.sigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(x, 1)))))
        d = self.dw(F.adaptive_avg_pool2d(x, 1))
        return self.fc(torch.flatten(F.max_pool2d(x, 2) + d, 1))


class Tokens(nn.Module):
    """Linear on a 4-D (channels-last) and on a 3-D tensor, then on 2-D."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.l4, self.l3, self.head = nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.l4(self.c(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(self.l3(x.flatten(2).transpose(1, 2)).mean(1))


class SharedConstant(nn.Module):
    """One parameter read twice: pnnx emits two layers called splitncnn_0."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.s = nn.Parameter(torch.full((8, 1, 1), 0.5))
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.s * torch.relu(x)
        x = x + self.s * torch.sigmoid(x)
        return self.head(x.mean((2, 3)))


#: torch module -> the ncnn type pnnx 20261020 makes of it (checked here)
EXPECTED = {
    "squeeze": {"stem": "Convolution", "se1": "InnerProduct", "se2": "InnerProduct", "dw": "ConvolutionDepthWise",
                "fc": "InnerProduct"},
    "tokens": {"c": "Convolution", "l4": "Gemm", "l3": "Gemm", "head": "InnerProduct"},
    "shared": {"stem": "Convolution", "head": "InnerProduct"},
}
MODELS = {"squeeze": SqueezeExcite, "tokens": Tokens, "shared": SharedConstant}


def _kind(mod: nn.Module) -> str:
    if isinstance(mod, nn.Linear):
        return "InnerProduct"
    return "Convolution" if mod.groups == 1 else "ConvolutionDepthWise"


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
    torch.manual_seed(0)
    m = MODELS[request.param]().eval()
    x = torch.randn(1, 3, 8, 8)
    res = convert_with_pnnx(m, x)
    infos = [
        SimpleNamespace(name=n, kind=_kind(getattr(m, n)), weight=getattr(m, n).weight, bias=getattr(m, n).bias)
        for n in EXPECTED[request.param]
    ]
    return request.param, m, x, NcnnParam.parse(res.param_text), res.bin_bytes, infos


def test_match_finds_every_layer_whatever_its_type(case) -> None:
    name, m, _, param, data, infos = case
    owners = ncnn_weight_owners(param, data)
    found = match_owners(infos, owners, "ncnn model")
    assert {t: o.kind for t, o in found.items()} == EXPECTED[name]
    for t, o in found.items():
        assert param.layers[o.index].name == o.name and param.layers[o.index].type == o.kind
    assert match_by_weights(infos, owners, "ncnn model") == {t: o.name for t, o in found.items()}
    assert {converted_int8_kind(o.kind) for o in found.values()} <= {"table", "gemm"}
    if name == "squeeze":  # pnnx's Padding for padding_mode='reflect', then the conv without padding
        stem = param.layers[found["stem"].index]
        pad = param.producer(stem.bottoms[0])
        assert pad.type == "Padding" and pad.get_int(4, 0) == 2 and stem.get_int(4, 0) == 0
        assert param.layers[found["se1"].index].get_int(9, 0) == 1  # ReLU fused into the InnerProduct
    if name == "shared":
        assert param.duplicate_names() == ["splitncnn_0"]


def test_unmatched_weights_name_the_layer(case) -> None:
    name, _, _, param, data, infos = case
    bad = SimpleNamespace(name="net.other", kind="Convolution", weight=torch.ones(3, 3, 1, 1), bias=None)
    with pytest.raises(LayerError, match="net.other") as info:
        match_owners([*infos, bad], ncnn_weight_owners(param, data), "ncnn model")
    assert info.value.layer == "net.other"


def _specs(m: nn.Module, x: torch.Tensor, found: dict) -> dict[str, Int8Spec]:
    """Table-driven layers: per-channel weight scales, input scale from the float activations."""
    acts: dict[str, torch.Tensor] = {}
    mods = {t: getattr(m, t) for t, o in found.items() if converted_int8_kind(o.kind) == "table"}
    hooks = [mod.register_forward_hook(lambda mod, a, o, t=t: acts.__setitem__(t, a[0])) for t, mod in mods.items()]
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    specs = {}
    for t, mod in mods.items():
        w = mod.weight.detach().reshape(mod.weight.shape[0], -1).numpy()
        scales = (127 / np.abs(w).max(1)).astype(np.float32)
        specs[found[t].name] = Int8Spec(found[t].name, t, scales, 127.0 / float(acts[t].abs().max()))
    return specs


def test_quantized_as_the_converted_type(case, tmp_path: Path) -> None:
    """param 8 = 2 for Convolution/InnerProduct (per-output-channel scales), 1 for depthwise
    (per group); Gemm quantized by ncnn2int8's own rule; the model runs close to float."""
    name, m, x, param, data, infos = case
    found = match_owners(infos, ncnn_weight_owners(param, data), "ncnn model")
    specs = _specs(m, x, found)
    res = write_int8(param, data, specs)
    out = NcnnParam.parse(res.param_text)
    layout = bin_layout(out, res.bin_bytes).by_index
    for t, o in found.items():
        lay, roles = out.layers[o.index], [e.role for e in layout[o.index]]
        if o.kind == "Gemm":
            assert lay.get_int(18, 0) == 2 and o.name in res.gemm_int8
            continue
        assert lay.get_int(8, 0) == res.int8_scale_term[o.name] == (1 if o.kind == "ConvolutionDepthWise" else 2)
        assert roles[-2:] == ["weight_scales", "input_scale"]
        assert layout[o.index][-2].count == len(specs[o.name].weight_scales) == getattr(m, t).weight.shape[0]
    (tmp_path / "m.param").write_text(res.param_text)
    (tmp_path / "m.bin").write_bytes(res.bin_bytes)
    net = ncnn.Net()
    net.opt.num_threads = 1
    assert net.load_param(str(tmp_path / "m.param")) == 0 and net.load_model(str(tmp_path / "m.bin")) == 0
    xin = np.ascontiguousarray(x[0].numpy())
    with net.create_extractor() as ex:
        ex.input("in0", ncnn.Mat(xin))
        ret, got = ex.extract("out0")
        got = np.array(got, copy=True).ravel()
    assert ret == 0
    with torch.no_grad():
        want = m(x).numpy().ravel()
    cos = float(np.dot(got, want) / (np.linalg.norm(got) * np.linalg.norm(want)))
    assert cos > 0.99, (name, cos)


def _tool() -> Path | None:
    tools = Path(os.environ.get("NCNN_TOOLS", Path(__file__).resolve().parents[2] / "shared" / "ncnn-tools"))
    return tools / "ncnn2int8" if (tools / "ncnn2int8").is_file() else None


@pytest.mark.skipif(_tool() is None, reason="ncnn2int8 not found (../shared/ncnn-tools or NCNN_TOOLS)")
def test_byte_identical_to_ncnn2int8(case, tmp_path: Path) -> None:
    name, m, x, param, data, infos = case
    found = match_owners(infos, ncnn_weight_owners(param, data), "ncnn model")
    specs = _specs(m, x, found)
    res = write_int8(param, data, specs)
    rows = [TableRow(n, s.torch_name, tuple(map(float, s.weight_scales)), s.input_scale) for n, s in specs.items()]
    (tmp_path / "f.param").write_text(param.to_text())
    (tmp_path / "f.bin").write_bytes(data)
    (tmp_path / "t.table").write_text(format_table(rows, "ncnn layer"))
    subprocess.run([str(_tool()), "f.param", "f.bin", "r.param", "r.bin", "t.table"], cwd=tmp_path, check=True,
                   capture_output=True)
    assert (tmp_path / "r.param").read_text() == res.param_text_ncnn2int8, name
    assert (tmp_path / "r.bin").read_bytes() == res.bin_bytes, name
    # ours keeps what ncnn reads and ncnn2int8 drops (Reshape 12/13), appended to the same lines
    ours, tool = res.param_text.splitlines(), res.param_text_ncnn2int8.splitlines()
    assert len(ours) == len(tool) and all(a.startswith(b) for a, b in zip(ours, tool))
    extra = [a[len(b):] for a, b in zip(ours, tool) if a != b]
    assert all(e.startswith((" 12=", " 13=")) for e in extra)
    assert bool(extra) == ("12=0" in param.to_text())


def test_repeated_names_are_looked_up_by_index(case) -> None:
    """A repeated name parses and lays out; looking it up by name raises instead of guessing."""
    name, _, _, param, data, _ = case
    if name != "shared":
        pytest.skip("only the shared-constant model repeats a name")
    layout = bin_layout(param, data)
    assert layout["splitncnn_0"] == []  # Splits hold no data: the name is harmless there
    assert len(layout.by_index) == len(param.layers)
    with pytest.raises(KeyError, match="splitncnn_0"):
        param.layer("splitncnn_0")
    assert param.to_text() == NcnnParam.parse(param.to_text()).to_text()
    with pytest.raises(LayerError, match="names 2 layers"):
        write_int8(param, data, {"splitncnn_0": Int8Spec("splitncnn_0", "t", np.ones(1, np.float32), 1.0)})
