"""Find each quantized torch layer in a converted graph by its weights.

Converters rename and reorder layers (pnnx: ``convrelu_0``, ``conv_7`` before ``conv_8`` for
branches in the other order), so names and order say nothing reliable. The folded float
weights are passed through unchanged (pnnx with ``fp16=0``, the ONNX exporter), so a layer is
found by equal weights of the same ncnn type. Identical weights in two layers (rare: e.g. a
copied block) are resolved by an optional tie-breaker (the ncnn step compares layer outputs);
a layer that is found nowhere, or twice, is an error naming it: the converter changed its
weights (fused another op into it) and the table would not describe the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import LayerError


@dataclass
class WeightOwner:
    """A converted layer holding a weight: its name, ncnn type, flat float32 weight, bias."""

    name: str
    kind: str
    weight: np.ndarray
    bias: np.ndarray | None


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    if np.array_equal(a, b):
        return True
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    return bool(np.allclose(a, b, rtol=1e-6, atol=1e-6 * max(scale, 1e-30)))


def match_by_weights(
    infos: Sequence,
    owners: Sequence[WeightOwner],
    where: str,
    tiebreak: Callable[[str, list[str]], str | None] | None = None,
) -> dict[str, str]:
    """torch layer name -> converted layer name; raise naming the layer if not exactly one."""
    cands: dict[str, list[str]] = {}
    for info in infos:
        w = info.weight.detach().cpu().float().numpy().ravel()
        b = None if info.bias is None else info.bias.detach().cpu().float().numpy().ravel()
        hits = [o for o in owners if o.kind == info.kind and _same(o.weight, w)]
        if len(hits) > 1 and b is not None:
            with_bias = [o for o in hits if o.bias is not None and _same(o.bias, b)]
            hits = with_bias or hits
        if not hits:
            same_kind = [o.name for o in owners if o.kind == info.kind]
            raise LayerError(
                info.name,
                f"layer '{info.name}' ({info.kind}, weight {tuple(info.weight.shape)}) has no layer with its "
                f"weights in the {where} (candidates of that type: {same_kind or 'none'}); the converter "
                "changed its weights (fused another op into it?) or converted it to another type",
            )
        cands[info.name] = [o.name for o in hits]
    result: dict[str, str] = {}
    changed = True
    while changed:
        changed = False
        for name, c in cands.items():
            if name in result:
                continue
            free = [o for o in c if o not in result.values()]
            if len(free) == 1:
                result[name] = free[0]
                changed = True
    for name, c in cands.items():
        if name in result:
            continue
        free = [o for o in c if o not in result.values()]
        pick = tiebreak(name, free) if (tiebreak and free) else None
        if pick is None:
            raise LayerError(
                name,
                f"layer '{name}' cannot be told apart in the {where}: layers {free or c} hold the same weights",
            )
        result[name] = pick
    inverse: dict[str, str] = {}
    for t, o in result.items():
        if o in inverse:
            raise LayerError(t, f"layers '{inverse[o]}' and '{t}' both match '{o}' in the {where}")
        inverse[o] = t
    return result
