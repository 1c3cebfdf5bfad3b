"""Hand-written attention that pnnx fuses into ONE MultiHeadAttention (issue 18, case C2): the QAT
start finds the unit in the converted model and trains it as that layer (int8 MultiHeadAttention
over the Linear parts), the export writes it int8 and ncnn agrees with the QAT model; forms pnnx
leaves apart stay separate int8 Gemms; a unit kept float names the unit and the reason."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat import QATConfig, export, prepare_qat
from lightning_ncnnqat.export.attention_fusion import find_converter_units, may_fuse
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.ops.attention_reference import mha_int8
from lightning_ncnnqat.qat.fused_attention import CONVERTER_UNITS, unit_departure, unit_weights
from lightning_ncnnqat.qat.plan import QATPlan, get_plan
from lightning_ncnnqat.qat.prepare import apply_plan


class Attn(nn.Module):
    """CLIP-style attention: q/k/v/out ``nn.Linear`` on 3-D tokens; ``core``: ``"sdpa"``
    (F.scaled_dot_product_attention) or ``"logits"`` (``(q @ k^T) * scale``, softmax, ``@ v``)."""

    def __init__(self, d: int = 16, h: int = 2, bias: bool = True, core: str = "sdpa") -> None:
        super().__init__()
        self.h, self.d, self.core = h, d, core
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d, bias=bias) for _ in range(4))

    def forward(self, x: torch.Tensor, mem: torch.Tensor | None = None) -> torch.Tensor:
        n, t, _ = x.shape
        kv = x if mem is None else mem

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(n, y.shape[1], self.h, -1).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(kv)), heads(self.v_proj(kv))
        if self.core == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v)
        elif self.core == "logits":
            a = ((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.d // self.h))).softmax(dim=-1) @ v
        else:  # "q": the scale on q, a form pnnx 20261020 leaves as Gemms + MatMul
            a = ((q * (1.0 / math.sqrt(self.d // self.h))) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.out_proj(a.transpose(1, 2).reshape(n, t, self.d))


class Net(nn.Module):
    def __init__(self, attn: Attn, cross: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.mem = nn.Linear(8, 16) if cross else None
        self.block = attn
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.embed(x)
        mem = None if self.mem is None else self.mem(x[:, :5])
        return self.head((z + self.block(z, mem)).mean(1))


PARTS = ["block.q_proj", "block.k_proj", "block.v_proj", "block.out_proj"]


def _train(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    model.eval()


def _mha_terms(path: Path) -> list[int]:
    param = NcnnParam.parse((path / "model.int8.param").read_text())
    return [lay.get_int(18, 0) for lay in param.layers if lay.type == "MultiHeadAttention"]


@pytest.mark.parametrize(
    "attn, cross",
    [(Attn(bias=True, core="sdpa"), False), (Attn(bias=False, core="logits", h=4), False), (Attn(core="sdpa"), True)],
    ids=["clip_bias_sdpa", "manual_softmax_no_bias", "cross_attention"],
)
def test_fused_unit_trains_and_exports_as_int8_mha(tmp_path: Path, attn: Attn, cross: bool) -> None:
    torch.manual_seed(21)
    m, x = Net(attn, cross), torch.randn(8, 10, 8)
    plan = prepare_qat(m, x[:2])
    (unit,) = plan.fused_attention.values()
    assert [unit[r][0] for r in ("q", "k", "v", "out")] == PARTS and unit["heads"] == attn.h
    assert not set(PARTS) & (set(plan.gemm_layers) | set(plan.float_layers)) and plan.sdpa_calls == {}
    assert set(plan.gemm_layers) == ({"embed", "mem"} if cross else {"embed"})
    _train(m, x)
    report = export(m, tmp_path, x[:1], x, targets=["x86"], verbose=False, timing_runs=0, check_onnx=False,
                    layer_check_samples=2)
    assert _mha_terms(tmp_path) == [2]
    assert report.flagged_layers == [] and report.runtime["x86"]["int8_vs_qat"]["cosine"] > 0.9999
    checks = {c["torch_name"] if isinstance(c, dict) else c.torch_name: c for c in report.layer_checks}
    assert "block" in checks


def test_fused_forward_is_ncnn_int8_mha_with_float_gradients() -> None:
    """The unit's output equals ``mha_int8`` on its parts' inputs and weights; gradients reach every part."""
    torch.manual_seed(22)
    m, x = Net(Attn(core="logits")), torch.randn(4, 6, 8)
    plan = prepare_qat(m, x[:1])
    modules = dict(m.named_modules())
    (unit,) = plan.fused_attention.values()
    with torch.no_grad():
        z = m.embed(x)
        want = mha_int8(z, z, z, unit_weights(modules, unit), unit["heads"], unit["scale"])
        got = m.block(z)
    assert torch.equal(got, want)
    m(x).square().mean().backward()
    assert all(modules[n].weight.grad is not None and modules[n].weight.grad.abs().sum() > 0 for n in PARTS)


def test_form_the_converter_leaves_apart_stays_gemm(tmp_path: Path) -> None:
    """The scale on q: pnnx writes four Gemms and two MatMuls, so the plan keeps four int8 Gemms;
    the report names the MatMuls as float with the reason (ncnn has no int8 MatMul)."""
    torch.manual_seed(23)
    m, x = Net(Attn(core="q")), torch.randn(6, 6, 8)
    plan = prepare_qat(m, x[:1])
    assert plan.fused_attention == {} and set(PARTS) <= set(plan.gemm_layers)
    report = export(m, tmp_path, x[:1], x, targets=["x86"], verbose=False, timing_runs=0, check_onnx=False,
                    layer_check_samples=1)
    assert report.flagged_layers == [] and report.runtime["x86"]["int8_vs_qat"]["cosine"] > 0.9999
    matmuls = [f for f in report.float_layers if f["name"].endswith("(ncnn MatMul)")]
    assert len(matmuls) == 2 and all("no int8 MatMul" in f["reason"] for f in matmuls)


def test_skipped_part_keeps_the_unit_float_with_its_reason(tmp_path: Path) -> None:
    torch.manual_seed(24)
    m, x = Net(Attn()), torch.randn(6, 6, 8)
    plan = prepare_qat(m, x[:1], QATConfig(skip=("block.k_proj",)))
    assert plan.fused_attention == {}
    for n in PARTS:
        assert "one MultiHeadAttention" in plan.float_layers[n] and "skip" in plan.float_layers[n], n
    report = export(m, tmp_path, x[:1], x, targets=["x86"], verbose=False, timing_runs=0, check_onnx=False,
                    layer_check_samples=1)
    assert _mha_terms(tmp_path) == [0] and report.flagged_layers == []
    assert report.runtime["x86"]["int8_vs_qat"]["cosine"] > 0.999


def test_plan_round_trip_rebuilds_the_fused_unit() -> None:
    """A checkpoint's plan (to_dict/from_dict) trains the unit the same on a fresh model."""
    torch.manual_seed(25)
    m, x = Net(Attn()), torch.randn(2, 6, 8)
    fresh = Net(Attn())
    fresh.load_state_dict(m.state_dict())
    plan = prepare_qat(m, x[:1])
    apply_plan(fresh, QATPlan.from_dict(json.loads(json.dumps(plan.to_dict()))))  # as the state dict holds it
    assert get_plan(fresh).fused_attention == plan.fused_attention
    with torch.no_grad():
        z = m.embed(x)
        assert torch.equal(m.block(z), fresh.block(z))


def test_unit_departure_catches_another_head_split() -> None:
    """The float check that guards a unit: right heads agree to float32 rounding, wrong heads do not."""
    torch.manual_seed(26)
    m, x = Net(Attn(h=2)), torch.randn(2, 6, 8)
    units = find_converter_units(m, x)
    assert m.__dict__[CONVERTER_UNITS] == units
    (unit,) = units.values()
    modules = dict(m.named_modules())
    with torch.no_grad():
        z = m.embed(x)
        out = m.block(z)
    assert unit_departure(modules, unit, {"q": z, "k": z, "v": z}, out) < 1e-5
    assert unit_departure(modules, {**unit, "heads": 4}, {"q": z, "k": z, "v": z}, out) > 1e-2


class RootAttn(Attn):
    """The unit's parts are children of the model itself: its label is its out module's name."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        z = self.embed(x)
        return (z + super().forward(z)).mean(1)


def test_skip_by_unit_label_keeps_it_float() -> None:
    """``skip`` naming a unit's label (a module name: the measured re-plan at QAT start uses it)."""
    torch.manual_seed(27)
    x = torch.randn(2, 6, 8)
    plan = prepare_qat(RootAttn(), x[:1])
    assert list(plan.fused_attention) == ["out_proj"]
    for label, model in (("out_proj", RootAttn()), ("block", Net(Attn()))):
        plan = prepare_qat(model, x[:1], QATConfig(skip=(label,)))
        assert plan.fused_attention == {} and "one MultiHeadAttention" in plan.float_layers[
            "q_proj" if label == "out_proj" else "block.q_proj"]


def test_probe_runs_only_where_pnnx_may_fuse() -> None:
    """The QAT start converts with pnnx only for SDPA or a softmax over scores (3-D or more): a
    classifier's softmax over ``[B, C]`` costs no conversion."""
    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x)).softmax(-1)

    x = torch.randn(2, 6, 8)
    assert not may_fuse(Mlp(), x[:, 0]) and may_fuse(Mlp(), x)  # [B, 4] vs [B, 6, 4] scores
    assert may_fuse(Net(Attn(core="logits")), x) and may_fuse(Net(Attn(core="sdpa")), x)
    assert find_converter_units(Mlp(), x[:, 0]) == {}


class ImageAttn(nn.Module):
    """Conv stem -> tokens -> CLIP-style attention (residual) -> 10-class head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 2, 2)
        self.block = Attn(16, 2, core="sdpa")
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)
        return self.head((t + self.block(t)).mean(1))


def test_qat_callback_plans_trains_and_exports_the_fused_unit(tmp_path: Path) -> None:
    """The main job's path: QATCallback finds the unit at fit start, trains and exports it int8."""
    from lightning_ncnnqat import QATCallback
    from lightning_ncnnqat.export.config import ExportConfig
    from lit_models import NetLit, loader, make_data, quiet_trainer

    torch.manual_seed(28)
    ds = make_data(32, 8, seed=28)
    lit = NetLit(ImageAttn(), lr=0.02, example=ds.tensors[0][:1])
    cb = QATCallback(start_epoch=0, export=ExportConfig(dir=str(tmp_path), targets=("x86",)))
    quiet_trainer(max_epochs=1, callbacks=[cb]).fit(lit, loader(ds), loader(ds))
    plan = get_plan(lit)
    assert list(plan.fused_attention) == ["net.block"] and plan.sdpa_calls == {}
    report = cb.export_report
    assert report.flagged_layers == [] and _mha_terms(tmp_path) == [2]
    assert "net.block" in {r.torch_name for r in report.layers}


class SeqFirstAttn(nn.Module):
    """Hand-written attention on ``[L, B, E]`` tokens (nn.MultiheadAttention's default layout):
    pnnx 20261020 leaves it as Gemms + MatMuls, so it plans as four int8 Gemms."""

    def __init__(self, d: int = 16, h: int = 2) -> None:
        super().__init__()
        self.h = h
        self.embed = nn.Linear(8, d)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.embed(x).transpose(0, 1)  # [L, B, E]
        n, b, e = z.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(n, b * self.h, e // self.h).transpose(0, 1)

        q, k, v = heads(self.q_proj(z)), heads(self.k_proj(z)), heads(self.v_proj(z))
        a = torch.softmax((q @ k.transpose(1, 2)) / math.sqrt(e // self.h), dim=-1) @ v
        return self.head((z + self.out_proj(a.transpose(0, 1).reshape(n, b, e))).mean(0))


def test_seq_first_attention_stays_gemm() -> None:
    torch.manual_seed(29)
    plan = prepare_qat(SeqFirstAttn(), torch.randn(2, 6, 8))
    assert plan.fused_attention == {} and {"q_proj", "k_proj", "v_proj", "out_proj"} <= set(plan.gemm_layers)
