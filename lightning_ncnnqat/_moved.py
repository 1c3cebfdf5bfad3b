"""Module paths of release 0.1 that moved into the package's rooms in 0.2.

Importing an old path still works for one release: it warns once (``DeprecationWarning`` naming
the new path) and gives the module at its new path, the same object, so ``isinstance`` checks and
monkeypatching see one module. The forwarder answers only for the names below.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

PACKAGE = "lightning_ncnnqat"

# old path -> new path, both relative to the package
MOVED: dict[str, str] = {
    "activation_swap": "speed.activation_swap",
    "batches": "qat.batches",
    "bn_fold": "qat.bn_fold",
    "checkpoint": "qat.checkpoint",
    "computed_weights": "qat.computed_weights",
    "config": "qat.config",
    "dtypes": "qat.dtypes",
    "export.conversion": "verification.float_conversion",
    "export.errors": "errors",
    "export.files": "files",
    "export.graph_match": "conversion.graph_match",
    "export.int8_writer": "ncnn.int8_writer",
    "export.isolated_runtime": "ncnn.isolated",
    "export.layer_checks": "verification.layer_checks",
    "export.matching": "conversion.matching",
    "export.model_io": "conversion.model_io",
    "export.ncnn_bin_layout": "ncnn.bin_layout",
    "export.ncnn_modelwriter": "ncnn.model_writer",
    "export.ncnn_param": "ncnn.param",
    "export.ncnn_runtime": "ncnn.runtime",
    "export.ncnn_worker": "ncnn.worker",
    "export.onnx_export": "conversion.onnx",
    "export.op_origin": "conversion.op_origin",
    "export.output_floor": "verification.output_floor",
    "export.parity": "verification.parity",
    "export.pnnx_convert": "conversion.pnnx",
    "export.report": "verification.report",
    "export.runtime_checks": "verification.runtime_checks",
    "export.tables": "ncnn.table",
    "export.tracing": "conversion.tracing",
    "export.verdicts": "verification.verdicts",
    "export_form": "qat.export_form",
    "graph": "qat.graph",
    "model_copies": "qat.model_copies",
    "model_forms": "qat.model_forms",
    "modules": "qat.modules",
    "plan": "qat.plan",
    "plan_state": "qat.plan_state",
    "prepare": "qat.prepare",
    "prepared": "qat.prepared",
    "qat_start": "start",
    "ranges": "qat.ranges",
    "speed_plan": "speed.plan",
    "speed_worker": "ncnn.speed_worker",
    "targets.arm_env": "ncnn.targets.arm_env",
    "targets.build": "ncnn.targets.build",
    "targets.check": "ncnn.targets.check",
    "targets.cli": "ncnn.targets.cli",
    "wrappers": "qat.wrappers",
}


class _Forwarder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds old module paths and loads them as the module at the new path."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        old = fullname[len(PACKAGE) + 1 :] if fullname.startswith(PACKAGE + ".") else None
        if old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # a placeholder; exec_module puts the real module in its place

    def exec_module(self, module: ModuleType) -> None:
        old = module.__name__
        new = f"{PACKAGE}.{MOVED[old[len(PACKAGE) + 1 :]]}"
        warnings.warn(
            f"`{old}` moved to `{new}`; the old path is removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        # The import system returns what sys.modules holds after exec_module: the real module.
        sys.modules[old] = importlib.import_module(new)


def install() -> None:
    """Put the forwarder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Forwarder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Forwarder())
