"""Model forms QAT cannot prepare, refused in one line naming the fix before anything changes.

QAT converts the eager ``nn.Module``'s Conv2d/Linear layers in place and trains float32 (or
float16/bfloat16) weights through float32 fake-quant ops; ncnn computes in float32. So:

* a ``torch.jit.ScriptModule`` (``torch.jit.script`` / ``torch.jit.trace``) has no eager layers
  to convert (its submodules are ``RecursiveScriptModule``\\ s running compiled code);
* a ``torch.export.ExportedProgram`` or anything else that is not an ``nn.Module`` has no layers;
* float64 weights: the fake-quant ops take float32/float16/bfloat16, and ncnn has no float64;
* weights on the ``meta`` device hold no values to quantize;
* a model already prepared by ``torch.ao.quantization`` (observers / fake-quantize modules)
  would be quantized twice with other rules than ncnn's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_ncnnqat.errors import UnsupportedModelError


def _ao_modules(model: nn.Module) -> list[str]:
    """Names of torch.ao observer / fake-quantize modules in ``model``."""
    try:
        from torch.ao.quantization import FakeQuantizeBase
        from torch.ao.quantization.observer import ObserverBase
    except ImportError:  # pragma: no cover - very old torch
        return []
    return [n for n, m in model.named_modules() if isinstance(m, (FakeQuantizeBase, ObserverBase))]


def check_model_form(model: Any, where: str = "prepare_qat") -> None:
    """Raise :class:`~lightning_ncnnqat.errors.UnsupportedModelError` (one line: the form, the
    fix) when ``model`` (already unwrapped) is a form QAT cannot prepare; see the module doc."""
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            f"{where}: `model` is a torch.jit.ScriptModule ({type(model).__name__}), which has no eager layers to "
            "convert; pass the nn.Module it was scripted/traced from (export() traces the QAT model itself)",
            argument="model", value=type(model).__name__,
        )
    if not isinstance(model, nn.Module):
        fix = " (ExportedProgram.module() is a GraphModule; better the original nn.Module)" if hasattr(
            model, "graph_module") else ""
        raise UnsupportedModelError(
            f"{where}: `model` must be a torch.nn.Module, got {type(model).__name__}; pass the eager model{fix}",
            argument="model", value=type(model).__name__,
        )
    for name, p in model.named_parameters():  # a float64 buffer alone (a constant table) may be fine
        if p.is_floating_point() and p.dtype == torch.float64:
            raise UnsupportedModelError(
                f"{where}: `model` has float64 weights ('{name}'); ncnn computes in float32 and QAT's fake-quant ops "
                "take float32/float16/bfloat16: call model.float() first",
                argument="model", value=str(p.dtype),
            )
        if p.device.type == "meta":
            raise UnsupportedModelError(
                f"{where}: `model` has weights on the meta device ('{name}'), which hold no values to quantize; "
                "materialize them first (model.to_empty(device=...) then load the weights)",
                argument="model", value="meta",
            )
    ao = _ao_modules(model)
    if ao:
        raise UnsupportedModelError(
            f"{where}: `model` is already prepared by torch.ao.quantization ('{ao[0]}' observes or fake-quantizes); "
            "pass the float model before torch.ao's prepare/prepare_qat",
            argument="model", value=ao[0],
        )
