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

A compiled SUBMODULE (``self.net = torch.compile(Net())``) stays in the tree: its layers are named
``net._orig_mod.conv1`` (as ``named_modules()`` and the state dict name them), surgery swaps them
inside it like anywhere else, and :func:`eager_compiled` runs it eagerly while the package traces,
captures or exports (a compiled graph skips hooks added after it compiled).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
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


def compiled_submodules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every ``torch.compile`` wrapper (``OptimizedModule``) in ``model``'s
    tree, ``model`` itself included (name ``""``)."""
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ == "OptimizedModule"
            and isinstance(getattr(m, "_orig_mod", None), nn.Module)]


@contextlib.contextmanager
def eager_compiled(model: nn.Module) -> Iterator[nn.Module]:
    """Run every compiled module (``torch.compile``) eagerly inside the block, copies included.

    A compiled module skips forward hooks registered on its modules after it compiled (its graph
    does not see them), so the package's tracing, capture and export hooks would record nothing.
    ``torch.compiler.set_stance("force_eager")`` makes every compiled callable run its original
    code while the block lasts (copies made inside too); and each ``OptimizedModule`` in the tree
    has its dynamo-wrapped instance attribute ``forward`` (torch/_dynamo/eval_frame.py,
    ``OptimizedModule._initialize``) pointed at the wrapped module's ``__call__``, because
    ``torch.jit.trace`` (the ONNX exporter, pnnx) refuses a dynamo-optimized function even when it
    would run eagerly. Both are put back afterwards: the model keeps its compiled code for the
    user's next call. A no-op when ``model``'s tree holds no compiled module.
    """
    compiled = [m for _, m in compiled_submodules(model)]
    if not compiled:
        yield model
        return
    with instance_attributes([(m, "forward", m._orig_mod.__call__) for m in compiled]):
        with torch.compiler.set_stance("force_eager"):
            yield model


_ABSENT = object()


@contextlib.contextmanager
def instance_attributes(changes: Sequence[tuple[object, str, Any]]) -> Iterator[None]:
    """Set ``obj.__dict__[name] = value`` for each ``(obj, name, value)`` for one ``with`` block,
    then give each instance back what it held under that name (or nothing), even on error."""
    saved = [(obj, name, obj.__dict__.get(name, _ABSENT)) for obj, name, _ in changes]
    for obj, name, value in changes:
        obj.__dict__[name] = value
    try:
        yield
    finally:
        for obj, name, old in reversed(saved):
            if old is _ABSENT:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = old


def is_wrapped(model: nn.Module) -> bool:
    """Whether ``model`` is one of the wrappers :func:`unwrap` strips."""
    return _inner(model) is not None
