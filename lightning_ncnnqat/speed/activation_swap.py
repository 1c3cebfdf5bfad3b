"""Swap activations that break ncnn's int8 chains for ones it chains (opt-in, before QAT).

The surgery lives in the QAT core (:mod:`lightning_ncnnqat.qat.activation_swap`): a plan made
with ``QATConfig(chain_activations=...)`` re-applies the swap wherever it is applied (a restored
checkpoint, an averaged copy), and the core may not import this room. This module is the
speed-facing name of the same functions; see ``docs/speed.md``.
"""

from __future__ import annotations

from lightning_ncnnqat.qat.activation_swap import (
    CHAIN_TARGETS,
    CHAINED,
    DEFAULT_SWAPS,
    SwapReport,
    apply_chain_activations,
    chain_swap,
    chain_swaps,
    functional_breakers,
    swap_activations,
)

__all__ = [
    "CHAIN_TARGETS", "CHAINED", "DEFAULT_SWAPS", "SwapReport", "apply_chain_activations", "chain_swap", "chain_swaps",
    "functional_breakers", "swap_activations",
]
