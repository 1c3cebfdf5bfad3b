"""Loads the compiled kernels, and says clearly why when it falls back to the reference.

The package builds two extension modules (see ``setup.py``):

* ``lightning_ncnnqat._C``: the C++ CPU kernels, always built;
* ``lightning_ncnnqat._C_cuda``: the CUDA kernels, built only against a CUDA build of torch.

Each registers kernels for the ``ncnnqat`` operators defined in ``_registry.py`` (the schema
lives there, once). Whatever a device lacks is served by the pure-PyTorch reference, with one
warning that names the reason and the command that builds the kernels.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass, field

import torch

BUILD_HINT = "pip install --no-build-isolation -e . (from a source checkout)"

# The operators every compiled library must register a kernel for (schemas: _registry.py).
OPS = (
    "fake_quantize_per_channel",
    "update_absmax_",
    "fake_quantize_per_tensor",
    "fake_quantize_per_tensor_backward",
    "fake_quantize_per_tensor_threshold_backward",
    "fold_fake_quantize_weight",
    "fold_fake_quantize_weight_backward",
    "dynamic_quantize",
    "dynamic_fake_quantize",
)


@dataclass
class LibraryStatus:
    """What was loaded: which devices have compiled kernels, and why others do not."""

    cpu: bool = False
    cuda: bool = False
    reasons: dict[str, str] = field(default_factory=dict)


_STATUS: LibraryStatus | None = None


def _try_import(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, OSError from a missing libcudart, undefined symbols
        return f"{type(exc).__name__}: {exc}"
    return None


def _missing_kernels(dispatch_key: str) -> list[str]:
    """The ``ncnnqat`` ops that have no kernel registered for ``dispatch_key`` (e.g. "CPU")."""
    missing = []
    for op in OPS:
        try:
            has = torch._C._dispatch_has_kernel_for_dispatch_key(f"ncnnqat::{op}", dispatch_key)
        except RuntimeError:  # schema not defined (load() called before _registry defined it)
            has = False
        if not has:
            missing.append(op)
    return missing


def _load_one(module: str, dispatch_key: str) -> str | None:
    """Import a compiled library and check that it registered every kernel; return why not."""
    err = _try_import(module)
    if err is not None:
        return f"the compiled {dispatch_key} library could not be loaded ({err})"
    missing = _missing_kernels(dispatch_key)
    if missing:
        older = " (a build older than this package's ops: rebuild it)" if len(missing) < len(OPS) else ""
        return f"{module} loaded but registered no {dispatch_key} kernel for " + ", ".join(
            f"ncnnqat::{op}" for op in missing
        ) + older
    return None


def load() -> LibraryStatus:
    """Import the compiled extensions once; return which devices have compiled kernels."""
    global _STATUS
    if _STATUS is not None:
        return _STATUS
    status = LibraryStatus()
    if os.environ.get("LIGHTNING_NCNNQAT_FORCE_REFERENCE", "") == "1":
        status.reasons["cpu"] = status.reasons["cuda"] = "LIGHTNING_NCNNQAT_FORCE_REFERENCE=1"
        _STATUS = status
        return status
    err = _load_one("lightning_ncnnqat._C", "CPU")
    if err is None:
        status.cpu = True
    else:
        status.reasons["cpu"] = err
    if torch.version.cuda is None:
        status.reasons["cuda"] = "this torch build has no CUDA"
    else:
        err = _load_one("lightning_ncnnqat._C_cuda", "CUDA")
        if err is None:
            status.cuda = True
        else:
            status.reasons["cuda"] = err
    _STATUS = status
    if not status.cpu or (torch.version.cuda is not None and not status.cuda):
        missing = [d for d in ("cpu", "cuda") if d in status.reasons and not (d == "cuda" and torch.version.cuda is None)]
        if os.environ.get("LIGHTNING_NCNNQAT_FORCE_REFERENCE", "") != "1":
            warnings.warn(
                "lightning_ncnnqat: using the pure-PyTorch reference for "
                + ", ".join(f"{d.upper()} ({status.reasons[d]})" for d in missing)
                + f". Results are identical but slower; build the kernels with `{BUILD_HINT}`.",
                RuntimeWarning,
                stacklevel=3,
            )
    return status
