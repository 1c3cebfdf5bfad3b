"""PyTorch's fused eval "fast paths" kept away from QAT-prepared modules.

In eval mode with gradients off (Lightning runs validate, test and predict under
``torch.inference_mode``) three torch modules skip their Python forward and call one fused native
op on their raw weights (torch/nn/modules/transformer.py and activation.py, the
``why_not_sparsity_fast_path`` / ``why_not_fast_path`` checks):

* ``nn.TransformerEncoderLayer``: ``torch._transformer_encoder_layer_fwd`` (batch_first, even
  heads, ReLU/GELU, ...). Its children (``QATMultiheadAttention``, ``QATGemmLinear``) never run,
  so what is validated is not what ncnn computes, and a trace holds an op pnnx cannot convert.
* ``nn.TransformerEncoder``: with ``src_key_padding_mask`` and ``use_nested_tensor`` it hands its
  layers a NestedTensor (the QAT ops compute on dense tensors only).
* ``nn.MultiheadAttention``: ``torch._native_multi_head_attention``. The QAT class overrides
  ``forward``, so only a float one takes it; numerically that is its float layer, but a trace of it
  has no ONNX export and no pnnx conversion.

Each module of the first two classes in a prepared model takes the Python path, by per-module
switches torch itself checks, so nothing global changes: a no-op forward pre-hook on an encoder
layer ("forward pre-/hooks are attached to the module") and ``use_nested_tensor = False`` on an
encoder. :func:`restore_fast_paths` undoes both. Traces (the pnnx and ONNX steps, which trace the
float copy) use :func:`python_paths`, the documented global switch
``torch.backends.mha.set_fastpath_enabled``, scoped to the trace and restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

#: ``nn.TransformerEncoder.use_nested_tensor`` as the user had it (restored by :func:`restore_fast_paths`).
_NESTED = "_ncnnqat_use_nested_tensor"


def _python_path(module: nn.Module, args: Any) -> None:
    """Forward pre-hook that does nothing: its presence makes ``nn.TransformerEncoderLayer.forward``
    take its Python path (torch >= 2.1: "forward pre-/hooks are attached to the module").
    Module level, so a model that holds it still pickles."""
    return None


def block_fast_paths(model: nn.Module) -> list[str]:
    """Make every ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` in ``model`` run its
    Python forward (the QAT children it holds then run in eval mode under no_grad too).

    Idempotent. Returns the names of the modules changed (for tests and messages)."""
    changed = []
    for name, m in model.named_modules():
        if isinstance(m, nn.TransformerEncoderLayer):
            if not any(h is _python_path for h in m._forward_pre_hooks.values()):
                m.register_forward_pre_hook(_python_path)
                changed.append(name)
        elif isinstance(m, nn.TransformerEncoder) and _NESTED not in m.__dict__:
            m.__dict__[_NESTED] = getattr(m, "use_nested_tensor", None)
            m.use_nested_tensor = False
            changed.append(name)
    return changed


def restore_fast_paths(model: nn.Module) -> None:
    """Undo :func:`block_fast_paths` on ``model``: the pre-hooks removed, ``use_nested_tensor`` back."""
    for m in model.modules():
        for key in [k for k, h in m._forward_pre_hooks.items() if h is _python_path]:
            del m._forward_pre_hooks[key]
        if _NESTED in m.__dict__:
            nested = m.__dict__.pop(_NESTED)
            if nested is None:
                m.__dict__.pop("use_nested_tensor", None)
            else:
                m.use_nested_tensor = nested


@contextlib.contextmanager
def python_paths() -> Iterator[None]:
    """Within the block every torch module takes its Python path (what pnnx and the ONNX exporters
    can convert): ``torch.backends.mha.set_fastpath_enabled(False)``, the setting restored on exit
    (also when the block raises). Global for the block's duration: for traces, not training loops."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
