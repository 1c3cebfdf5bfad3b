"""Linear on 3-D/4-D input through QAT and the export as ncnn's int8 Gemm (issue 18).

Token models ((B, T, C) and channels-last (B, H, W, C)) are planned as ``QATPlan.gemm_layers``,
trained a step, exported with report.json: each Gemm is int8 (18=2) with the whole-weight scale,
bit-exact with the QAT forward in ncnn's runtime (x86, and the emulated A53/A76 when set up), no
layer flagged. Layers that cannot run as QAT's int8 Gemm stay float with their reason; a layer a
target measured wrong is re-planned as float, and the export then writes that Gemm in float.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat import export, prepare_qat
from lightning_ncnnqat.conversion.pnnx import convert_with_pnnx
from lightning_ncnnqat.ncnn.int8_gemm import GemmSpec, b_scale_of
from lightning_ncnnqat.ncnn.int8_writer import write_int8
from lightning_ncnnqat.ncnn.isolated import run_ncnn
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.ncnn.targets import environment_problem
from lightning_ncnnqat.ops import fake_quantize_gemm
from lightning_ncnnqat.qat.modules import QATGemmLinear
from lightning_ncnnqat.qat.plan import QATPlan, get_plan
from lightning_ncnnqat.qat.prepare import apply_plan, measured_float_reasons, replan_as_float, unprepare

_ARM = environment_problem()
if _ARM is not None and os.environ.get("LIGHTNING_NCNNQAT_REQUIRE_ARM") == "1":
    raise RuntimeError(f"LIGHTNING_NCNNQAT_REQUIRE_ARM=1 but {_ARM}")


class Tokens(nn.Module):
    """Patch stem -> (B, T, C) tokens -> MLP with a residual (two Gemms) -> mean -> 2-D head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, 4)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16, bias=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)
        t = t + self.fc2(F.relu(self.fc1(t)))
        return self.head(t.mean(1))


class ChannelsLast(nn.Module):
    """ConvNeXt-like block: depthwise conv, then a pointwise MLP on (B, H, W, C) (4-D Gemms)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 2, 2)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw1 = nn.Linear(16, 48)
        self.pw2 = nn.Linear(48, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(y))).permute(0, 3, 1, 2)
        return self.head((x + y).mean((2, 3)))


def _trained(model: nn.Module, x: torch.Tensor, **kw) -> QATPlan:
    """prepare_qat, then two SGD steps (ranges set, weights moved off their initial values)."""
    torch.manual_seed(0)
    plan = prepare_qat(model, x[:1], **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    model.eval()
    return plan


def _gemm_checks(report, target: str = "x86") -> dict[str, dict]:
    checks = report.layer_checks if target == "x86" else report.runtime[target]["layer_checks"]
    return {(c if isinstance(c, dict) else c.to_dict())["torch_name"]: (c if isinstance(c, dict) else c.to_dict())
            for c in checks}


def test_tokens_export_gemm_int8_bit_exact(tmp_path: Path) -> None:
    torch.manual_seed(1)
    m, x = Tokens(), torch.randn(6, 3, 16, 16)
    plan = _trained(m, x, targets=["x86"])  # the QAT start measures every int8 layer, Gemms included
    assert plan.gemm_layers == {"fc1": 3, "fc2": 3} and set(plan.layers) <= {"stem", "head"}  # speed may keep one float
    assert isinstance(m.fc1, QATGemmLinear) and "Gemm" in plan.summary()
    report = export(m, tmp_path, x[:1], x, targets=["x86"], verbose=False, timing_runs=0, check_onnx=False)
    kinds = {r.torch_name: r.kind for r in report.layers}
    assert kinds["fc1"] == kinds["fc2"] == "Gemm" and kinds.get("head", "InnerProduct") == "InnerProduct"
    param = NcnnParam.parse((tmp_path / "model.int8.param").read_text())
    gemms = [lay for lay in param.layers if lay.type == "Gemm"]
    assert len(gemms) == 2 and all(lay.get_int(18, 0) == 2 and lay.get_int(3, 0) == 1 for lay in gemms)
    checks = _gemm_checks(report)
    for name in ("fc1", "fc2"):  # ncnn's Gemm on its own input equals the op bit for bit
        assert checks[name]["isolated_max_rel_err"] == 0.0 and checks[name]["isolated_cosine"] > 1 - 1e-12, checks[name]
    assert report.flagged_layers == []
    assert report.runtime["x86"]["int8_vs_qat"]["cosine"] > 0.9999
    assert any("ncnn2int8 would take that scale from the weight's first row" in n for n in report.notes)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert {r["torch_name"] for r in saved["layers"] if r["kind"] == "Gemm"} == {"fc1", "fc2"}


@pytest.mark.skipif(_ARM is not None, reason=f"emulated ARM targets: {_ARM}")
def test_channels_last_gemms_on_arm_targets(tmp_path: Path) -> None:
    torch.manual_seed(2)
    m, x = ChannelsLast(), torch.randn(4, 3, 16, 16)
    plan = _trained(m, x)
    assert plan.gemm_layers == {"pw1": 4, "pw2": 4}
    targets = ["x86", "arm64-a53", "arm64-a76"]
    report = export(m, tmp_path, x[:1], x, targets=targets, verbose=False, timing_runs=0, layer_check_samples=1,
                    check_onnx=False)
    assert report.flagged_layers == []
    for target in targets:
        checks = _gemm_checks(report, target)
        for name in ("pw1", "pw2"):
            assert checks[name]["ok"] is True and checks[name]["isolated_cosine"] > 0.99999, (target, checks[name])
        assert report.runtime[target]["int8_vs_qat"]["cosine"] > 0.999, target


def test_layers_that_cannot_be_qat_gemms_stay_float_with_reasons() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 4, 4)
            self.normed = nn.utils.parametrizations.weight_norm(nn.Linear(8, 8))
            self.to_bn = nn.Linear(8, 8)
            self.bn = nn.BatchNorm1d(16)  # reads (B, T=16, C): normalises over the tokens
            self.plain = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.stem(x).flatten(2).transpose(1, 2)
            return self.plain(self.bn(self.to_bn(self.normed(t))))

    m = Odd()
    plan = prepare_qat(m, torch.randn(2, 3, 16, 16))
    assert plan.gemm_layers == {"plain": 3}
    assert "computed weight" in plan.float_layers["normed"]
    assert "feeds BatchNorm1d 'bn'" in plan.float_layers["to_bn"]


def test_measured_wrong_gemm_is_replanned_and_exported_float(tmp_path: Path) -> None:
    torch.manual_seed(3)
    m, x = Tokens(), torch.randn(4, 3, 16, 16)
    _trained(m, x)
    fc1_weight = m.fc1.weight
    reasons = measured_float_reasons(m, {"arm64-a53": {"fc1": 0.5, "not_a_layer": 0.1}})
    assert list(reasons) == ["fc1"] and "arm64-a53 (cosine 0.500)" in reasons["fc1"]
    plan = replan_as_float(m, x[:1], reasons)
    assert plan.gemm_layers == {"fc2": 3} and plan.float_layers["fc1"] == reasons["fc1"]
    assert type(m.fc1) is nn.Linear and m.fc1.weight is fc1_weight  # same Parameter, float again
    report = export(m, tmp_path, x[:1], x, targets=["x86"], verbose=False, timing_runs=0, check_onnx=False)
    param = NcnnParam.parse((tmp_path / "model.int8.param").read_text())
    terms = sorted(lay.get_int(18, 0) for lay in param.layers if lay.type == "Gemm")
    assert terms == [0, 2] and report.flagged_layers == []


def test_plan_roundtrip_and_unprepare() -> None:
    torch.manual_seed(4)
    m, x = Tokens(), torch.randn(2, 3, 16, 16)
    plan = prepare_qat(m, x[:1])
    d = plan.to_dict()
    assert d["gemm_layers"] == {"fc1": 3, "fc2": 3}
    fresh = Tokens()
    fresh.load_state_dict({k: v for k, v in m.state_dict().items() if "input_quantizer" not in k}, strict=False)
    apply_plan(fresh, QATPlan.from_dict(d))
    assert isinstance(fresh.fc2, QATGemmLinear)
    with torch.no_grad():
        t = torch.randn(1, 5, 16)
        assert torch.equal(fresh.fc1(t), fake_quantize_gemm(t, m.fc1.weight, m.fc1.bias))
    w = m.fc1.weight
    unprepare(m)
    assert type(m.fc1) is nn.Linear and m.fc1.weight is w
    assert "gemm_layers" not in QATPlan.from_dict({**d, "gemm_layers": {}}).to_dict()  # older form kept


def test_whole_weight_scale_departs_from_ncnn2int8(tmp_path: Path) -> None:
    """ncnn2int8 takes a transposed B's scale from its first row and clips the others; our writer's
    whole-B scale reproduces the QAT op exactly in ncnn, the tool's form measurably does not."""
    torch.manual_seed(5)
    lin = nn.Linear(12, 9)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.2, 3.0, 9)[:, None])  # row 0 has the smallest range
    x = torch.randn(1, 7, 12)
    conv = convert_with_pnnx(lin.eval(), x)
    param = NcnnParam.parse(conv.param_text)
    (gemm,) = [lay.name for lay in param.layers if lay.type == "Gemm"]
    w = lin.weight.detach()
    ours = write_int8(param, conv.bin_bytes, {}, quantize_gemm=False,
                      gemm_specs={gemm: GemmSpec(gemm, "lin", float(b_scale_of(w.numpy())))})
    tool = write_int8(param, conv.bin_bytes, {})  # ncnn2int8's own form, byte for byte
    clipped = tool.gemm_int8[gemm]["B_clipped"]
    assert clipped > 0 and ours.gemm_int8[gemm]["ncnn2int8_B_clipped"] == clipped
    want = fake_quantize_gemm(x[0], w, lin.bias.detach()).numpy()
    errs = {}
    for name, res in (("ours", ours), ("tool", tool)):
        (tmp_path / f"{name}.param").write_text(res.param_text)
        (tmp_path / f"{name}.bin").write_bytes(res.bin_bytes)
        out = run_ncnn(tmp_path / f"{name}.param", tmp_path / f"{name}.bin", {"in0": x.numpy()}, ["out0"]).outputs["out0"]
        errs[name] = float(np.abs(np.asarray(out, np.float32).reshape(want.shape) - want).max())
    assert errs["ours"] == 0.0 and errs["tool"] > 0.1 * np.abs(want).max(), errs


def test_qat_callback_trains_and_exports_gemms(tmp_path: Path) -> None:
    """The main job's path: QATCallback plans the Gemms at fit start (with the export preflight
    measuring them on x86), trains them and exports them int8 with no layer flagged."""
    from lightning_ncnnqat import QATCallback
    from lightning_ncnnqat.export.config import ExportConfig
    from lit_models import NetLit, loader, make_data, quiet_trainer

    torch.manual_seed(6)
    ds = make_data(32, 16, seed=6)
    lit = NetLit(Tokens(), lr=0.02, example=ds.tensors[0][:1])
    cb = QATCallback(start_epoch=0, export=ExportConfig(dir=str(tmp_path), targets=("x86",)))
    quiet_trainer(max_epochs=1, callbacks=[cb]).fit(lit, loader(ds), loader(ds))
    assert get_plan(lit).gemm_layers == {"net.fc1": 3, "net.fc2": 3}
    report = cb.export_report
    assert {r.torch_name.rsplit(".", 1)[-1] for r in report.layers if r.kind == "Gemm"} == {"fc1", "fc2"}
    assert report.flagged_layers == []
    param = NcnnParam.parse((tmp_path / "model.int8.param").read_text())
    assert [lay.get_int(18, 0) for lay in param.layers if lay.type == "Gemm"] == [2, 2]


def test_averaged_copy_of_a_submodule_follows_the_gemm_plan() -> None:
    """An EMA of a submodule gets the plan with names relative to it (qat/model_copies.sub_plan)."""
    from lightning_ncnnqat.qat.model_copies import follow, sub_plan

    outer = nn.Sequential()
    outer.add_module("net", Tokens())
    plan = prepare_qat(outer, torch.randn(1, 3, 16, 16))
    assert plan.gemm_layers == {"net.fc1": 3, "net.fc2": 3}
    ema = Tokens()
    follow(ema, sub_plan(plan, "net"), whole=False)
    assert isinstance(ema.fc1, QATGemmLinear) and get_plan(ema).gemm_layers == {"fc1": 3, "fc2": 3}


def test_a_model_of_gemms_only_is_prepared_and_exported(tmp_path: Path) -> None:
    """Tokens in, tokens out: every int8 layer is a Gemm (no table row at all)."""

    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(F.relu(self.a(x)))

    torch.manual_seed(7)
    m, x = Mlp(), torch.randn(4, 5, 8)
    plan = _trained(m, x)
    assert plan.layers == {} and plan.gemm_layers == {"a": 3, "b": 3}
    report = export(m, tmp_path, x[:1], x, targets=["x86"], verbose=False, timing_runs=0, check_onnx=False)
    assert report.flagged_layers == [] and report.runtime["x86"]["int8_vs_qat"]["cosine"] > 1 - 1e-9
    assert "" == (tmp_path / "model.ncnn.table").read_text().strip()


def test_one_row_per_sample_stays_float(tmp_path: Path) -> None:
    """A Linear on (B, 1, C) (a class token): pnnx writes an InnerProduct or a Gemm depending on
    the graph (an InnerProduct for a model that is only that Linear on a (1, 1, C) input, a Gemm
    in these two graphs), which quantize differently: QAT keeps it float, says why, and the export
    writes it float whatever it became."""

    class ClsHead(nn.Module):
        def __init__(self, sliced: bool) -> None:
            super().__init__()
            self.sliced = sliced
            self.stem = nn.Conv2d(3, 8, 4, 4)
            self.mix = nn.Linear(8, 8)
            self.cls = nn.Linear(8, 5)

        def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
            t = self.mix(self.stem(x).flatten(2).transpose(1, 2))  # (B, 16, 8): a Gemm
            first = t[:, :1] if self.sliced else token  # (B, 1, 8): one row per sample
            return self.cls(first) + t.mean(1, keepdim=True)[..., :5]

    for sliced in (True, False):  # a slice of a token tensor, or a model input of one token
        torch.manual_seed(8)
        m, x, token = ClsHead(sliced), torch.randn(4, 3, 16, 16), torch.randn(4, 1, 8)
        torch.manual_seed(0)
        plan = prepare_qat(m, (x[:1], token[:1]))
        m.train()
        m(x, token)
        m.eval()
        assert plan.gemm_layers == {"mix": 3} and "one row per sample" in plan.float_layers["cls"]
        report = export(m, tmp_path / str(sliced), (x[:1], token[:1]), (x, token), targets=["x86"], verbose=False,
                        timing_runs=0, check_onnx=False)
        assert "cls" not in {r.torch_name for r in report.layers} and report.flagged_layers == []
        param = NcnnParam.parse((tmp_path / str(sliced) / "model.int8.param").read_text())
        kinds = sorted((lay.type, lay.get_int(18 if lay.type == "Gemm" else 8, 0)) for lay in param.layers
                       if lay.type in ("Gemm", "InnerProduct"))
        assert ("Gemm", 2) in kinds and (("Gemm", 0) in kinds or ("InnerProduct", 0) in kinds), (sliced, kinds)
