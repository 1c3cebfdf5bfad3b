"""Model surgery without a Trainer: tracing, BN folding, quantizer attachment, the plan."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat import QATConfig, folded_float_model, prepare_qat, quantized_layers
from lightning_ncnnqat.qat.graph import trace_dataflow
from lightning_ncnnqat.qat.modules import FoldedBatchNorm, InputQuantizer, QATConv2d, QATLinear
from lightning_ncnnqat.ops import reference
from lightning_ncnnqat.qat.plan import QATPlan, get_plan
from lightning_ncnnqat.qat.prepare import apply_plan
from lightning_ncnnqat.qat.prepared import check_ranges, input_quantizers
from models import MixedNet, SharedOutputNet


def _trained_float(seed: int = 0) -> tuple[MixedNet, torch.Tensor]:
    torch.manual_seed(seed)
    m = MixedNet()
    x = torch.randn(8, 3, 16, 16)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(x + 0.1 * torch.randn_like(x))  # give BN non-trivial running statistics
    return m.eval(), x


def test_plan_decisions_follow_data_flow() -> None:
    m, x = _trained_float()
    plan = prepare_qat(m, x[:1], QATConfig(quantize_grouped_convs=False))
    layers = plan.layers
    # BN folded into the conv whose output it alone reads, including functional wiring in forward()
    assert layers["stem.0"].bn == "stem.1"
    assert layers["dw"].bn == "dw_bn" and layers["pw"].bn == "pw_bn" and layers["branch_a"].bn == "bn_a"
    assert layers["down"].bn == "down_bn"
    # 6-bit only for 3x3 stride-1 dilation-1 groups=1 convs
    assert layers["stem.0"].weight_bits == 6 and layers["branch_a"].weight_bits == 6
    assert layers["down"].weight_bits == 8 and layers["pw"].weight_bits == 8 and layers["dw"].weight_bits == 8
    assert layers["dw"].kind == "ConvolutionDepthWise" and layers["dw"].num_groups == 16
    assert layers["fc"].kind == "InnerProduct" and layers["fc"].num_groups == 10
    # one tensor read by two convs: one shared range, owned by the first reader
    assert layers["branch_b"].input_owner == "branch_a"
    assert m.branch_a.input_quantizer is m.branch_b.input_quantizer
    assert m.branch_a.updates_range and not m.branch_b.updates_range
    # grouped conv kept in float with the reason; its BN untouched
    assert "grouped" in plan.float_layers and "grouped conv" in plan.float_layers["grouped"]
    assert type(m.grouped) is nn.Conv2d and type(m.grouped_bn) is nn.BatchNorm2d
    assert isinstance(m.stem[0], QATConv2d) and isinstance(m.fc, QATLinear)
    assert isinstance(m.stem[1], FoldedBatchNorm)
    summary = plan.summary()
    assert "grouped" in summary and "shared with branch_a" in summary


def test_bn_not_folded_when_conv_output_has_another_reader() -> None:
    torch.manual_seed(0)
    m = SharedOutputNet().eval()
    plan = prepare_qat(m, torch.randn(1, 3, 8, 8))
    assert plan.layers["conv"].bn is None
    assert type(m.bn) is nn.BatchNorm2d
    assert "not folded into 'conv'" in plan.notes["bn"] and "not folded" in plan.summary()


def test_grouped_convs_quantized_by_default_and_when_asked() -> None:
    m, x = _trained_float()
    assert prepare_qat(m, x[:1]).layers["grouped"].kind == "ConvolutionDepthWise"  # "auto": int8, measured at QAT start
    m, x = _trained_float()
    plan = prepare_qat(m, x[:1], QATConfig(quantize_grouped_convs=True, six_bit_3x3=False))
    assert plan.layers["grouped"].kind == "ConvolutionDepthWise" and plan.layers["grouped"].num_groups == 4
    assert plan.layers["grouped"].bn == "grouped_bn"
    assert all(p.weight_bits == 8 for p in plan.layers.values())


def test_skip_patterns_and_linear_rank() -> None:
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.proj = nn.Linear(6, 6)  # applied to a rank-3 tensor: ncnn's int8 Gemm (qat/gemm.py)
            self.head = nn.Linear(24, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x).flatten(2)  # (N, 4, 36) -> pool to (N, 4, 6)
            y = F.adaptive_avg_pool1d(y, 6)
            return self.head(self.proj(y).flatten(1))

    m = Seq()
    plan = prepare_qat(m, torch.randn(2, 3, 8, 8), QATConfig(skip=["he*"]))
    assert set(plan.layers) == {"conv"}
    assert plan.gemm_layers == {"proj": 3} and "proj" not in plan.float_layers
    assert "skip" in plan.float_layers["head"]


def test_no_quantizable_layer_is_an_error() -> None:
    m = nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"no layer ncnn can run in int8.*Conv1d has no int8 kernel"):
        prepare_qat(m, torch.randn(1, 3, 10))


def test_parameters_keep_identity_and_forward_matches_reference_math() -> None:
    m, x = _trained_float()
    before = {n: id(p) for n, p in m.named_parameters()}
    ref_float = m(x)
    prepare_qat(m, x[:1])
    assert {n: id(p) for n, p in m.named_parameters()} == before  # optimizer and DDP keep them
    m.train()
    m(x)  # one training forward initialises every range
    m.eval()
    out = m(x)
    assert out.shape == ref_float.shape
    # The first layer's computation, by hand with the reference ops.
    conv, bn = m.stem[0], m.stem[1]
    inv = (1.0 / torch.sqrt(bn.running_var.double() + bn.eps)).float()  # device-independent bits
    assert torch.equal(bn.inv_std, inv)
    w = conv.weight * (bn.weight * inv)[:, None, None, None]
    b = bn.bias - bn.running_mean * bn.weight * inv
    wq, _ = reference.fake_quantize_per_channel(w, 16, 6)
    xq = reference.fake_quantize_per_tensor(x, conv.input_quantizer.running_absmax, 8)
    expected = F.relu(F.conv2d(xq, wq, b, padding=1))
    assert torch.allclose(m.stem(x), expected, atol=1e-6)
    # fake quantization changes the output a little, not a lot
    cos = F.cosine_similarity(out.flatten(), ref_float.flatten(), dim=0)
    assert 0.98 < cos < 1.0


def test_ranges_update_only_in_training() -> None:
    m, x = _trained_float()
    prepare_qat(m, x[:1], QATConfig(momentum=0.5))
    q = m.pw.input_quantizer
    assert q.running_absmax.item() == -1.0
    m.eval()
    m(x)
    assert q.running_absmax.item() == -1.0  # eval never moves (or initialises) a range
    m.train()
    m(x)
    first = q.running_absmax.item()
    assert first > 0
    m.eval()
    m(x * 3)
    assert q.running_absmax.item() == first
    m.train()
    m(x * 3)
    assert q.running_absmax.item() != first


def test_shared_range_updates_once_per_forward() -> None:
    m, x = _trained_float()
    prepare_qat(m, x[:1], QATConfig(momentum=0.5))
    m.train()
    m(x)
    r1 = m.branch_a.input_quantizer.running_absmax.clone()
    # feed the same batch again: one EMA step towards the same batch absmax keeps it fixed
    captured = {}
    h = m.branch_a.register_forward_pre_hook(lambda mod, a: captured.setdefault("x", a[0].detach().clone()))
    m(x)
    h.remove()
    b = reference.finite_absmax(captured["x"])
    expected = r1 + 0.5 * (b - r1)  # exactly one update, not two
    assert torch.allclose(m.branch_a.input_quantizer.running_absmax, expected.reshape(1), rtol=0, atol=1e-6)


def test_folded_float_model_equals_bn_model_and_strips_quantizers() -> None:
    m, x = _trained_float()
    ref = m(x)
    prepare_qat(m, x[:1])
    f = folded_float_model(m)
    assert not any(isinstance(mod, (InputQuantizer, FoldedBatchNorm, QATConv2d, QATLinear)) for mod in f.modules())
    assert isinstance(f.stem[1], nn.Identity) and isinstance(f.dw_bn, nn.Identity)
    assert torch.allclose(f(x), ref, atol=1e-5)
    assert get_plan(f) is None and get_plan(m) is not None


def test_quantized_layers_scales_match_ops_and_require_ranges() -> None:
    m, x = _trained_float()
    prepare_qat(m, x[:1])
    with pytest.raises(RuntimeError, match="never initialised"):
        quantized_layers(m)
    m.train()
    m(x)
    infos = {i.name: i for i in quantized_layers(m)}
    assert set(infos) == set(get_plan(m).layers)
    info = infos["branch_b"]
    assert info.input_owner == "branch_a" and info.input_scale == infos["branch_a"].input_scale
    r = m.branch_a.input_quantizer.running_absmax
    assert info.input_scale == pytest.approx(127.0 / r.item(), rel=1e-6)
    _, scales = reference.fake_quantize_per_channel(info.weight, info.num_groups, info.weight_bits)
    assert torch.equal(scales, info.weight_scales)
    assert torch.isfinite(info.weight_scales).all() and (info.weight_scales > 0).all()


def test_plan_roundtrip_rebuilds_identical_model() -> None:
    m, x = _trained_float()
    plan = prepare_qat(m, x[:1])
    m.train()
    m(x)
    m.eval()
    fresh, _ = _trained_float(seed=1)
    apply_plan(fresh, QATPlan.from_dict(plan.to_dict()))
    fresh.load_state_dict(m.state_dict())
    fresh.eval()
    assert torch.equal(fresh(x), m(x))
    assert set(input_quantizers(fresh)) == set(input_quantizers(m))


def test_nan_weight_is_named() -> None:
    m, x = _trained_float()
    prepare_qat(m, x[:1])
    m.train()
    m(x)
    with torch.no_grad():
        m.pw.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="layer 'pw'.*NaN"):
        check_ranges(m)


def test_trace_records_functional_ops_and_inplace_versions() -> None:
    m, x = _trained_float()
    flow = trace_dataflow(m, x[:1])
    (pw_call,) = flow.module_calls("pw")
    (bn_call,) = flow.module_calls("pw_bn")
    assert flow.consumers[pw_call.outputs[0]] == [bn_call.index]
    (a_call,) = flow.module_calls("branch_a")
    (b_call,) = flow.module_calls("branch_b")
    assert a_call.inputs[0] == b_call.inputs[0]
    # the stem's in-place ReLU makes a new version: dw reads the ReLU output, not the BN output
    (relu_call,) = flow.module_calls("stem.2")
    (dw_call,) = flow.module_calls("dw")
    assert dw_call.inputs[0] == relu_call.outputs[0]
    assert any(n.target in ("__add__", "add") for n in flow.nodes if n.module is None)


def test_subclasses_overriding_forward_are_judged_by_their_math() -> None:
    from lightning_ncnnqat.qat.prepare import unprepare

    class SameLinear(nn.Linear):  # like timm's Linear: forward overridden, plain F.linear
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.weight, self.bias)

    class ScaledConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    m = nn.Sequential(ScaledConv(3, 4, 3), nn.ReLU(), nn.Flatten(), SameLinear(4 * 6 * 6, 5))
    plan = prepare_qat(m, torch.randn(2, 3, 8, 8))
    assert set(plan.layers) == {"3"} and isinstance(m[3], QATLinear)
    assert "other math" in plan.float_layers["0"]
    unprepare(m)
    assert type(m[3]) is SameLinear
