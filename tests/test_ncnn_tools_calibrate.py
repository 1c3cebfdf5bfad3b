"""``calibrate()`` against ncnn's real ncnn2table on the same model and the same inputs.

The float ncnn model is the BN-folded float model converted by pnnx (``fp16=0``); the tool reads
the same float32 samples from ``.npy`` (``type=1``, ``thread=1``). Our table, printed the way the
tool prints it (``%f``), must equal the tool's file byte for byte: weight rows and input rows,
KL and ACIQ, on a plain conv net, a depthwise net and a residual net with a Linear head.

EQ cannot be compared: the tool crashes (see ``test_eq_crashes_inside_the_real_tool``).
Skipped where ``../shared/ncnn-tools`` (or ``$NCNN_TOOLS``) is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat.calibration import calibrate
from lightning_ncnnqat.calibration.api import _folded_copy
from lightning_ncnnqat.calibration.ncnn_tools import ToolRun, run_ncnn2table, tool_thresholds
from lightning_ncnnqat.calibration.table import layer_order
from lightning_ncnnqat.conversion.pnnx import convert_with_pnnx
from lightning_ncnnqat.ncnn.table import parse_table

TOOLS = Path(os.environ.get("NCNN_TOOLS") or Path(__file__).resolve().parents[2] / "shared" / "ncnn-tools")
pytestmark = pytest.mark.skipif(
    not (TOOLS / "ncnn2table").is_file(), reason=f"ncnn's C++ tools are not at {TOOLS} (set NCNN_TOOLS)"
)


# -------------------------------------------------------------------------------------- models


class PlainNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.c1(x)))
        x = F.relu(self.c2(x))
        x = F.relu(self.c3(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DepthwiseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.dw1 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.pw1 = nn.Conv2d(16, 24, 1)
        self.dw2 = nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24)
        self.pw2 = nn.Conv2d(24, 32, 1)
        self.fc = nn.Linear(32, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu6(self.bn1(self.dw1(x)))
        x = F.relu(self.pw1(x))
        x = F.relu(self.dw2(x))
        x = F.relu(self.pw2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ResidualNet(nn.Module):
    """Stem, an identity block, a downsampling block whose input feeds a 3x3 and a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        c = 8
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(c)
        self.a1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.a1_bn = nn.BatchNorm2d(c)
        self.a2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.a2_bn = nn.BatchNorm2d(c)
        self.b1 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False)
        self.b1_bn = nn.BatchNorm2d(2 * c)
        self.b2 = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.short = nn.Conv2d(c, 2 * c, 1, stride=2)
        self.head = nn.Linear(2 * c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        x = F.relu(self.a2_bn(self.a2(F.relu(self.a1_bn(self.a1(x))))) + x)
        x = F.relu(self.b2(F.relu(self.b1_bn(self.b1(x)))) + self.short(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DyadicNet(nn.Module):
    """Weights, biases and inputs on a coarse power-of-two grid, only layers without Winograd
    (stride-2 3x3, depthwise, 1x1), a 4x4 global pool: every float sum is exact in any order, so
    PyTorch and ncnn produce bit-identical activations and the tables must be byte-identical."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 12, 1)
        self.fc = nn.Linear(12, 4)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for m in (self.c1, self.dw, self.pw, self.fc):
                m.weight.copy_(torch.randint(-8, 9, m.weight.shape, generator=g) / 16)
                m.bias.copy_(torch.randint(-4, 5, m.bias.shape, generator=g) / 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c1(x))
        x = F.relu(self.dw(x))
        x = F.relu(self.pw(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and non-trivial BN statistics (so folding changes the weights)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.4, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def samples(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g) * torch.tensor([1.0, 1.5, 0.7])[:, None, None] + 0.1


CASES = {
    "dyadic": (DyadicNet, 16),
    "plain": (PlainNet, 16),
    "depthwise": (DepthwiseNet, 24),
    "residual": (ResidualNet, 32),
}


# --------------------------------------------------------------------------------- the tool


def tool_run(param: Path, bin_: Path, xs: torch.Tensor, method: str, work: Path) -> ToolRun:
    """The real ncnn2table on ``xs`` ``[N, C, H, W]`` (type=1, thread=1) into ``work/<method>.table``."""
    work.mkdir(parents=True, exist_ok=True)
    return run_ncnn2table(TOOLS, param, bin_, xs, method, work / f"{method}.table")


def converted(model: nn.Module, xs: torch.Tensor, work: Path) -> None:
    """``work/m.param``, ``work/m.bin``: the BN-folded float model through pnnx (fp16=0)."""
    folded, _ = _folded_copy(model, xs[:1], None)
    pn = convert_with_pnnx(folded, xs[:1])
    (work / "m.param").write_text(pn.param_text)
    (work / "m.bin").write_bytes(pn.bin_bytes)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    cls, size = CASES[request.param]
    torch.set_num_threads(1)
    model = randomized(cls(), seed=len(request.param))
    xs = samples(12, size, seed=7)
    if request.param == "dyadic":
        xs = torch.round(xs * 8) / 8
    work = tmp_path_factory.mktemp(request.param)
    converted(model, xs, work)
    return request.param, model, xs, work


_TOOL_RUNS: dict[tuple[str, str], ToolRun] = {}


def tool_table(case, method: str) -> ToolRun:  # noqa: ANN001
    """The tool's run for ``case`` (table in ``work/<method>/<method>.table``), once per module."""
    name, _, xs, work = case
    if (name, method) not in _TOOL_RUNS:
        _TOOL_RUNS[name, method] = tool_run(work / "m.param", work / "m.bin", xs, method, work / method)
    proc = _TOOL_RUNS[name, method]
    assert proc.ok, proc.message
    return proc


@pytest.mark.parametrize("method", ["kl", "aciq"])
def test_tables_equal_the_real_ncnn2table(case, method: str) -> None:
    """Weight rows: byte-identical on every model. Input rows: byte-identical where the float
    activations are bit-identical (the model input itself; every layer of the dyadic model).
    Deeper layers of float models see activations that differ by a few ulp between PyTorch and
    the tool's ncnn build (different summation orders, Winograd): ACIQ's scale then moves by a few
    ulp of absmax (< 1e-6 relative); KL's chosen bin can move by a few bins, because a handful of
    values cross a bin edge and the KL curve is flat near its minimum (measured: <= 4 bins, 0.25%)."""
    name, model, xs, work = case
    proc = tool_table(case, method)
    tool_text = (work / method / f"{method}.table").read_text()
    # batches of 5: how the batch is cut must not matter (the tool runs one sample at a time)
    res = calibrate(model, [xs[i : i + 5] for i in range(0, len(xs), 5)], method=method)
    names = res.ncnn_names(work / "m.param", work / "m.bin")
    ours = res.table_text(names, layer_order(work / "m.param"), style="ncnn2table")
    tool_w, tool_in = parse_table(tool_text)
    ours_w, ours_in = parse_table(ours)
    assert set(tool_in) == set(names.values()), "the tool and the plan quantize the same layers"
    assert ours_w == tool_w  # every weight row, as printed
    rel = {t: abs(ours_in[n] - tool_in[n]) / tool_in[n] for t, n in names.items()}
    worst = max(rel.values())
    print(f"\n{name} {method}: max relative input-scale difference vs ncnn2table {worst:.3g} ({rel})")
    first = next(iter(res.layers))
    assert ours_in[names[first]] == tool_in[names[first]]  # its input is the data: exact
    if name == "dyadic":
        assert ours == tool_text
        return
    if method == "aciq":
        assert worst < 1e-6
        return
    maxes = tool_thresholds(proc.stderr)
    for t, n in names.items():
        c = res.layers[t]
        tool_max, tool_thr = maxes[n]
        assert abs(c.input_absmax - tool_max) <= 1e-6 * max(1.0, tool_max)
        tool_bin = round(tool_thr / tool_max * 2048 - 0.5)
        assert abs(c.threshold_bin - tool_bin) <= 8, (t, c.threshold_bin, tool_bin)
    assert worst < 5e-3


@pytest.mark.parametrize("method", ["kl", "aciq"])
def test_ncnn_activations_give_the_tools_table(case, method: str) -> None:
    """``activations="ncnn"`` computes the layer inputs in ncnn's float runtime, as the tool does:
    the table is then byte-identical to the tool's on the dyadic, plain and depthwise models, for
    KL and ACIQ, where PyTorch's activations already move input rows. The tool's ncnn build and
    the pip wheel's are not the same binary (the tool has the x86 FMA kernels, the wheel only its
    AVX and AVX-512 ones), so a deep 3x3 conv can still round one value differently: the residual
    model may keep one row off, by at most 2 ulp of its absmax (measured on 12 random models:
    4 of 80 ACIQ rows differ with ncnn activations, 38 of 80 with PyTorch's)."""
    name, model, xs, work = case
    tool_table(case, method)
    tool_text = (work / method / f"{method}.table").read_text()
    res = calibrate(model, [xs[i : i + 5] for i in range(0, len(xs), 5)], method=method, activations="ncnn")
    names = res.ncnn_names(work / "m.param", work / "m.bin")
    ours = res.table_text(names, layer_order(work / "m.param"), style="ncnn2table")
    if name != "residual":
        assert ours == tool_text
        return
    tool_w, tool_in = parse_table(tool_text)
    ours_w, ours_in = parse_table(ours)
    assert ours_w == tool_w
    off = {n: abs(ours_in[n] - tool_in[n]) / tool_in[n] for n in tool_in if ours_in[n] != tool_in[n]}
    print(f"\nresidual {method}: rows off with ncnn activations {off}")
    assert len(off) <= 1 and all(v < 3e-7 for v in off.values()), off


def test_eq_crashes_inside_the_real_tool(tmp_path: Path) -> None:
    """ncnn2table's EQ indexes its input lists with the loop variables of the scale search
    (``shapes[j]`` / ``listspaths[j][i]``, j = weight channel, i = layer) instead of the input
    and the sample (``jj`` / ``ii``). The second weight channel of the first layer reads past the
    one-input vectors: the process dies (SIGSEGV measured) after printing channel 0's result and
    writes no table. Our EQ runs the intended search on the same model and inputs."""
    torch.set_num_threads(1)
    model = randomized(PlainNet(), seed=5)
    xs = samples(2, 16, seed=7)  # the tool rebuilds an int8 layer 100 times per sample: keep it short
    converted(model, xs, tmp_path)
    proc = tool_run(tmp_path / "m.param", tmp_path / "m.bin", xs, "eq", tmp_path / "eq")
    assert proc.returncode != 0
    assert " w 0  = " in proc.stderr and " w 1  = " not in proc.stderr
    table = tmp_path / "eq" / "eq.table"
    assert not table.exists() or table.read_text() == ""
    kl = calibrate(model, xs, method="kl")
    res = calibrate(model, xs, method="eq")
    for name, c in res.layers.items():
        s_kl = kl.layers[name].input_scale
        assert s_kl * 0.5 <= c.input_scale < s_kl * 2.0
        assert torch.isfinite(c.weight_scales).all() and (c.weight_scales > 0).all()
        assert (c.weight_scales >= kl.layers[name].weight_scales * 0.5).all()
