"""Torch's own exporters on a prepared (QAT) model: ONNX (both exporters, Lightning's ``to_onnx``),
``torch.jit.trace`` and ``torch.export`` compute what the QAT model computes; ``torch.jit.script``
is refused in one line naming what works (``ops/exporters.py``)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

import lightning_ncnnqat as q
from lightning_ncnnqat.errors import UnsupportedModelError

ort = pytest.importorskip("onnxruntime")
torch.set_num_threads(1)


def _conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))


class _Tokens(nn.Module):
    """Linear on a 3-D input: an int8 Gemm in ncnn (QATGemmLinear), then a per-tensor Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(8, 16)
        self.head = nn.Linear(16 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(x)).flatten(1))


def _prepared(model: nn.Module, shape: tuple[int, ...], config: q.QATConfig | None = None) -> nn.Module:
    torch.manual_seed(0)
    q.prepare_qat(model, torch.randn(1, *shape), config)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, *shape) * 2)
    return model.eval()


def _onnx_outputs(model: nn.Module, x: torch.Tensor, dynamo: bool, path: str) -> np.ndarray:
    torch.onnx.export(model, (x[:1],), path, dynamo=dynamo, input_names=["x"], **({} if dynamo else {"dynamic_axes": {"x": {0: "n"}}}))
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i : i + 1].numpy()})[0] for i in range(len(x))])


def _qat_and_float(model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        return model(x).numpy(), q.folded_float_model(model)(x).numpy()


@pytest.mark.parametrize(
    "make, shape, config",
    [
        (_conv_net, (3, 8, 8), None),  # BN fold + per-channel weights + per-tensor inputs
        (_conv_net, (3, 8, 8), q.QATConfig(ranges="learned")),  # thresholds exp(log t)
        (_Tokens, (4, 8), None),  # an int8 Gemm (per-row dynamic input scales)
    ],
)
def test_torchscript_onnx_export_runs_the_fake_quantization(tmp_path, make, shape, config) -> None:
    model = _prepared(make(), shape, config)
    x = torch.randn(6, *shape) * 3
    qat, flt = _qat_and_float(model, x)
    got = _onnx_outputs(model, x, False, str(tmp_path / "m.onnx"))
    assert np.abs(got - qat).max() < 1e-5  # float32 summation order only, no int8 step
    assert np.abs(got - flt).max() > 1e-3  # the fake quantization is in the file, not dropped


def test_dynamo_onnx_export_and_lightning_to_onnx(tmp_path) -> None:
    from lightning.pytorch import LightningModule

    class Lit(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _conv_net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    lit = _prepared(Lit(), (3, 8, 8))
    x = torch.randn(3, 3, 8, 8)
    qat, flt = _qat_and_float(lit, x)
    got = _onnx_outputs(lit, x, True, str(tmp_path / "d.onnx"))
    assert np.abs(got - qat).max() < 1e-5 and np.abs(got - flt).max() > 1e-3
    lit.to_onnx(str(tmp_path / "l.onnx"), x[:1], dynamo=False)
    sess = ort.InferenceSession(str(tmp_path / "l.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(sess.run(None, {sess.get_inputs()[0].name: x[:1].numpy()})[0] - qat[:1]).max() < 1e-5


def test_dynamo_onnx_export_of_an_int8_gemm(tmp_path) -> None:
    model = _prepared(_Tokens(), (4, 8))
    x = torch.randn(3, 4, 8) * 3
    qat, flt = _qat_and_float(model, x)
    got = _onnx_outputs(model, x, True, str(tmp_path / "g.onnx"))
    assert np.abs(got - qat).max() < 1e-5 and np.abs(got - flt).max() > 1e-3


def test_rounding_ties_and_clipping_match_the_op_exactly() -> None:
    """Ties go away from zero, 0.49999997 rounds down, beyond the range saturates: as the op does."""

    class FQ(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.ncnnqat.fake_quantize_per_tensor(x, torch.tensor([127.0]), 8)

    x = torch.tensor([[2.5, -2.5, 0.49999997, -0.49999997, 126.5, 300.0, -float("inf"), 0.0, 1e-30, 3.7]])
    buf = io.BytesIO()
    torch.onnx.export(FQ(), (x,), buf, dynamo=False)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    want = FQ()(x).numpy()
    np.testing.assert_array_equal(got, want)
    assert list(want[0, :6]) == [3.0, -3.0, 0.0, -0.0, 127.0, 127.0]


@pytest.mark.parametrize("make, shape", [(_conv_net, (3, 8, 8)), (_Tokens, (4, 8))])
def test_trace_and_torch_export_keep_the_fake_quantization(make, shape) -> None:
    model = _prepared(make(), shape)
    x = torch.randn(5, *shape)
    qat, _ = _qat_and_float(model, x)
    with torch.no_grad():
        traced = torch.jit.trace(model, x[:1])
        assert np.array_equal(traced(x).numpy(), qat)
        exported = torch.export.export(model, (x,))
        assert np.array_equal(exported.module()(x).numpy(), qat)


@pytest.mark.parametrize("make, shape", [(_conv_net, (3, 8, 8)), (_Tokens, (4, 8))])
def test_script_is_refused_naming_what_works(make, shape) -> None:
    model = _prepared(make(), shape)
    with pytest.raises(UnsupportedModelError, match="lightning_ncnnqat.export") as info:
        torch.jit.script(model)
    assert "folded_float_model" in str(info.value) and "torch.jit.trace" in str(info.value)
    torch.jit.script(q.folded_float_model(model))  # the float model scripts
