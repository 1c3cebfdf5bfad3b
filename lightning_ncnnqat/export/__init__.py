"""Export a QAT-trained model for ncnn: ONNX + table, float32 ncnn + table, int8 ncnn, report.

Main entry point: :func:`export`. The pieces (``.param`` parsing, the int8 writer, the table
writer, parity checks, the isolated ncnn runtime) are usable on their own from the submodules.
"""

from __future__ import annotations

from lightning_ncnnqat.export.api import export, validate_layers
from lightning_ncnnqat.export.config import ExportConfig
from lightning_ncnnqat.errors import ExportError, LayerError
from lightning_ncnnqat.verification.report import ExportReport, LayerReport, OutputParity

__all__ = ["export", "ExportConfig", "ExportReport", "LayerReport", "OutputParity", "ExportError", "LayerError", "validate_layers"]
