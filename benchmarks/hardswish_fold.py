"""HardSwish folded into the conv: pnnx's conversion vs the export's, through the real ncnn2int8.

    python benchmarks/hardswish_fold.py [--width 32 --size 32 --runs 40]

pnnx leaves ``HardSwish`` as a layer of its own (its ncnn pass fuse_convolution_activation folds
only ReLU/LeakyReLU, Clip, Sigmoid, Mish), so ncnn2int8 finds no conv -> conv edge behind it and
fuses no requantize. The export folds it into the conv as ``activation_type`` 6
(``lightning_ncnnqat/conversion/activation_fold.py``; ncnn's legacy ``ncnnoptimize`` does the
same), and the x86/ARM requantize applies activation types 1-6. This script converts the same
QAT model's float form with pnnx alone (unfolded) next to the export's ``model.ncnn.*``
(folded), runs the REAL ncnn2int8 (``../shared/ncnn-tools``) on both with the export's table,
and reports requantized convs, int8 output agreement and speed side by side.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.append(str(p))

from deploy_speed import machine  # noqa: E402

from lightning_ncnnqat import export, prepare_qat  # noqa: E402
from lightning_ncnnqat.calibration.ncnn_tools import find_tools, run_ncnn2int8  # noqa: E402
from lightning_ncnnqat.ncnn.isolated import run_ncnn  # noqa: E402
from lightning_ncnnqat.conversion.model_io import FlatModel, model_io  # noqa: E402
from lightning_ncnnqat.conversion.pnnx import convert_with_pnnx  # noqa: E402
from lightning_ncnnqat.ncnn.param import NcnnParam  # noqa: E402
from lightning_ncnnqat.qat.prepared import folded_float_model  # noqa: E402
from lightning_ncnnqat.speed.plan import ModelToTime, count_chains, time_models  # noqa: E402


def net(width: int) -> nn.Module:
    c = width

    def cbh(cin: int, cout: int, k: int, s: int = 1, g: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(cout), nn.Hardswish()]

    return nn.Sequential(*cbh(3, c, 3), *cbh(c, c, 3), *cbh(c, 2 * c, 3, 2), *cbh(2 * c, 2 * c, 3, 1, 2 * c),
                         *cbh(2 * c, 2 * c, 1), *cbh(2 * c, 4 * c, 3, 2), *cbh(4 * c, 4 * c, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * c, 10))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--work", default="hardswish_fold_out")
    a = p.parse_args()
    tools = find_tools() or find_tools(ROOT.parent / "shared" / "ncnn-tools")
    if tools is None:
        print("ncnn's C++ tools (../shared/ncnn-tools or NCNN_TOOLS) are not built here: nothing to compare")
        return 2
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m, x = net(a.width), torch.randn(8, 3, a.size, a.size)
    prepare_qat(m, x[:1])
    m.train()
    m(x)
    m.eval()
    d = Path(a.work)
    rep = export(m, d, x[:1], x, verbose=False, targets=["x86"], timing_runs=0, check_onnx=False, layer_check_samples=1)
    assert not rep.failures, rep.failures
    # pnnx's own conversion of the same float model: what the export had before its fold
    raw = convert_with_pnnx(FlatModel(folded_float_model(m).eval(), model_io(m, x[:1])), [x[:1]])
    (d / "unfolded.param").write_text(raw.param_text)
    (d / "unfolded.bin").write_bytes(raw.bin_bytes)
    param = NcnnParam.parse(raw.param_text)
    hs = [sum(lay.type == "HardSwish" for lay in NcnnParam.parse(t).layers)
          for t in (raw.param_text, (d / "model.ncnn.param").read_text())]
    folded = hs[0] - hs[1]
    for stem, src in (("tool", "unfolded"), ("tool_folded", "model.ncnn")):
        run_ncnn2int8(tools, d / f"{src}.param", d / f"{src}.bin", d / "model.ncnn.table", d / f"{stem}.int8.param",
                      d / f"{stem}.int8.bin")
    xs = {"in0": x.numpy()}
    # the features before global pooling (the head's output is mostly its bias on random weights)
    feat = next(lay.bottoms[0] for lay in param.layers if lay.type == "Pooling")
    outs = {k: run_ncnn(d / f"{k}.param", d / f"{k}.bin", xs, [feat]).outputs[feat].reshape(len(x), -1)
            for k in ("unfolded", "tool.int8", "tool_folded.int8", "model.ncnn")}

    def cos(u: np.ndarray, v: np.ndarray) -> float:
        return float((u * v).sum() / np.sqrt((u * u).sum() * (v * v).sum()))

    print(f"folded {folded} HardSwish layers into their convs")
    print(f"features before pooling ({feat}): float folded (model.ncnn) vs unfolded: max |diff| {np.abs(outs['model.ncnn'] - outs['unfolded']).max():.2e}")
    print(f"int8 folded vs int8 unfolded (both ncnn2int8): cosine {cos(outs['tool_folded.int8'], outs['tool.int8']):.8f}; "
          f"vs float: {cos(outs['tool_folded.int8'], outs['unfolded']):.8f} (unfolded {cos(outs['tool.int8'], outs['unfolded']):.8f})")
    shape = {"in0": [3, a.size, a.size]}
    models = [ModelToTime(k, str(d / f"{k}.param"), str(d / f"{k}.bin"), shape, ["out0"], {"num_threads": 1})
              for k in ("unfolded", "model.ncnn", "tool.int8", "tool_folded.int8")]
    t = time_models(models, runs=a.runs)
    mi = machine()
    print(f"\n1 thread, {a.runs} interleaved runs; {mi['cpu']}, load {mi['load_1min']:.1f}, ncnn {mi['ncnn']}")
    print("| model | CPU ms median [min-max] | vs float (CPU) | requantized / int8 convs |\n|---|---|---|---|")
    for k, v in t.items():
        c = count_chains((d / f"{k}.param").read_text()) if "int8" in k else None
        ch = f"{c.requantized} / {c.int8_convs}" if c else "-"
        print(f"| {k} | {v.cpu_median_ms:.3f} [{v.cpu_min_ms:.3f}-{v.cpu_max_ms:.3f}] | "
              f"{t['unfolded'].ms('cpu') / v.ms('cpu'):.2f}x | {ch} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
