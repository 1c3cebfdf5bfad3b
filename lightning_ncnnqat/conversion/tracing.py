"""Tracing helpers shared by the ONNX and pnnx steps."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from torch import nn

from lightning_ncnnqat.qat.wrappers import eager_compiled, instance_attributes


@contextlib.contextmanager
def traceable(model: nn.Module) -> Iterator[nn.Module]:
    """Make a LightningModule (and any nested one) traceable without a Trainer.

    Its ``trainer`` property raises when no Trainer is attached, and ``torch.jit.trace`` reads
    it; Lightning's own ``to_torchscript`` sets ``_jit_is_scripting`` around tracing, which makes
    the property return None instead. We do the same on the (already copied) model.
    """
    lightning = [m for m in model.modules() if hasattr(type(m), "_jit_is_scripting") or "_jit_is_scripting" in m.__dict__]
    with instance_attributes([(m, "_jit_is_scripting", True) for m in lightning]):
        with warnings.catch_warnings(), eager_compiled(model):  # compiled submodules run as written
            warnings.simplefilter("ignore")
            yield model
