"""The package's error types: one base, each error naming the argument or layer and the value.

Every error raised on purpose derives from :class:`NcnnQatError`, so a user catches the
package's own mistakes-found with one ``except``; each also derives from the builtin that fits
(``ValueError``, ``TypeError``, ``RuntimeError``), so code written against those keeps working.
This module imports nothing from the package (every room may import it).
"""

from __future__ import annotations

from typing import Any

_UNSET: Any = object()


class NcnnQatError(Exception):
    """Base of the errors lightning-ncnnqat raises on purpose.

    Attributes:
        argument: the argument or setting at fault (``"start_epoch"``, ``"precision"``), or None.
        layer: the layer at fault (torch module name or ncnn layer name), or None.
        value: the offending value where there is one (absent: ``has_value`` is False).
    """

    def __init__(
        self, message: str, *, argument: str | None = None, layer: str | None = None, value: Any = _UNSET
    ) -> None:
        super().__init__(message)
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
    return ConfigError(f"`{argument}`={value!r}: {why}", argument=argument, value=value)


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
        self.message = message
        self.written = list(written or [])
        self.failures = list(failures or [(step, layer, message)])
