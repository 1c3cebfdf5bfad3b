"""QAT settings, validated when they are made."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {value!r} ({type(value).__name__})")


@dataclass(frozen=True)
class QATConfig:
    """What QAT quantizes and how.

    Args:
        momentum: weight of the newest batch in the moving average of each input's absmax,
            in (0, 1]. Larger follows recent batches faster; smaller is steadier.
        six_bit_3x3: quantize the weights of 3x3, stride-1, dilation-1, groups=1 convs to
            6 bits (scale 31/absmax), as ncnn2table does for its Winograd int8 path.
        skip: module names or fnmatch patterns (``"head.*"``) of layers to keep in float.
        quantize_grouped_convs: grouped convs (1 < groups < channels) in int8. ``"auto"``
            (default): int8, and QATCallback's preflight measures them on every target at QAT
            start and keeps in float, before training, the ones a target computes wrongly
            (ncnn's packed kernels get some wrong where their output is dequantized); ``True``:
            int8 without that check (runtimes you know); ``False``: always float.
        sync_ranges: under torch.distributed, all-reduce the input ranges so every rank
            (and the exported table) holds the same values.
    """

    momentum: float = 0.1
    six_bit_3x3: bool = True
    skip: tuple[str, ...] = field(default_factory=tuple)
    quantize_grouped_convs: bool | str = "auto"
    sync_ranges: bool = True

    def __post_init__(self) -> None:
        m = self.momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 < float(m) <= 1.0:
            raise ValueError(f"`momentum` must be a float in (0, 1], got {m!r}")
        object.__setattr__(self, "momentum", float(m))
        for name in ("six_bit_3x3", "sync_ranges"):
            _check_bool(name, getattr(self, name))
        if self.quantize_grouped_convs != "auto":
            _check_bool("quantize_grouped_convs", self.quantize_grouped_convs)
        skip = self.skip
        if isinstance(skip, str):
            skip = (skip,)
        if not isinstance(skip, Sequence) or not all(isinstance(s, str) and s for s in skip):
            raise TypeError(f"`skip` must be a list of non-empty module names or patterns, got {self.skip!r}")
        object.__setattr__(self, "skip", tuple(skip))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skip"] = list(self.skip)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QATConfig:
        return cls(**{k: (tuple(v) if k == "skip" else v) for k, v in d.items()})
