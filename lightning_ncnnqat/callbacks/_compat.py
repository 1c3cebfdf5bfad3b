"""Works with both ``lightning.pytorch`` and the standalone ``pytorch_lightning`` package.

The callback derives from every Callback base that is installed, so both Trainers accept it.
"""

from __future__ import annotations

import importlib

from typing_extensions import override

_bases = []
for _pkg in ("lightning.pytorch", "pytorch_lightning"):
    try:
        _bases.append(importlib.import_module(_pkg).Callback)
    except ImportError:
        pass
if not _bases:
    raise ImportError("lightning_ncnnqat needs `lightning` (or `pytorch_lightning`): pip install lightning")
CALLBACK_BASES = tuple(_bases)

try:
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
except ImportError:  # pragma: no cover
    from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

__all__ = ["CALLBACK_BASES", "override", "rank_zero_info", "rank_zero_warn"]
