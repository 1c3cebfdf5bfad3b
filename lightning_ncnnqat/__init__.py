"""lightning-ncnnqat: quantization-aware training for ncnn int8 as a Lightning callback.

    Trainer(callbacks=[QATCallback(start_epoch=5)])

Public API: :class:`QATCallback`, :class:`QATConfig`, :class:`ExportConfig` (the settings of
the callback's QAT and export), :func:`prepare_qat` (surgery without a Trainer), :func:`export`
(ONNX + ncnn tables + int8 ncnn model + parity report) and the fake-quant ops in
:mod:`lightning_ncnnqat.ops`.

The names below load on first use, so the torch-free ncnn layer (:mod:`lightning_ncnnqat.ncnn`,
the ARM target tools, the worker scripts) imports without torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

from lightning_ncnnqat import _moved
from lightning_ncnnqat.errors import ConfigError, NcnnQatError

_moved.install()


class _Package(types.ModuleType):
    """Keeps ``lightning_ncnnqat.export`` the function when the subpackage of that name loads
    (the import system sets a loaded subpackage as an attribute of its parent)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "export" and isinstance(value, types.ModuleType):
            return  # the subpackage stays importable through sys.modules
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "QATCallback": "lightning_ncnnqat.callbacks",
    "QATConfig": "lightning_ncnnqat.qat.config",
    "ExportConfig": "lightning_ncnnqat.export.config",
    "ExportError": "lightning_ncnnqat.errors",
    "ExportReport": "lightning_ncnnqat.verification.report",
    "Preprocessing": "lightning_ncnnqat.preprocessing",
    "calibrate": "lightning_ncnnqat.calibration",
    "CalibrationResult": "lightning_ncnnqat.calibration",
    "load_from_checkpoint": "lightning_ncnnqat.qat.checkpoint",
    "restore_from_checkpoint": "lightning_ncnnqat.qat.checkpoint",
    "folded_float_model": "lightning_ncnnqat.qat.prepared",
    "quantized_layers": "lightning_ncnnqat.qat.prepared",
    "unprepare": "lightning_ncnnqat.qat.prepare",
    "prepare_qat": "lightning_ncnnqat.start",
    "unwrap": "lightning_ncnnqat.qat.wrappers",
}

if TYPE_CHECKING:
    from lightning_ncnnqat.calibration import CalibrationResult, calibrate
    from lightning_ncnnqat.callbacks import QATCallback
    from lightning_ncnnqat.errors import ExportError
    from lightning_ncnnqat.export.api import export
    from lightning_ncnnqat.export.config import ExportConfig
    from lightning_ncnnqat.preprocessing import Preprocessing
    from lightning_ncnnqat.qat.checkpoint import load_from_checkpoint, restore_from_checkpoint
    from lightning_ncnnqat.qat.config import QATConfig
    from lightning_ncnnqat.qat.prepared import folded_float_model, quantized_layers
    from lightning_ncnnqat.qat.prepare import unprepare
    from lightning_ncnnqat.start import prepare_qat
    from lightning_ncnnqat.qat.wrappers import unwrap
    from lightning_ncnnqat.verification.report import ExportReport


def __getattr__(name: str) -> Any:
    """Load a public name on first use (PEP 562)."""
    if name == "export":
        # The function shadows the subpackage's name on purpose: `lightning_ncnnqat.export(...)`;
        # the subpackage stays importable as `from lightning_ncnnqat.export import ExportReport`.
        fn = importlib.import_module("lightning_ncnnqat.export.api").export
        globals()["export"] = fn
        return fn
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        # a submodule used as an attribute (`lightning_ncnnqat.qat.plan`), loaded on first use;
        # a module path of release 0.1 forwards with its DeprecationWarning (`_moved`)
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'lightning_ncnnqat' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "QATCallback",
    "QATConfig",
    "ExportConfig",
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
__version__ = "0.2.0.dev0"
