"""The package's copies of the user's model leave out the hooks that watch it (D1).

Lightning's ``PyTorchProfiler`` hangs forward pre/post hooks holding live ``record_function``
objects on every module (``lightning/pytorch/profilers/pytorch.py``, ``RegisterRecordFunction``):
``copy.deepcopy`` refuses them, and the QAT start's copies crashed. The rule
(``qat/prepared.py``, ``deepcopy_model``): a copy keeps torch's weight-computing pre-hooks
(prune, weight_norm, spectral_norm) and the package's own hooks, leaves out every other hook, and
shares (does not copy) attributes deepcopy refuses (locks, open files).
"""

from __future__ import annotations

import tempfile
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from lit_models import NetLit, loader, make_data, quiet_trainer
from lightning_ncnnqat import QATCallback, QATConfig
from lightning_ncnnqat.qat.fast_path import block_fast_paths
from lightning_ncnnqat.qat.prepared import deepcopy_model, input_quantizers

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )


class Recorder:
    """A feature recorder as users write them: a bound-method hook whose owner holds a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[tuple[int, ...]] = []

    def hook(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        with self.lock:
            self.seen.append(tuple(out.shape))


@pytest.mark.parametrize("profiler", ["pytorch", "simple", "advanced"])
def test_fit_with_a_lightning_profiler_starts_qat(profiler: str, tmp_path) -> None:
    """QAT starts (and trains ranges) under each of Lightning's profilers; the pytorch profiler's
    record hooks are on every module while the QAT start copies the model."""
    lit = NetLit(_net(), example=torch.randn(2, 3, 16, 16))
    cb = QATCallback(start_epoch=0, verbose=False, config=QATConfig(prefer="int8"), export=False)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, profiler=profiler,
                            default_root_dir=str(tmp_path), callbacks=[cb])
    trainer.fit(lit, loader(make_data(32)), loader(make_data(16, seed=1)))
    ranges = {n: float(q.running_absmax) for n, q in input_quantizers(lit).items()}
    assert ranges and all(r > 0 for r in ranges.values()), ranges
    assert trainer.global_step == 2


def test_copy_leaves_out_watching_hooks_and_shares_locks() -> None:
    """A bound-method hook whose owner holds a lock, a closure recording outputs, a module
    attribute holding a lock and one holding an open file: the copy runs, has none of the hooks,
    feeds none of the user's records, and shares the lock and file."""
    net = _net()
    rec, calls = Recorder(), []
    net[0].register_forward_hook(rec.hook)
    net[3].register_forward_pre_hook(lambda m, args: calls.append(m))
    net[7].register_full_backward_hook(lambda m, gi, go: calls.append("backward"))
    net.lock = threading.Lock()
    with tempfile.TemporaryFile() as f:
        net[3].log_file = f
        cp = deepcopy_model(net)
        assert cp.lock is net.lock and cp[3].log_file is f
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in cp.modules())
    x = torch.randn(2, 3, 16, 16)
    net.eval(), cp.eval()
    y = cp(x)
    y.sum().backward()
    assert rec.seen == [] and calls == []
    assert torch.equal(y, net(x))  # the computation is the same
    assert rec.seen == [(2, 8, 16, 16)] and calls == [net[3]]  # the user's own model still records


def test_copy_keeps_weight_computing_prehooks() -> None:
    """Pruning and (hook-based) weight norm change what a layer computes: the copy keeps their
    pre-hooks, after a training step too, next to a profiler-like hook it leaves out."""
    net = _net()
    prune.l1_unstructured(net[0], "weight", amount=0.5)
    torch.nn.utils.weight_norm(net[7])
    net[0].register_forward_pre_hook(lambda m, args: None)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(4, 3, 16, 16)
    F.cross_entropy(net(x), torch.arange(4)).backward()
    opt.step()
    cp = deepcopy_model(net)
    assert len(cp[0]._forward_pre_hooks) == 1 and len(cp[7]._forward_pre_hooks) == 1
    net.eval(), cp.eval()
    with torch.no_grad():
        y, yc = net(x), cp(x)
    assert torch.equal(y, yc)
    assert int((cp[0].weight == 0).sum()) == cp[0].weight.numel() // 2  # the mask is applied in the copy
    cp[7].weight_g.data.mul_(2)  # the copy's weight norm is its own: computed from its own g
    with torch.no_grad():
        assert not torch.allclose(cp(x), y)


def test_copy_keeps_the_packages_own_hooks() -> None:
    """The fast-path pre-hook the package puts on an encoder layer changes what runs: kept."""
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    layer.register_forward_hook(Recorder().hook)
    assert block_fast_paths(layer) == [""]
    cp = deepcopy_model(layer)
    assert len(cp._forward_pre_hooks) == 1 and not cp._forward_hooks
