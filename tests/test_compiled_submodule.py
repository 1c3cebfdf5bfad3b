"""A ``torch.compile``d SUBMODULE (``self.net = torch.compile(Net())``, Lightning's compile guide).

The compiled wrapper stays in the module tree: layers are named ``net._orig_mod.conv1`` as
``named_modules()`` and the state dict name them; surgery swaps them inside it; the package's
tracing, capture hooks and ONNX / pnnx tracing run it eagerly (``wrappers.eager_compiled``), and
the model keeps its compiled code afterwards. Backend "eager": dynamo's graph capture without
inductor's CPU codegen (seconds, not minutes).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ncnnqat import QATCallback, prepare_qat, quantized_layers
from lightning_ncnnqat.export import export
from lightning_ncnnqat.qat.modules import QATConv2d
from lightning_ncnnqat.qat.plan import get_plan
from lightning_ncnnqat.qat.prepared import input_quantizers
from lightning_ncnnqat.qat.wrappers import compiled_submodules, eager_compiled
from lit_models import NetLit, quiet_trainer

torch.set_num_threads(1)


class Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(F.relu(self.conv2(x)).mean((2, 3)))


class Outer(nn.Module):
    """A stem in plain torch, the body compiled."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.body = torch.compile(Body(), backend="eager")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(F.relu(self.stem(x)))


def _trained(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    model.eval()


def test_prepare_qat_sees_through_a_compiled_submodule_and_exports(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model, x = Outer(), torch.randn(8, 3, 8, 8)
    prepare_qat(model, x[:1])
    names = set(get_plan(model).layers)
    assert names == {"stem", "body._orig_mod.conv1", "body._orig_mod.conv2", "body._orig_mod.fc"}
    assert names <= dict(model.named_modules()).keys()
    assert isinstance(model.body._orig_mod.conv1, QATConv2d)
    _trained(model, x)  # the compiled body trains the QAT modules (dynamo recompiles after the swap)
    assert all(float(q.running_absmax.reshape(-1)[0]) > 0 for q in input_quantizers(model).values())
    assert {i.name for i in quantized_layers(model)} == names
    compiled_out = model(x).detach()
    with eager_compiled(model):
        eager_out = model(x).detach()
    torch.testing.assert_close(compiled_out, eager_out)  # the compiled code runs the QAT modules too
    rep = export(model, tmp_path, x[:1], x, targets=["x86"], verbose=False, timing_runs=0)
    assert rep.ok, rep.summary()
    assert {r.torch_name for r in rep.layers} == names
    assert rep.int8_vs_qat.cosine > 0.99, rep.summary()
    assert compiled_submodules(model) and model.body.__dict__["forward"] is not None  # still compiled


def test_eager_compiled_restores_the_compiled_forward_and_reaches_hooks() -> None:
    """Inside the block a hook on a layer of the compiled module fires (compiled code skips hooks
    added after it compiled); afterwards the wrapper's compiled forward is the one it had."""
    torch.manual_seed(1)
    model, x = Outer().eval(), torch.randn(2, 3, 8, 8)
    model(x)
    before = model.body.__dict__["forward"]
    seen: list[torch.Tensor] = []
    h = model.body._orig_mod.conv2.register_forward_hook(lambda m, a, o: seen.append(o))
    with eager_compiled(model):
        model(x)
    assert len(seen) == 1 and seen[0].shape == (2, 8, 4, 4)
    h.remove()
    assert model.body.__dict__["forward"] is before
    with eager_compiled(nn.Linear(2, 2)) as plain:  # no compiled module: nothing to do
        assert isinstance(plain, nn.Linear)


def test_state_dict_with_orig_mod_keys_restores_into_a_fresh_compiled_model() -> None:
    """The QAT state dict's keys hold ``body._orig_mod.``; a fresh model compiled the same way is
    prepared from it and computes what the trained one does."""
    from lightning_ncnnqat import restore_from_checkpoint

    torch.manual_seed(3)
    model, x = Outer(), torch.randn(8, 3, 8, 8)
    prepare_qat(model, x[:1])
    _trained(model, x)
    sd = model.state_dict()
    assert any(k.startswith("body._orig_mod.conv2.") for k in sd)
    fresh = Outer()
    restore_from_checkpoint(fresh, sd)
    assert isinstance(fresh.body._orig_mod.conv2, QATConv2d)
    with torch.no_grad(), eager_compiled(model), eager_compiled(fresh):
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x))


def test_qat_callback_fit_with_a_compiled_submodule(tmp_path) -> None:  # noqa: ANN001
    """Lightning fit: QAT starts at epoch 1 inside the compiled net, and the export is ok."""
    torch.manual_seed(2)
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 5, (32,))
    dl = DataLoader(TensorDataset(x, y), batch_size=8)
    lit = NetLit(torch.compile(Body(), backend="eager"), lr=0.02, example=x[:1])
    cb = QATCallback(start_epoch=1, export_dir=str(tmp_path / "export"), targets=["x86"], verbose=False)
    quiet_trainer(max_epochs=2, callbacks=[cb]).fit(lit, dl, dl)
    assert isinstance(lit.net._orig_mod.conv1, QATConv2d)
    rep = cb.export_report
    assert rep is not None and rep.ok, rep and rep.summary()
    assert {r.torch_name for r in rep.layers} == {"net._orig_mod.conv1", "net._orig_mod.conv2", "net._orig_mod.fc"}
    assert any(k.startswith("net._orig_mod.conv1.") for k in lit.state_dict())


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
