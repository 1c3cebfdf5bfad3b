"""torch's fused eval fast paths must not bypass QAT modules (qat/fast_path.py; issue 18, RESULTS.md C1).

Each test prepares a tiny transformer-style model, trains two steps, and compares its eval output
under ``torch.inference_mode`` (how Lightning validates, tests and predicts) with its QAT forward
with gradients on (where torch never takes a fast path): they must be equal, bit for bit. The
profiler shows which op ran, so a fused op reappearing fails by name.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from lightning_ncnnqat import export, prepare_qat
from lightning_ncnnqat.conversion.pnnx import convert_with_pnnx
from lightning_ncnnqat.qat.fast_path import block_fast_paths, python_paths
from lightning_ncnnqat.qat.prepare import unprepare

FUSED = ("aten::_transformer_encoder_layer_fwd", "aten::_native_multi_head_attention")


def _fused_ops(model: nn.Module, *args: torch.Tensor) -> set[str]:
    """The names in ``FUSED`` of the ops ``model(*args)`` runs in eval mode under inference_mode."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, torch.inference_mode():
        model(*args)
    return {e.key for e in prof.key_averages() if e.key in FUSED}


class Tokens(nn.Module):
    """Patch conv [N, 3, 16, 16] -> 16 tokens of width 16 -> ``body`` -> mean -> head [N, 10]."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, 4)
        self.body = body
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.body(t).mean(1))


class Decoder(nn.Module):
    """A TransformerDecoderLayer attending to its own input as memory (self- and cross-attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.dec = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.dec(t, t)


class SelfAttention(nn.Module):
    """nn.MultiheadAttention alone (batch_first, even heads: its fast path's conditions)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.attn(t, t, t, need_weights=False)[0] + t


def _encoder_stack() -> nn.Module:
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, activation="gelu", batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, norm=nn.LayerNorm(16))


BODIES = {"decoder_layer": Decoder, "encoder_two_layers": _encoder_stack, "mha_alone": SelfAttention}


def _prepared(body: str, seed: int) -> tuple[nn.Module, torch.Tensor]:
    """``Tokens(BODIES[body]())`` prepared, two SGD steps, in eval mode; and 8 inputs [8, 3, 16, 16]."""
    torch.manual_seed(seed)
    model = Tokens(BODIES[body]())
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


@pytest.mark.parametrize("body", sorted(BODIES))
def test_inference_mode_equals_the_qat_forward(body: str) -> None:
    """Decoder layer, 2-layer encoder, MHA alone: eval under inference_mode runs the QAT modules
    (no fused op) and gives the grad-enabled QAT forward's output."""
    model, x = _prepared(body, seed=2)
    qat_names = {type(m).__name__ for m in model.modules()}
    assert "QATMultiheadAttention" in qat_names, qat_names  # the attention is planned int8
    assert _fused_ops(model, x) == set()
    with torch.inference_mode():
        validated = model(x)
    trained_form = model(x).detach()
    assert torch.equal(validated, trained_form), float((validated - trained_form).abs().max())


def test_unprepare_gives_the_fast_path_back_and_other_models_keep_it() -> None:
    """The switches are per module: another model keeps torch's fast path while a prepared one
    exists, the global setting is untouched, and unprepare restores the user's encoder as it was."""
    model, x = _prepared("encoder_two_layers", seed=3)
    torch.manual_seed(4)
    other = Tokens(_encoder_stack()).eval()
    assert torch.backends.mha.get_fastpath_enabled()
    assert "aten::_transformer_encoder_layer_fwd" in _fused_ops(other, x)  # the user's other model: untouched
    assert _fused_ops(model, x) == set()
    assert model.body.use_nested_tensor is False
    unprepare(model)
    assert model.body.use_nested_tensor is True  # nn.TransformerEncoder's default for these layers
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert "aten::_transformer_encoder_layer_fwd" in _fused_ops(model, x)
    assert block_fast_paths(model) == ["body", "body.layers.0", "body.layers.1"]
    assert block_fast_paths(model) == []  # idempotent


def test_python_paths_restores_the_setting_when_the_block_raises() -> None:
    """The trace-scoped global switch: off inside, the user's value back after an exception."""
    for before in (True, False):
        torch.backends.mha.set_fastpath_enabled(before)
        with pytest.raises(RuntimeError, match="inside"), python_paths():
            assert not torch.backends.mha.get_fastpath_enabled()
            raise RuntimeError("inside")
        assert torch.backends.mha.get_fastpath_enabled() is before
    torch.backends.mha.set_fastpath_enabled(True)


class Module(L.LightningModule):
    """A LightningModule around a Tokens encoder; records each validation batch's output."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, activation="relu", batch_first=True, norm_first=True)
        self.net = Tokens(layer)
        self.outputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.outputs.append(self.net(batch).clone())  # the submodule directly, as many modules do


def test_lightning_validate_runs_the_qat_layers() -> None:
    """``Trainer.validate`` (eval, inference_mode) on a prepared module computes the QAT forward."""
    torch.manual_seed(5)
    module = Module()
    x = torch.randn(8, 3, 16, 16)
    prepare_qat(module, x[:2])
    module.train()
    module(x).square().mean().backward()  # one QAT forward in training mode sets the input ranges
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.validate(module, torch.utils.data.DataLoader(x, batch_size=4))
    validated = torch.cat(module.outputs)
    module.eval()
    trained_form = module(x).detach()
    assert validated.shape == (8, 10)
    assert torch.equal(validated, trained_form), float((validated - trained_form).abs().max())


def test_whole_model_pickle_keeps_the_python_path(tmp_path) -> None:
    """``torch.save`` of the whole prepared model (the pre-hook is a module-level function) loads
    back with its encoder layers still on the Python path and the same eval output."""
    model, x = _prepared("encoder_two_layers", seed=6)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False).eval()
    assert _fused_ops(loaded, x) == set()
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))


def test_encoder_stack_exports_with_parity(tmp_path) -> None:
    """A 2-layer nn.TransformerEncoder with a final norm converts (the pnnx trace of the float copy
    has no fused op) and its int8 model agrees with the QAT model."""
    model, x = _prepared("encoder_two_layers", seed=7)
    report = export(model, tmp_path, x[:1], x, targets="x86", verbose=False, timing_runs=0)
    assert report.ok, report.failures
    assert report.int8_vs_qat is not None and report.int8_vs_qat.cosine > 0.999
    assert torch.backends.mha.get_fastpath_enabled()


def test_pnnx_converts_a_float_encoder_layer_without_hooks() -> None:
    """The pnnx step traces with the fast path off: a plain float encoder layer (no pre-hook, as in
    any float copy) converts to ncnn's MultiHeadAttention, Gemm and LayerNorm layers (without the
    switch the trace holds aten::_transformer_encoder_layer_fwd and pnnx stops)."""
    torch.manual_seed(8)
    model = Tokens(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)).eval()
    result = convert_with_pnnx(model, torch.randn(1, 3, 16, 16))
    types = {line.split()[0] for line in result.param_text.splitlines()[2:]}
    assert {"MultiHeadAttention", "Gemm", "LayerNorm"} <= types, types
    assert torch.backends.mha.get_fastpath_enabled()
