"""The package's error types: one base, each error naming the argument or layer and the value.

Every error raised on purpose derives from :class:`NcnnQatError`, so a user catches the
package's own mistakes-found with one ``except``; each also derives from the builtin that fits
(``ValueError``, ``TypeError``, ``RuntimeError``), so code written against those keeps working.
This module imports nothing from the package (every room may import it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_UNSET: Any = object()

MESSAGE_LIMIT = 2000
"""Characters an error message may have: a longer one keeps its head and tail (:func:`bound`)."""

VALUE_LIMIT = 120
"""Characters a value formatted into a message may take (:func:`show`)."""


def bound(message: str, limit: int = MESSAGE_LIMIT) -> str:
    """``message`` cut to about ``limit`` characters, keeping its head (what failed, where) and its
    tail (files written, the fix), with the number of characters left out in the middle.

    Messages embed text the package does not control (a tracer's error that prints the traced
    outputs, a converter's log), which can run to tens of thousands of characters.
    """
    if len(message) <= limit:
        return message
    head, tail = message[: limit * 3 // 4], message[-(limit // 5) :]
    return f"{head} ... [{len(message) - len(head) - len(tail)} characters left out] ... {tail}"


def _array_summary(value: Any) -> str | None:
    """``Tensor(shape=(8, 3), dtype=torch.float32, device=cpu)`` for anything with a shape and a
    dtype (torch, numpy; duck-typed: this module imports neither), else None."""
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None:
        return None
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        return None
    device = getattr(value, "device", None)
    return f"{type(value).__name__}(shape={dims}, dtype={dtype}" + (f", device={device})" if device is not None else ")")


def show(value: Any, limit: int = VALUE_LIMIT) -> str:
    """``value`` as an error message shows it, at most about ``limit`` characters.

    Its ``repr`` where that is short; else a summary: an array's type, shape, dtype and device
    (never its numbers), a mapping's size and first keys, a sequence's type, length and first
    characters, any other value's type and first characters.
    """
    array = _array_summary(value)
    count = 1
    for d in getattr(value, "shape", ()) if array is not None else ():
        count *= int(d)
    if array is not None and count > 8:  # a few numbers are worth showing; more are not
        return array
    text = repr(value)
    if len(text) <= limit:
        return text
    if array is not None:
        return array
    if isinstance(value, Mapping):
        keys = ", ".join(repr(k)[:30] for k in list(value)[:5])
        return f"{type(value).__name__} of {len(value)} keys ({keys}{', ...' if len(value) > 5 else ''})"
    size = f" of {len(value)}" if isinstance(value, (list, tuple, set, frozenset, str, bytes)) else ""
    return f"{type(value).__name__}{size}: {text[:limit]}... ({len(text)} characters)"


class NcnnQatError(Exception):
    """Base of the errors lightning-ncnnqat raises on purpose.

    Attributes:
        argument: the argument or setting at fault (``"start_epoch"``, ``"precision"``), or None.
        layer: the layer at fault (torch module name or ncnn layer name), or None.
        value: the offending value where there is one (absent: ``has_value`` is False).

    The message is bounded (:func:`bound`); the value itself is kept whole on ``value``.
    """

    def __init__(
        self, message: str, *, argument: str | None = None, layer: str | None = None, value: Any = _UNSET
    ) -> None:
        super().__init__(bound(message))
        self.argument = argument
        self.layer = layer
        self.has_value = value is not _UNSET
        self.value = None if value is _UNSET else value


class ConfigError(NcnnQatError, ValueError):
    """A setting that cannot work (wrong value, or a combination known to fail), found before any
    work is done; the message names the argument and the value and says what to use instead."""


class ConfigTypeError(NcnnQatError, TypeError):
    """A setting of the wrong type; the message names the argument, the value and its type."""


class UnsupportedModelError(NcnnQatError, TypeError):
    """A model form QAT cannot prepare (a ScriptModule, float64 weights...); the message names
    the form and the fix."""


class DivergedError(NcnnQatError, RuntimeError):
    """Training diverged: a QAT weight or input range became NaN/inf; the message names the layer
    and, from the callback, the learning rate and ``start_epoch``."""


def config_error(argument: str, value: Any, why: str) -> ConfigError:
    """``ConfigError("`argument`=value: why", ...)``: the one wording for a bad setting."""
    return ConfigError(f"`{argument}`={show(value)}: {why}", argument=argument, value=value)


class LayerError(NcnnQatError, ValueError):
    """A problem with one layer; the step runner turns it into an :class:`ExportError`."""

    def __init__(self, layer: str | None, message: str) -> None:
        super().__init__(message, layer=layer)


class ExportError(NcnnQatError, RuntimeError):
    """An export step failed.

    Attributes:
        step: the step that failed ("validate", "onnx", "onnx_table", "pnnx", "ncnn_table",
            "int8", "parity").
        layer: the layer concerned (torch module or ncnn layer name), or None.
        written: files that were completely written before the failure (they stay).
        failures: every failed step as ``(step, layer, message)`` (the first is this error's).
    """

    def __init__(
        self,
        step: str,
        layer: str | None,
        message: str,
        written: list[str] | None = None,
        failures: list[tuple[str, str | None, str]] | None = None,
    ) -> None:
        if layer and message.startswith(f"layer '{layer}': "):
            message = message[len(f"layer '{layer}': ") :]
        where = f"step '{step}'" + (f", layer '{layer}'" if layer else "")
        text = f"export failed at {where}: {message}"
        others = [f for f in (failures or [])[1:]]
        if others:
            text += "; also failed: " + "; ".join(
                f"step '{s}'" + (f", layer '{lay}'" if lay else "") + f": {m}" for s, lay, m in others
            )
        if written:
            text += f" (files written before the failure: {', '.join(written)})"
        super().__init__(text, layer=layer)
        self.step = step
        self.layer = layer
        # report.json carries these: each bounded as the message is
        self.message = bound(message)
        self.written = list(written or [])
        self.failures = [(s, lay, bound(m)) for s, lay, m in (failures or [(step, layer, message)])]
