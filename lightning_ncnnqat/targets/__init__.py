"""Release 0.1's path of the emulated ARM64 targets; they live in :mod:`lightning_ncnnqat.ncnn.targets`.

Kept for one release so ``python -m lightning_ncnnqat.targets`` and old imports keep working.
"""

import warnings

from lightning_ncnnqat.ncnn.targets import *  # noqa: F401,F403
from lightning_ncnnqat.ncnn.targets import __all__  # noqa: F401

warnings.warn(
    "`lightning_ncnnqat.targets` moved to `lightning_ncnnqat.ncnn.targets`; the old path is removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)
