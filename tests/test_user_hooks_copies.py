"""The package's copies of the user's model leave out the hooks that watch it (D1).

Lightning's ``PyTorchProfiler`` hangs forward pre/post hooks holding live ``record_function``
objects on every module (``lightning/pytorch/profilers/pytorch.py``, ``RegisterRecordFunction``):
``copy.deepcopy`` refuses them, and the QAT start's copies crashed. The rule
(``qat/prepared.py``, ``deepcopy_model``): a copy keeps torch's weight-computing pre-hooks
(prune, weight_norm, spectral_norm), the package's own hooks and every user hook deepcopy
accepts (one may change what a module computes); it leaves out the profiler's hooks and hooks
deepcopy refuses (with a warning naming them), and shares attributes deepcopy refuses (locks,
open files).
"""

from __future__ import annotations

import tempfile
import threading
import warnings

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


def test_copy_leaves_out_hooks_deepcopy_refuses_and_shares_locks() -> None:
    """A bound-method hook whose owner holds a lock is left out (a warning names it), a module
    attribute holding a lock and one holding an open file are shared; the copy runs and feeds
    the user's recorder nothing, and computes what the model computes."""
    net = _net()
    rec = Recorder()
    net[0].register_forward_hook(rec.hook)
    net.lock = threading.Lock()
    with tempfile.TemporaryFile() as f:
        net[3].log_file = f
        with pytest.warns(UserWarning, match=r"leave out 1 hook.*'0': forward_hooks Recorder.hook"):
            cp = deepcopy_model(net)
        assert cp.lock is net.lock and cp[3].log_file is f
    assert not cp[0]._forward_hooks
    x = torch.randn(2, 3, 16, 16)
    net.eval(), cp.eval()
    y = cp(x)
    y.sum().backward()
    assert rec.seen == []
    assert torch.equal(y, net(x))
    assert rec.seen == [(2, 8, 16, 16)]  # the user's own model still records


def test_copy_leaves_out_lightnings_profiler_hooks_silently() -> None:
    """Lightning's ``RegisterRecordFunction`` hooks (the PyTorchProfiler's) are left out with no
    warning, before its first recorded call (nothing refuses deepcopy yet) and after it."""
    from lightning.pytorch.profilers.pytorch import RegisterRecordFunction

    net, x = _net().eval(), torch.randn(2, 3, 16, 16)
    with RegisterRecordFunction(net):
        for run in range(2):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                cp = deepcopy_model(net)
            assert all(not m._forward_hooks and not m._forward_pre_hooks for m in cp.modules()), run
            net(x)
    assert torch.equal(cp(x), net(x))


def test_copy_keeps_user_hooks_that_compute() -> None:
    """User hooks deepcopy accepts stay (a hook may change what a module computes): an output
    rewrite, an input rewrite with kwargs, a backward hook; the copy's hooks are its own."""
    net = _net()
    grads = []
    net[7].register_forward_hook(lambda m, args, out: out * 3 + 1)
    net[3].register_forward_pre_hook(lambda m, args, kwargs: ((args[0] * 0.5,), kwargs), with_kwargs=True)
    net[7].register_full_backward_hook(lambda m, gi, go: grads.append(go[0].shape))
    x = torch.randn(2, 3, 16, 16)
    cp = deepcopy_model(net)
    net.eval(), cp.eval()
    with torch.no_grad():
        y = net(x)
        assert torch.equal(cp(x), y)
        net[7].weight.mul_(0)  # the copy's weights and hooks are its own
        assert torch.equal(cp(x), y)
    cp(x).sum().backward()
    assert grads == [(2, 10)]


def test_copy_keeps_weight_computing_prehooks() -> None:
    """Pruning and (hook-based) weight norm change what a layer computes: the copy keeps their
    pre-hooks, after a training step too, next to a lock-holding recorder it leaves out."""
    net = _net()
    prune.l1_unstructured(net[0], "weight", amount=0.5)
    torch.nn.utils.weight_norm(net[7])
    net[0].register_forward_hook(Recorder().hook)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(4, 3, 16, 16)
    F.cross_entropy(net(x), torch.arange(4)).backward()
    opt.step()
    with pytest.warns(UserWarning, match="leave out 1 hook"):
        cp = deepcopy_model(net)
    assert len(cp[0]._forward_pre_hooks) == 1 and len(cp[7]._forward_pre_hooks) == 1 and not cp[0]._forward_hooks
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
