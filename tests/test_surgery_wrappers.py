"""prepare_qat and friends through DataParallel, DDP, torch.compile and Fabric wrappers."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_ncnnqat import folded_float_model, prepare_qat, quantized_layers, restore_from_checkpoint
from lightning_ncnnqat.qat.modules import QATConv2d
from lightning_ncnnqat.qat.plan import get_plan
from lightning_ncnnqat.qat.prepared import input_quantizers
from lightning_ncnnqat.qat.prepare import unprepare
from lightning_ncnnqat.qat.wrappers import unwrap
from models import MixedNet


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def process_group():  # noqa: ANN201
    if dist.is_initialized():
        yield
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _wrap(kind: str, m: nn.Module) -> nn.Module:
    if kind == "dp":
        return nn.DataParallel(m)
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(m)
    if kind == "fabric":
        from lightning.fabric import Fabric

        return Fabric(accelerator="cpu", devices=1).setup_module(m)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["dp", "ddp", "fabric"])
def test_prepare_through_wrappers(kind: str, request) -> None:  # noqa: ANN001
    if kind == "ddp":
        request.getfixturevalue("process_group")
    torch.manual_seed(0)
    m = MixedNet()
    w = _wrap(kind, m)
    assert unwrap(w) is m
    x = torch.randn(4, 3, 16, 16)
    plan = prepare_qat(w, x[:1])
    assert get_plan(w) is plan and get_plan(m) is plan and isinstance(m.stem[0], QATConv2d)
    w.train()
    w(x)  # the wrapper runs the QAT modules
    assert set(input_quantizers(w)) == set(input_quantizers(m)) and m.pw.input_quantizer.running_absmax.item() > 0
    assert [i.name for i in quantized_layers(w)] == [i.name for i in quantized_layers(m)]
    f = folded_float_model(w)
    assert not any(k.startswith(("module.", "_forward_module.")) for k in f.state_dict())
    # a checkpoint of the wrapper (prefixed keys) restores into a fresh wrapped model
    state = {"state_dict": w.state_dict(), "ncnnqat": plan.to_dict()}
    fresh = _wrap(kind, MixedNet()) if kind != "fabric" else MixedNet()
    restore_from_checkpoint(fresh, state)
    m.eval()
    unwrap(fresh).eval()
    assert torch.equal(unwrap(fresh)(x), m(x))
    unprepare(w)
    assert get_plan(m) is None and type(m.stem[0]) is nn.Conv2d


def test_prepare_through_torch_compile_runs_the_qat_modules() -> None:
    def small() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                             nn.Linear(512, 4))

    torch.manual_seed(0)
    m = small().eval()
    ref_model = small().eval()
    ref_model.load_state_dict(m.state_dict())
    c = torch.compile(m, backend="eager")
    x = torch.randn(4, 3, 8, 8)
    float_out = c(x)  # compiled once on the float model
    prepare_qat(c, x[:1])
    prepare_qat(ref_model, x[:1])
    c.train()
    ref_model.train()
    c(x)  # the compiled wrapper recompiles: its training step moves the QAT ranges
    ref_model(x)
    ranges = {n: q.running_absmax.item() for n, q in input_quantizers(c).items()}
    assert all(r > 0 for r in ranges.values())
    assert ranges == {n: q.running_absmax.item() for n, q in input_quantizers(ref_model).items()}
    c.eval()
    ref_model.eval()
    out = c(x)
    assert torch.equal(out, ref_model(x)) and not torch.equal(out, float_out)
