"""Heads in the form they deploy (export_form.py) and heads no converter can express (op_origin.py).

ultralytics is not in the main venv, so the heads here mimic its protocol: an ``export`` /
``format`` attribute that switches the eval forward to a convertible form (keypoint decoding
without strided slice assignment; one output instead of ``(y, feats)``), and an ``end2end``
switch between a one-to-one head (a deep copy: equal weights) and the one-to-many head.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_ncnnqat as lq
from lightning_ncnnqat import QATCallback
from lightning_ncnnqat.errors import UnsupportedModelError
from lightning_ncnnqat.errors import ExportError
from lightning_ncnnqat.qat.export_form import NOT_EXPORTED, export_form, export_form_modules
from lightning_ncnnqat.qat.prepare import TRAIN_ONLY, plan_qat
from lit_models import loader, make_data

torch.set_num_threads(1)


class KeypointHead(nn.Module):
    """Pose-like head: eval decodes (x, y, visibility) triples with strided slice assignment,
    which pnnx cannot express; ``export=True`` decodes the same values with view + cat."""

    export = False
    format = None
    dynamic = False
    shape = None

    def __init__(self, c: int, k: int = 2) -> None:
        super().__init__()
        self.k = k
        self.kpt = nn.Conv2d(c, 3 * k, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        y = self.kpt(x).flatten(2)  # [B, 3k, HW]
        self.shape = tuple(x.shape)  # a cache, as Detect's anchors: must not outlive the export form
        if self.export:
            b = y.view(y.shape[0], self.k, 3, -1)
            a = torch.cat((b[:, :, :2] * 2.0 - 0.5, b[:, :, 2:3].sigmoid()), 2)
            return a.view(y.shape[0], 3 * self.k, -1)
        y = y.clone()
        y[:, 2::3] = y[:, 2::3].sigmoid()
        y[:, 0::3] = y[:, 0::3] * 2.0 - 0.5
        y[:, 1::3] = y[:, 1::3] * 2.0 - 0.5
        return y, x  # Python form: decoded values and the raw features


class DualHead(nn.Module):
    """v10Detect-like: a one-to-one copy of the head (equal weights at init) that the eval forward
    also computes; ``end2end`` picks which one is returned. ncnn's export form sets
    ``end2end=False`` and ``fuse()`` removes the branch it does not run."""

    export = False
    format = None

    def __init__(self, c: int, fuse: bool = True) -> None:
        super().__init__()
        self.cv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, 4, 1))
        self.one2one_cv = copy.deepcopy(self.cv)
        self.end2end = True
        if not fuse:
            self.fuse = None  # a head without ultralytics' fuse(): the unused branch stays in the trace

    def fuse(self) -> None:
        setattr(self, "cv" if self.end2end else "one2one_cv", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        a = self.cv(x) if self.cv is not None else None
        b = self.one2one_cv(x.detach()) if self.one2one_cv is not None else None
        if self.training:
            return {"one2many": a, "one2one": b}
        y = (b if self.end2end else a).flatten(2).sigmoid()
        return y if self.export else (y, x)


class ClassifyLike(nn.Module):
    """ultralytics' Classify: an ``export`` switch and no ``format``; export form = softmax only."""

    export = False

    def __init__(self, c: int) -> None:
        super().__init__()
        self.linear = nn.Linear(c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        y = self.linear(x.mean((2, 3)))
        return y.softmax(1) if self.export else (y.softmax(1), y)


class Net(nn.Module):
    def __init__(self, head: nn.Module, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.head = head

    def forward(self, x: torch.Tensor):  # noqa: ANN201
        return self.head(self.stem(x))


def _qat(model: nn.Module, size: int = 16) -> tuple[nn.Module, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, size, size, generator=g)
    lq.prepare_qat(model, x)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, size, size, generator=g))
    return model, x


def test_duck_typed_head_exports_its_export_form_and_is_restored(tmp_path: Path) -> None:
    model, x = _qat(Net(KeypointHead(8, k=2)))
    head = model.head
    cache = head.__dict__["shape"]  # set by the range forwards (batch 4), outside the export form
    held = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    rep = lq.export(model, tmp_path, x, held, targets=["x86"], verbose=False, timing_runs=0, layer_check_samples=1)
    d = json.loads((tmp_path / "report.json").read_text())
    # the export form's single output, not the Python form's (decoded, features) tuple
    assert [o["shape"] for o in d["io"]["outputs"]] == [[6, 256]]
    assert rep.ok and d["failures"] == []
    assert d["int8_vs_qat"]["cosine"] > 0.99
    # restored: the class defaults again, the cache set by the export's forwards (batch 1) undone
    assert "export" not in head.__dict__ and "format" not in head.__dict__ and head.__dict__["shape"] is cache
    assert head.export is False and head.format is None
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, tuple) and len(out) == 2


def test_one_to_one_copy_is_not_exported_and_its_trained_weights_do_not_matter(tmp_path: Path) -> None:
    """The one-to-one copy trains (float) but is not exported: ncnn runs one2many, as ultralytics' export."""
    net = Net(DualHead(8))
    plan = plan_qat(net, torch.randn(1, 3, 16, 16))
    assert {"head.cv.0", "head.cv.2"} <= set(plan.layers)
    assert plan.float_layers["head.one2one_cv.0"] == TRAIN_ONLY
    assert net.head.end2end is True and net.head.one2one_cv is not None  # untouched by the plan
    model, x = _qat(net)
    with torch.no_grad():  # training moves the copy away from the head it was copied from
        for p in model.head.one2one_cv.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    held = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    rep = lq.export(model, tmp_path, x, held, targets=["x86"], verbose=False, timing_runs=0, layer_check_samples=1)
    assert rep.ok
    names = {r.torch_name for r in rep.layers}
    assert "head.cv.2" in names and not any("one2one" in n for n in names)
    assert model.head.end2end is True and model.head.one2one_cv is not None and model.head.cv is not None


def test_branch_that_reaches_no_output_is_planned_float() -> None:
    """Without a fuse(), the export form still computes the one-to-one branch but returns only
    one2many: its layers are dead code the converters drop, so the plan keeps them float."""
    net = Net(DualHead(8, fuse=False))
    plan = plan_qat(net, torch.randn(1, 3, 16, 16))
    assert {"head.cv.0", "head.cv.2", "stem.0"} == set(plan.layers)
    assert plan.float_layers["head.one2one_cv.0"] == plan.float_layers["head.one2one_cv.2"] == NOT_EXPORTED


def test_export_switch_without_format_attribute(tmp_path: Path) -> None:
    """Classify-like: only ``export``; the deployed output is the softmax alone."""
    assert export_form_modules(Net(ClassifyLike(8))) == {"head": "export=True"}
    model, x = _qat(Net(ClassifyLike(8)))
    held = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    rep = lq.export(model, tmp_path, x, held, targets=["x86"], verbose=False, timing_runs=0, layer_check_samples=1)
    assert rep.ok and [o["shape"] for o in rep.io["outputs"]] == [[5]]


class Scaled(nn.Module):
    """Not duck-typed: a user hook switches it to a form without the strided slice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 6)
        self.deploy = False
        self.entered = 0

    @contextlib.contextmanager
    def ncnn_export_form(self) -> Iterator[None]:
        self.entered += 1
        self.deploy = True
        try:
            yield
        finally:
            self.deploy = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if self.deploy:
            return torch.cat((y[:, :3] * 2.0, y[:, 3:]), 1)
        y = y.clone()
        y[:, 0:3:1] = y[:, 0:3:1] * 2.0
        y[:, ::2] = y[:, ::2] + 0.0  # strided: the Python form pnnx cannot express
        return y


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(10, 12)
        self.tail = Scaled()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(F.relu(self.a(x)))


def test_user_hook_ncnn_export_form(tmp_path: Path) -> None:
    model = MLP()
    assert export_form_modules(model) == {"tail": "hook"}
    x = torch.randn(1, 10)
    lq.prepare_qat(model, x)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 10))
    rep = lq.export(model, tmp_path, x, torch.randn(8, 10), targets=["x86"], verbose=False, timing_runs=0)
    assert rep.ok and model.tail.deploy is False and model.tail.entered >= 1
    assert {r.torch_name for r in rep.layers} == {"a", "tail.fc"}


def test_export_form_restores_on_error_and_nests() -> None:
    head = KeypointHead(4)
    net = Net(head, 4)
    with pytest.raises(RuntimeError, match="boom"):
        with export_form(net):
            assert head.export is True and head.format == "ncnn"
            with export_form(net):  # nested: no-op, and the outer form survives the inner exit
                pass
            assert head.export is True
            head(torch.randn(1, 4, 4, 4))
            assert head.__dict__["shape"] == (1, 4, 4, 4)
            raise RuntimeError("boom")
    assert "export" not in head.__dict__ and "shape" not in head.__dict__ and head.format is None


class BadHook(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 3, 1)

    def ncnn_export_form(self) -> bool:
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(x)


def test_hook_that_is_not_a_context_manager_is_named() -> None:
    net = Net(KeypointHead(4), 4)
    net.bad = BadHook()
    with pytest.raises(UnsupportedModelError, match=r"BadHook\.ncnn_export_form\(\) \(module 'bad'\)"):
        with export_form(net):
            pass
    assert "export" not in net.head.__dict__  # what was set before the error is restored


class StridedHead(nn.Module):
    """No export form: its eval forward uses strided slice assignment, which pnnx cannot express."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, 6, 1)
        self.fc = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean((2, 3))
        y = y.clone()
        y[:, 1::2] = y[:, 1::2].sigmoid()
        return self.fc(y)


class CumHead(nn.Module):
    """Another op pnnx keeps unconverted (torch.cumprod), in another module."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, 4, 1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cumprod(self.conv(x).mean((2, 3)).sigmoid(), 1))


class LitHead(L.LightningModule):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.net = Net(head)
        self.example_input_array = torch.randn(2, 3, 16, 16)
        self.steps: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        self.steps.append(self.current_epoch)
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_unconvertible_head_fails_at_qat_start_naming_op_and_module(tmp_path: Path) -> None:
    model = LitHead(StridedHead(8))
    cb = QATCallback(start_epoch=1, export_dir=str(tmp_path / "export"), verbose=False, targets=["x86"])
    trainer = L.Trainer(max_epochs=3, callbacks=[cb], enable_progress_bar=False, logger=False,
                        enable_checkpointing=False, default_root_dir=str(tmp_path))
    with pytest.raises(ExportError) as info:
        trainer.fit(model, loader(make_data(32)))
    msg = str(info.value)
    assert info.value.step == "pnnx"
    assert "op 'Tensor.slice'" in msg and "module 'net.head' (StridedHead)" in msg and "test_export_form.py" in msg
    assert "ncnn_export_form()" in msg
    assert model.steps == [0, 0]  # the float epoch only: no QAT step ran


@pytest.mark.parametrize("head, op, where", [
    (StridedHead, "Tensor.slice", "module 'head' (StridedHead)"),
    (CumHead, "torch.cumprod", "module 'head' (CumHead)"),
])
def test_prepare_qat_with_targets_names_op_and_module(head: type[nn.Module], op: str, where: str) -> None:
    net = Net(head(8))
    with pytest.raises(ExportError) as info:
        lq.prepare_qat(net, torch.randn(1, 3, 16, 16), targets=["x86"])
    msg = str(info.value)
    assert f"op '{op}'" in msg and where in msg, msg
    assert not any(type(m).__name__.startswith("QAT") for m in net.modules())  # a failed start leaves it float


class CumBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.cumprod(self.conv(x).sigmoid(), 1)


def test_op_in_many_blocks_names_their_class() -> None:
    """The same unconvertible op in four blocks: the error counts them and names their class."""
    net = nn.Sequential(nn.Conv2d(3, 4, 1), *[CumBlock(4) for _ in range(4)])
    with pytest.raises(ExportError) as info:
        lq.prepare_qat(net, torch.randn(1, 3, 8, 8), targets=["x86"])
    msg = str(info.value)
    assert "op 'torch.cumprod'" in msg and "4 modules of class CumBlock (module '1' (CumBlock), ...)" in msg, msg
