"""Attention through QAT and the export (issue 18): nn.MultiheadAttention and SDPA calls planned,
trained a step, written int8 (18=2) and checked in ncnn's runtime against the int8 reference
(per-layer bars in policy: ``attention_layer_ok``), with report.json and no layer flagged; an SDPA
QAT did not train in int8 is left float (ncnn2int8 would set 18=2 on it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_ncnnqat import export, prepare_qat
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.ncnn.targets import environment_problem
from lightning_ncnnqat.policy import MIN_ATTENTION_COSINE
from lightning_ncnnqat.qat.config import QATConfig
from lightning_ncnnqat.qat.plan import get_plan
from lightning_ncnnqat.qat.prepare import apply_plan, plan_qat
from test_attention_plan import MhaNet, SdpaAttn

_ARM = environment_problem()
if _ARM is not None and os.environ.get("LIGHTNING_NCNNQAT_REQUIRE_ARM") == "1":
    raise RuntimeError(f"LIGHTNING_NCNNQAT_REQUIRE_ARM=1 but {_ARM}")


class Mixed(nn.Module):
    """Conv stem -> tokens -> MHA block -> SDPA block (Gemm q/k/v and projection) -> head."""

    def __init__(self, heads: int = 4, mask: str | None = None, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 2, 2)
        self.mha = nn.MultiheadAttention(16, heads, batch_first=True)
        self.sa = SdpaAttn(16, 2, mask)
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)
        t = t + self.mha(t, t, t, need_weights=False)[0]
        return self.head((t + self.sa(t)).mean(1))


def _train(model: nn.Module, x: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    model.eval()


def _checks(report, target: str) -> dict[str, dict]:
    checks = report.layer_checks if target == "x86" else report.runtime[target]["layer_checks"]
    return {d["torch_name"]: d for d in (c if isinstance(c, dict) else c.to_dict() for c in checks)}


def _int8_terms(path: Path) -> dict[str, int]:
    param = NcnnParam.parse((path / "model.int8.param").read_text())
    return {lay.type: lay.get_int(18, 0) for lay in param.layers if lay.type in ("MultiHeadAttention", "SDPA")}


def test_gemm_mha_sdpa_model_exports_int8_on_x86(tmp_path: Path) -> None:
    torch.manual_seed(11)
    m, x = Mixed(4), torch.randn(6, 3, 8, 8)
    plan = prepare_qat(m, x[:1])
    assert plan.attention_layers == {"mha": "MultiHeadAttention"} and plan.sdpa_calls == {"sa": 1}
    assert set(plan.gemm_layers) == {"sa.qkv", "sa.proj"}
    _train(m, x)
    report = export(m, tmp_path, x[:1], x, targets=["x86"], verbose=False, timing_runs=0, check_onnx=False)
    assert _int8_terms(tmp_path) == {"MultiHeadAttention": 2, "SDPA": 2}
    checks = _checks(report, "x86")
    for name in ("mha", "sa:sdpa0"):
        assert checks[name]["ok"] is True and checks[name]["isolated_cosine"] >= MIN_ATTENTION_COSINE, checks[name]
    assert report.flagged_layers == [] and report.runtime["x86"]["int8_vs_qat"]["cosine"] > 0.9999
    saved = json.loads((tmp_path / "report.json").read_text())
    assert {r["kind"] for r in saved["layers"]} >= {"MultiHeadAttention", "SDPA", "Gemm", "Convolution"}


def test_sdpa_qat_did_not_train_int8_stays_float(tmp_path: Path) -> None:
    """The silent wrong result this fixes: a plan without SDPA calls (an older checkpoint, say)
    exports its SDPA float, and int8 still agrees with the QAT model."""
    torch.manual_seed(12)
    m, x = Mixed(2, mask="float"), torch.randn(4, 3, 8, 8)
    plan = plan_qat(m, x[:1], QATConfig())
    plan.sdpa_calls = {}
    apply_plan(m, plan)
    report = export(m, tmp_path, x[:1], x, targets=["x86"], verbose=False, timing_runs=0, check_onnx=False)
    assert _int8_terms(tmp_path) == {"MultiHeadAttention": 2, "SDPA": 0}
    assert any("SDPA layer(s) stay float" in n for n in report.notes)
    assert report.flagged_layers == [] and report.runtime["x86"]["int8_vs_qat"]["cosine"] > 0.99999


def test_unsupported_mha_exports_float_with_its_reason(tmp_path: Path) -> None:
    torch.manual_seed(13)
    m, x = MhaNet(2, add_bias_kv=True), torch.randn(4, 3, 8, 8)
    plan = prepare_qat(m, x[:1])
    assert "add_bias_kv" in plan.float_layers["attn"]
    report = export(m, tmp_path, x[:1], x, targets=["x86"], verbose=False, timing_runs=0, check_onnx=False)
    assert _int8_terms(tmp_path).get("MultiHeadAttention", 0) == 0
    assert "attn" not in {r.torch_name for r in report.layers}
    assert any(f["name"] == "attn" and "add_bias_kv" in f["reason"] for f in report.float_layers)


@pytest.mark.skipif(_ARM is not None, reason=f"emulated ARM targets: {_ARM}")
def test_attention_on_arm_targets(tmp_path: Path) -> None:
    torch.manual_seed(14)
    m, x = Mixed(1, mask="float"), torch.randn(3, 3, 8, 8)
    prepare_qat(m, x[:1])
    _train(m, x)
    targets = ["x86", "arm64-a53", "arm64-a76"]
    report = export(m, tmp_path, x[:1], x, targets=targets, verbose=False, timing_runs=0, layer_check_samples=1,
                    check_onnx=False)
    assert report.flagged_layers == []
    for target in targets:
        checks = _checks(report, target)
        for name in ("mha", "sa:sdpa0"):
            assert checks[name]["ok"] is True and checks[name]["isolated_cosine"] >= 0.9999, (target, checks[name])
        assert report.runtime[target]["int8_vs_qat"]["cosine"] > 0.9999, target


def test_qat_callback_trains_and_exports_attention(tmp_path: Path) -> None:
    """The main job's path: QATCallback plans MHA and SDPA at fit start, trains and exports them."""
    from lightning_ncnnqat import QATCallback
    from lightning_ncnnqat.export.config import ExportConfig
    from lit_models import NetLit, loader, make_data, quiet_trainer

    torch.manual_seed(15)
    ds = make_data(32, 8, seed=15)
    lit = NetLit(Mixed(2, classes=10), lr=0.02, example=ds.tensors[0][:1])
    cb = QATCallback(start_epoch=0, config=QATConfig(prefer="int8"), export=ExportConfig(dir=str(tmp_path), targets=("x86",)))  # int8 writing, not the speed decision
    quiet_trainer(max_epochs=1, callbacks=[cb]).fit(lit, loader(ds), loader(ds))
    plan = get_plan(lit)
    assert plan.attention_layers == {"net.mha": "MultiHeadAttention"} and plan.sdpa_calls == {"net.sa": 1}
    report = cb.export_report
    assert report.flagged_layers == [] and _int8_terms(tmp_path) == {"MultiHeadAttention": 2, "SDPA": 2}
    assert {"net.mha", "net.sa:sdpa0"} <= {r.torch_name for r in report.layers}
