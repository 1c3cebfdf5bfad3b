"""Tracing helpers shared by the ONNX and pnnx steps."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from torch import nn

from lightning_ncnnqat.qat.export_form import export_form
from lightning_ncnnqat.qat.wrappers import eager_compiled, instance_attributes


@contextlib.contextmanager
def traceable(model: nn.Module) -> Iterator[nn.Module]:
    """Make a LightningModule (and any nested one) traceable without a Trainer.

    Its ``trainer`` property raises when no Trainer is attached, and ``torch.jit.trace`` reads
    it; Lightning's own ``to_torchscript`` sets ``_jit_is_scripting`` around tracing, which makes
    the property return None instead. We do the same on the (already copied) model.
    """
    lightning = [m for m in model.modules() if hasattr(type(m), "_jit_is_scripting") or "_jit_is_scripting" in m.__dict__]
    # The export form is entered HERE, before the trace starts: entering it (its forms check
    # themselves numerically on random probes) inside the traced forward would record those
    # probes into the graph (mobilevit_xxs: 24 randn and 45 SDPA nodes instead of 0 and 9,
    # which pnnx then worked on for its whole time limit). Inside export() it is a no-op.
    with export_form(model), instance_attributes([(m, "_jit_is_scripting", True) for m in lightning]):
        with warnings.catch_warnings(), eager_compiled(model):  # compiled submodules run as written
            warnings.simplefilter("ignore")
            yield model
