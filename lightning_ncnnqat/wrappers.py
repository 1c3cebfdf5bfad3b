"""The user's model inside the wrappers that training frameworks put around it.

QAT changes modules in place, keyed by the user's module names, so every entry point (prepare,
the plan, the export, checkpoints) works on the innermost model. Wrappers are recognised by
type name and the attribute that holds the wrapped module, so this needs neither Fabric nor
dynamo to be imported:

* ``nn.DataParallel`` / ``DistributedDataParallel``: ``.module``
* ``torch.compile``'s ``OptimizedModule``: ``._orig_mod``
* Lightning Fabric's ``_FabricModule``: ``._original_module`` (else ``._forward_module``)
* Lightning's strategy wrapper ``_LightningModuleWrapperBase``: ``._forward_module``

Preparing through ``torch.compile`` works: the compiled wrapper's guards see the changed
module classes and recompile, so it then runs the QAT modules (tested).
"""

from __future__ import annotations

from torch import nn

# (wrapper type name, attributes holding the wrapped module, first present wins)
_WRAPPERS: dict[str, tuple[str, ...]] = {
    "DataParallel": ("module",),
    "DistributedDataParallel": ("module",),
    "OptimizedModule": ("_orig_mod",),
    "_FabricModule": ("_original_module", "_forward_module"),
    "_LightningModuleWrapperBase": ("_forward_module",),
    "_LightningPrecisionModuleWrapperBase": ("_forward_module",),
}
_MAX_DEPTH = 16


def _inner(model: nn.Module) -> nn.Module | None:
    for cls in type(model).__mro__:
        attrs = _WRAPPERS.get(cls.__name__)
        if attrs is None:
            continue
        for attr in attrs:
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module) and inner is not model:
                return inner
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The innermost user model: strips DataParallel, DDP, torch.compile and Fabric wrappers.

    Returns ``model`` itself when it is not a wrapper. Raises TypeError if ``model`` is not an
    ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    for _ in range(_MAX_DEPTH):
        inner = _inner(model)
        if inner is None:
            return model
        model = inner
    return model


def is_wrapped(model: nn.Module) -> bool:
    """Whether ``model`` is one of the wrappers :func:`unwrap` strips."""
    return _inner(model) is not None
