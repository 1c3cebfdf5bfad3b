"""nn.TransformerEncoderLayer after QAT: PyTorch's eval fast path must not bypass the QAT layers.

In eval mode with gradients off (how Lightning runs validation, test and predict: under
``torch.inference_mode``) ``nn.TransformerEncoderLayer.forward`` calls the fused
``torch._transformer_encoder_layer_fwd`` with the layer's raw weights
(torch/nn/modules/transformer.py, the "fast path"), so the swapped ``QATMultiheadAttention`` and
``QATGemmLinear`` children never run: what is validated is not what ncnn runs. The same fused op
reaches the export's pnnx trace (``conversion/pnnx.py`` traces under ``torch.no_grad``), where pnnx
cannot convert it. Public reports of the op: pytorch/pytorch#143107, YvanYin/GoalFlow#23 (Lightning
``to_onnx``). Found by the hunted cases ``tf_vit_encoder_layer`` / ``tf_lightning_transformer_callback``
(/work/cases_extra/RESULTS.md, section C1).

Fixed by ``qat/fast_path.py``: a prepared model's encoder layers take their Python path (a no-op
pre-hook torch checks), and the pnnx trace runs with the fast path off, as the ONNX step does.
More inputs of the kind: tests/test_fast_path.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_ncnnqat import export, prepare_qat


class Encoder(nn.Module):
    """Patch conv -> 16 tokens -> one TransformerEncoderLayer (batch_first, GELU or ReLU) -> head."""

    def __init__(self, activation: str, norm_first: bool) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, 4)
        self.enc = nn.TransformerEncoderLayer(
            16, 2, 32, dropout=0.0, activation=activation, batch_first=True, norm_first=norm_first
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.patch(x).flatten(2).transpose(1, 2)).mean(1))


def _prepared(activation: str, norm_first: bool, seed: int) -> tuple[nn.Module, torch.Tensor]:
    """A prepared Encoder after two QAT steps (ranges set), in eval mode, and 8 inputs [8, 3, 16, 16]."""
    torch.manual_seed(seed)
    model = Encoder(activation, norm_first)
    x = torch.randn(8, 3, 16, 16)
    prepare_qat(model, x[:2])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(2):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x


@pytest.mark.parametrize(("activation", "norm_first"), [("gelu", True), ("relu", False)])
def test_eval_without_grad_runs_the_qat_layers(activation: str, norm_first: bool) -> None:
    """Validation's forward (eval, inference mode) equals the QAT forward with gradients on."""
    model, x = _prepared(activation, norm_first, seed=0)
    with torch.inference_mode():
        validated = model(x)
    trained_form = model(x).detach()  # grad enabled: the fast path is not taken
    assert torch.equal(validated, trained_form), (
        f"eval output under inference_mode differs from the QAT forward by "
        f"{float((validated - trained_form).abs().max()):.3g}"
    )


def test_encoder_layer_exports_with_parity(tmp_path) -> None:
    """The export converts the layer (no aten::_transformer_encoder_layer_fwd in pnnx's trace) and
    the int8 model agrees with the QAT model."""
    model, x = _prepared("gelu", True, seed=1)
    report = export(model, tmp_path, x[:1], x, targets="x86", verbose=False, timing_runs=0)
    assert report.ok, report.failures
    assert report.int8_vs_qat is not None and report.int8_vs_qat.cosine > 0.999
    assert torch.backends.mha.get_fastpath_enabled()  # the export leaves the global setting as it was
