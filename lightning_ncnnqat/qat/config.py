"""QAT settings, validated when they are made."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_ncnnqat.errors import ConfigError, ConfigTypeError
from lightning_ncnnqat.ncnn.targets.profile import board_profile_argument
from lightning_ncnnqat.policy.speed import PREFERS


RANGE_INITS = ("first_batch", "absmax", "kl", "aciq")
"""Where input thresholds start (``QATConfig.range_init``)."""

RANGE_MODES = ("moving_average", "fixed", "learned")
"""How input thresholds move during QAT (``QATConfig.ranges``)."""

CHAIN_ACTIVATIONS = ("off", "relu", "relu6", "leaky_relu", "hardswish")
"""What SiLU / GELU / Hardswish modules become at QAT start (``QATConfig.chain_activations``)."""


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigTypeError(f"`{name}` must be a bool, got {value!r} ({type(value).__name__})")


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
        range_init: where each input range (threshold) starts. ``"first_batch"``: the absmax
            of the first QAT training batch; ``"absmax"``, ``"kl"``, ``"aciq"``: ncnn2table's
            calibration of that method (:func:`~lightning_ncnnqat.calibrate`) on the BN-folded
            float model over ``calibration_batches`` training batches.
        calibration_batches: training batches the calibrated start reads (>= 1).
        ranges: how the thresholds move during QAT. ``"moving_average"``: towards each batch's
            absmax with ``momentum`` (ncnnqat's rule); ``"fixed"``: they stay where
            ``range_init`` put them; ``"learned"``: trained by gradient descent (TQT-style:
            the natural log of each threshold is a trained value, Adam with ``range_lr``).
        range_lr: learning rate of the thresholds' log under ``ranges="learned"`` (> 0).
        chain_activations: ``"off"`` (default) or the activation that SiLU, GELU and Hardswish
            MODULES become when QAT starts (``"relu"``, ``"relu6"``, ``"leaky_relu"``,
            ``"hardswish"``; a Hardswish stays under ``"hardswish"``), so ncnn's int8 convs hand
            their output to the next conv as int8 (requantize) instead of dequantizing around
            each SiLU; the QAT epochs fine-tune the network to it. The summary counts the convs
            that chain before and after. Opt-in: it changes the model's function (the plan
            re-applies it on restore). See ``docs/speed.md``.
        freeze_bn_after: epochs after QAT starts during which the folded BatchNorms' statistics
            keep training (batch statistics in training steps, running statistics updated, as
            torch.ao's ConvBn before ``freeze_bn_stats``); 0 (default) freezes them when QAT
            starts. QATCallback freezes them at the start of epoch ``start + freeze_bn_after``;
            without a Trainer, ``prepare_qat`` leaves them training until
            ``lightning_ncnnqat.qat.bn_fold.set_bn_stats_frozen(model)`` is called.
        prefer: what the int8 model is for, where the QAT start can time it (this machine,
            ``"x86"``, when the export targets include it). ``"speed"`` (default): int8 layers
            that are slower than float here (timed alone, then confirmed on the whole model) are
            kept float before training, named in the summary with their timings, so the int8
            model is not slower than the float one on the measured target; ``"int8"``: every
            layer int8 anyway (timed and reported); ``"size"``: every layer int8, nothing timed
            (the smallest file). See :mod:`lightning_ncnnqat.speed.decide`.
        board_profile: path of a board profile (``python -m lightning_ncnnqat.ncnn.targets profile
            EXPORT_DIR -o board.json`` run on the board, on an export of this architecture at this
            input size): ``prefer`` then decides for THAT board, from its per-layer int8 vs float
            times, and the board decides even where this machine is timed too (x86 then only
            reports). Read and checked when the config is made (ConfigError: missing, malformed or
            emulated); a profile of another architecture is an error at QAT start, naming the
            file. See ``docs/targets.md``.
    """

    momentum: float = 0.1
    six_bit_3x3: bool = True
    skip: tuple[str, ...] = field(default_factory=tuple)
    quantize_grouped_convs: bool | str = "auto"
    sync_ranges: bool = True
    range_init: str = "first_batch"
    calibration_batches: int = 16
    ranges: str = "moving_average"
    range_lr: float = 1e-3
    chain_activations: str = "off"
    freeze_bn_after: int = 0
    prefer: str = "speed"
    board_profile: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prefer, str) or self.prefer not in PREFERS:
            raise ConfigError(f"`prefer` must be one of {PREFERS}, got {self.prefer!r}", argument="prefer",
                              value=self.prefer)
        m = self.momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 < float(m) <= 1.0:
            raise ConfigError(f"`momentum` must be a float in (0, 1], got {m!r}")
        object.__setattr__(self, "momentum", float(m))
        for name in ("six_bit_3x3", "sync_ranges"):
            _check_bool(name, getattr(self, name))
        if self.quantize_grouped_convs != "auto":
            _check_bool("quantize_grouped_convs", self.quantize_grouped_convs)
        for name, allowed in (("range_init", RANGE_INITS), ("ranges", RANGE_MODES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}")
        n = self.calibration_batches
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"`calibration_batches` must be an int >= 1, got {n!r}")
        lr = self.range_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0.0 < float(lr) < float("inf"):
            raise ConfigError(f"`range_lr` must be a positive float, got {lr!r}")
        object.__setattr__(self, "range_lr", float(lr))
        fba = self.freeze_bn_after
        if isinstance(fba, bool) or not isinstance(fba, int) or fba < 0:
            raise ValueError(f"`freeze_bn_after` must be an int >= 0 (epochs), got {fba!r}")
        skip = self.skip
        if isinstance(skip, str):
            skip = (skip,)
        if not isinstance(skip, Sequence) or not all(isinstance(s, str) and s for s in skip):
            raise ConfigTypeError(f"`skip` must be a list of non-empty module names or patterns, got {self.skip!r}")
        object.__setattr__(self, "skip", tuple(skip))
        object.__setattr__(self, "board_profile", board_profile_argument(self.board_profile))
        if not isinstance(self.chain_activations, str) or self.chain_activations not in CHAIN_ACTIVATIONS:
            raise ConfigError(f"`chain_activations` must be one of {CHAIN_ACTIVATIONS}, got {self.chain_activations!r}",
                              argument="chain_activations", value=self.chain_activations)

    @property
    def calibrated_start(self) -> bool:
        """Whether QAT start sets the thresholds by a calibration pass (not the first training
        step): any calibrated ``range_init``, and ``ranges="fixed"`` (its ``"first_batch"``
        start is then the ``"absmax"`` calibration of one batch, since no step moves it)."""
        return self.range_init != "first_batch" or self.ranges == "fixed"

    @property
    def start_calibration(self) -> tuple[str, int]:
        """``(method, batches)`` of the calibrated start: ``"first_batch"`` is ``"absmax"`` of one batch."""
        if self.range_init == "first_batch":
            return "absmax", 1
        return self.range_init, self.calibration_batches

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skip"] = list(self.skip)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QATConfig:
        """The config :meth:`to_dict` gave (a checkpoint's plan). Its ``board_profile`` is kept as
        recorded but not read again: the plan already holds what it decided, and the file may
        not exist where the checkpoint is loaded."""
        d = dict(d)
        profile = d.pop("board_profile", None)
        config = cls(**{k: (tuple(v) if k == "skip" else v) for k, v in d.items()})
        object.__setattr__(config, "board_profile", profile)
        return config
