"""A model in the form it deploys: what its family's own ncnn export sets before tracing.

Some heads compute their eval output one way for Python (``y[:, 0::3] = ...``: strided slice
assignment, tuples of raw features) and another way for export (views and ``torch.cat``, one
tensor), and only the export form is what a converter can express and what gets deployed.
ultralytics' ncnn export (``ultralytics/engine/exporter.py``, ``Exporter.__call__`` before
``export_ncnn``, 8.4.x) sets, on every ``Detect`` head and subclass (Segment, Pose, OBB,
v10Detect, the YOLO26 heads) and on ``Classify``: ``export = True``, ``format = "ncnn"``,
``dynamic = False``, ``xyxy = False`` (no NMS), a reset anchor cache (``shape = None``),
``end2end = False`` (ncnn has no top-k: the one-to-many head is what runs; the one-to-one
copy is training-only), then ``model.fuse()``, whose head part (``Detect.fuse()``) removes the
branch the export does not run (the BN part is QAT's own folding here). A dead branch left in
the trace is dropped by ONNX but crashes pnnx 20260526 (exit -11).

:func:`export_form` does the same, for the length of a ``with`` block, on:

* every module that has a boolean ``export`` attribute (duck typing: the package never
  imports ultralytics), with the settings above where the module has the attribute, then its
  ``fuse()`` where it has one that takes no argument;
* every fused-qkv self-attention module (timm's ``Attention`` form, duck-typed and checked
  numerically): its forward without the 5-D ``qkv.unbind`` pnnx cannot convert
  (``qat.attention_forms``), and MobileViT-style blocks without patches folded into the batch
  axis (``qat.patch_forms``), LeViT-style token-grid subsampling and bias-table attention
  (``qat.grid_forms``), ultralytics' feature-map ``Attention`` as one SDPA (``qat.conv_attention_forms``);
* every module that defines ``ncnn_export_form()`` (the user hook, for any model family): it
  returns a context manager, entered here and exited on restore. Such a module gets only its
  hook, not the duck-typed settings.

Everything is put back on exit, also on error: a duck-typed module's ``__dict__`` as it was
(set attributes removed, changed ones restored, caches computed meanwhile dropped); a hooked
module by its own context's exit.
Nested use is a no-op for modules already in their export form. The plan's eval trace
(``prepare.plan_qat``) and every export trace and reference forward (``export.api``,
``export.model_io``) run inside it, so the QAT plan, the converted model and parity's PyTorch
reference all see the same forward.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from torch import nn

from lightning_ncnnqat.errors import UnsupportedModelError
from lightning_ncnnqat.qat.attention_forms import enter_attention_form
from lightning_ncnnqat.qat.conv_attention_forms import enter_conv_attention_form
from lightning_ncnnqat.qat.grid_forms import enter_grid_form
from lightning_ncnnqat.qat.patch_forms import enter_patch_form
from lightning_ncnnqat.qat.graph import DataFlow
from lightning_ncnnqat.qat.wrappers import eager_compiled

HOOK = "ncnn_export_form"
"""Name of the user hook: ``def ncnn_export_form(self) -> ContextManager`` on any nn.Module."""

EXPORT_FORMAT = "ncnn"

# attribute -> export value, set where the module has the attribute (ultralytics' ncnn export)
HEAD_SETTINGS: dict[str, Any] = {
    "export": True,
    "format": EXPORT_FORMAT,
    "dynamic": False,
    "xyxy": False,
    "end2end": False,
    "shape": None,
}

_ACTIVE = "_ncnnqat_export_form"

F = TypeVar("F", bound=Callable[..., Any])

NOT_EXPORTED = (
    "computed by the eval forward (in its export form) but its output never reaches the model's outputs: the "
    "converters drop it, so it is not exported (e.g. a head's second branch computed but not returned, as a "
    "one-to-one copy is under end2end=False when no fuse() removes it); it trains in float"
)


def is_export_head(m: nn.Module) -> bool:
    """A module following the export-switch protocol, without a hook: a boolean ``export``
    attribute (class or instance; ultralytics' heads: ``Detect`` and subclasses also have
    ``format``, ``Classify`` has ``export`` only). A method named ``export`` does not count."""
    return not callable(getattr(m, HOOK, None)) and isinstance(getattr(m, "export", None), bool)


def _set_head(m: nn.Module) -> list[str]:
    """Apply :data:`HEAD_SETTINGS` to ``m`` where it has the attribute; the names set."""
    done = []
    for attr, value in HEAD_SETTINGS.items():
        if not hasattr(m, attr):
            continue
        try:
            setattr(m, attr, value)
        except AttributeError:  # a read-only property: the module has no such switch
            continue
        done.append(attr)
    fuse = getattr(m, "fuse", None)
    if callable(fuse) and _takes_no_arguments(fuse):
        fuse()  # ultralytics: drops the branch the export does not run (one2one or one2many, training-only layers)
        done.append("fuse()")
    return done


def _takes_no_arguments(fn: Callable[..., Any]) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values())


_REGISTRIES = ("_modules", "_parameters", "_buffers")


def _snapshot(m: nn.Module) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``m.__dict__`` and the contents of its submodule / parameter / buffer registries."""
    return dict(m.__dict__), {k: dict(m.__dict__[k]) for k in _REGISTRIES if isinstance(m.__dict__.get(k), dict)}


def _restore(m: nn.Module, snap: tuple[dict[str, Any], dict[str, dict[str, Any]]]) -> None:
    """Put ``m`` back to ``snap``: added attributes removed, changed ones restored, and the
    registries (the same dict objects) refilled, so submodules a ``fuse()`` removed come back."""
    saved, registries = snap
    for k in [k for k in m.__dict__ if k not in saved]:
        del m.__dict__[k]
    for k, v in saved.items():
        if m.__dict__.get(k, saved) is not v:
            m.__dict__[k] = v
    for k, contents in registries.items():
        m.__dict__[k].clear()
        m.__dict__[k].update(contents)


def _enter_hook(m: nn.Module, name: str, stack: contextlib.ExitStack) -> None:
    cm = getattr(m, HOOK)()
    if not (hasattr(cm, "__enter__") and hasattr(cm, "__exit__")):
        raise UnsupportedModelError(
            f"{type(m).__name__}.{HOOK}() (module '{name or 'model'}') must return a context manager "
            f"(e.g. a @contextlib.contextmanager generator), got {type(cm).__name__}",
            layer=name or None,
        )
    stack.enter_context(cm)


@contextlib.contextmanager
def export_form(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` (any wrapper included) with every module in its export form; restored on exit.

    See the module doc for what is set. Yields ``model``. Raises
    :class:`~lightning_ncnnqat.errors.UnsupportedModelError` naming the module when a
    ``ncnn_export_form()`` hook returns something that is not a context manager; an error
    inside a hook propagates after everything entered so far is restored.
    """
    touched: list[tuple[nn.Module, dict[str, Any]]] = []
    with contextlib.ExitStack() as stack:
        try:
            for name, m in model.named_modules():
                if m.__dict__.get(_ACTIVE):
                    continue
                hook = callable(getattr(m, HOOK, None))
                if not hook and not is_export_head(m):
                    # MobileViT blocks without patches in the batch axis; fused-qkv attention without 5-D tensors
                    # LeViT token grids: strided subsample, attention with a bias table (qat.grid_forms)
                    if (enter_patch_form(m, stack) or enter_attention_form(m, stack) or enter_grid_form(m, stack)
                            or enter_conv_attention_form(m, stack)):  # ultralytics' Attention as one SDPA
                        touched.append((m, None))
                        m.__dict__[_ACTIVE] = True
                    continue
                # a hooked module restores itself (its context); a duck-typed one from a snapshot
                touched.append((m, None if hook else _snapshot(m)))
                m.__dict__[_ACTIVE] = True
                if hook:
                    _enter_hook(m, name, stack)
                else:
                    _set_head(m)
            yield model
        finally:
            stack.close()  # hooks first (entered last), then the attributes
            for m, saved in reversed(touched):
                if saved is None:
                    m.__dict__.pop(_ACTIVE, None)
                else:
                    _restore(m, saved)


def in_export_form(fn: F) -> F:
    """Decorator: run ``fn(model, ...)`` with its first argument ``model`` in :func:`export_form`."""

    @functools.wraps(fn)
    def wrapper(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with export_form(model), eager_compiled(model):  # hooks reach compiled submodules' layers
            return fn(model, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def export_form_modules(model: nn.Module) -> dict[str, str]:
    """``{module name: how}`` of the modules :func:`export_form` changes (``"hook"`` or the
    duck-typed attributes it sets), for reports and plans."""
    out = {}
    for name, m in model.named_modules():
        if callable(getattr(m, HOOK, None)):
            out[name] = "hook"
        elif is_export_head(m):
            fuse = getattr(m, "fuse", None)
            sets = [f"{a}={HEAD_SETTINGS[a]!r}" for a in HEAD_SETTINGS if hasattr(m, a)]
            out[name] = ", ".join(sets + (["fuse()"] if callable(fuse) and _takes_no_arguments(fuse) else []))
    return out


def drop_unexported(flow: DataFlow, layers: dict[str, Any], floats: dict[str, str]) -> None:
    """Move from ``layers`` to ``floats`` (reason :data:`NOT_EXPORTED`) every module whose calls
    in ``flow`` (the eval trace, in export form) all feed nothing the forward returns: ONNX and
    pnnx eliminate such dead code, so the export could not find them, and their trained weights
    diverge from any copy they started as. Nothing moves when ``flow`` does not know the outputs."""
    if not flow.outputs:
        return
    live: set[int] = set()
    todo = [flow.producer[v] for v in flow.outputs if v in flow.producer]
    while todo:
        i = todo.pop()
        if i not in live:
            live.add(i)
            todo += [flow.producer[v] for v in flow.nodes[i].inputs if v in flow.producer]
    for name in list(layers):
        calls = flow.calls.get(name, [])
        if calls and not live.intersection(calls):
            del layers[name]
            floats[name] = NOT_EXPORTED
