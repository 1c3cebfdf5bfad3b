"""Errors of the export, each naming the step and, where there is one, the layer."""

from __future__ import annotations

from ..errors import NcnnQatError


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
