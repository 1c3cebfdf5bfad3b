"""lightning-ncnnqat: quantization-aware training for ncnn int8 as a Lightning callback.

    Trainer(callbacks=[QATCallback(start_epoch=5)])

Public API: :class:`QATCallback`, :class:`QATConfig`, :func:`prepare_qat` (surgery without a
Trainer), :func:`export` (ONNX + ncnn tables + int8 ncnn model + parity report) and the
fake-quant ops in :mod:`lightning_ncnnqat.ops`.
"""

from __future__ import annotations

from .callbacks import QATCallback
from .config import QATConfig
from .errors import ConfigError, NcnnQatError

# The function shadows the subpackage's name on purpose: `lightning_ncnnqat.export(...)`; the
# subpackage stays importable as `from lightning_ncnnqat.export import ExportReport`.
from .export import ExportError, ExportReport, export
from .calibration import CalibrationResult, calibrate
from .preprocessing import Preprocessing
from .checkpoint import load_from_checkpoint, restore_from_checkpoint
from .prepare import folded_float_model, quantized_layers, unprepare
from .qat_start import prepare_qat
from .wrappers import unwrap

__all__ = [
    "QATCallback",
    "QATConfig",
    "NcnnQatError",
    "ConfigError",
    "Preprocessing",
    "calibrate",
    "CalibrationResult",
    "ExportError",
    "ExportReport",
    "export",
    "folded_float_model",
    "prepare_qat",
    "quantized_layers",
    "restore_from_checkpoint",
    "load_from_checkpoint",
    "unprepare",
    "unwrap",
]
__version__ = "0.1.0"
