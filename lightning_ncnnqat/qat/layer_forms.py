"""Which torch modules compute as the layer class they derive from (used by the QAT plan).

A subclass that overrides ``forward()`` is planned as its base only when it computes the same
(timm's ``Linear``, kept for TorchScript, is plain ``F.linear``); moved out of ``prepare.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_ncnnqat.qat.graph import DataFlow


def _is_plain(m: nn.Module, base: type[nn.Module]) -> bool:
    """An instance of ``base`` (or a subclass) that keeps ``base.forward``."""
    return isinstance(m, base) and type(m).forward is base.forward


def _computes_like(m: nn.Module, base: type[nn.Module], flow: DataFlow, name: str) -> bool:
    """A ``base`` subclass overriding forward() whose eval output equals ``base.forward`` on a probe
    input of its traced shape (timm's ``Linear``, kept for TorchScript, is plain F.linear)."""
    if not isinstance(m, base) or type(m).forward is base.forward:
        return False
    calls = flow.module_calls(name)
    if len(calls) != 1 or len(calls[0].input_shapes) != 1 or not calls[0].input_shapes[0]:
        return False
    shape = (2, *calls[0].input_shapes[0][1:])
    w = next(m.parameters())  # its device and dtype (reading a computed weight could change state)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    modes = {mod: mod.training for mod in m.modules()}
    try:
        m.eval()
        with torch.no_grad():
            y, ref = m(x), base.forward(m, x)
        return isinstance(y, torch.Tensor) and y.shape == ref.shape and torch.allclose(y, ref, rtol=1e-5, atol=1e-6)
    except Exception:  # noqa: BLE001 - the user's module on a probe input may raise anything: then not this form
        return False
    finally:
        for mod, mode in modes.items():
            mod.training = mode
