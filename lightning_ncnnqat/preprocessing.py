"""Input normalisation of a model, in PyTorch's terms and in ncnn's.

Training pipelines usually feed a model ``Normalize(mean, std)`` applied to pixels already
scaled to ``[0, 1]`` (torchvision's ``ToTensor``): ``x = (p * input_range / 255 - mean) / std``
for 8-bit pixels ``p`` in ``0..255``. On the device, ncnn builds the input with
``ncnn::Mat::from_pixels`` (``0..255`` floats, channel planes in the order the pixel type names)
and normalises it in place with ``Mat::substract_mean_normalize(mean_vals, norm_vals)``, which
computes ``out = (in - mean_vals[c]) * norm_vals[c]`` per channel (ncnn ``src/mat.cpp``). So::

    mean_vals[c] = mean[c] * 255 / input_range
    norm_vals[c] = input_range / (255 * std[c])

:class:`Preprocessing` holds the PyTorch side and gives the ncnn side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_ncnnqat.errors import ConfigError

#: Channel orders the model may expect, and the ncnn pixel type that produces each from pixels
#: already in that order (``ncnn::Mat::PIXEL_RGB`` ...).
CHANNEL_ORDERS = {"RGB": ("PIXEL_RGB", 3), "BGR": ("PIXEL_BGR", 3), "GRAY": ("PIXEL_GRAY", 1)}


def _bad(message: str) -> ConfigError:
    """A preprocessing setting that cannot work (a ValueError, naming the field and the value)."""
    return ConfigError(message, argument="preprocessing")


@dataclass(frozen=True)
class Preprocessing:
    """How the model's input is made from 8-bit pixels.

    Args:
        mean: per-channel mean of ``Normalize``, in the units of ``input_range`` (torchvision:
            pixels in ``[0, 1]``), one value per channel.
        std: per-channel standard deviation of ``Normalize``, > 0, same length as ``mean``.
        input_range: what a pixel value of 255 is before ``Normalize``: 1.0 when the pipeline
            divides by 255 first (``ToTensor``), 255.0 when it normalises raw pixel values.
        channel_order: order of the model's input channels: ``"RGB"`` (torchvision, PIL),
            ``"BGR"`` (OpenCV-trained models) or ``"GRAY"`` (one channel).

    Raises:
        ValueError: naming the field and the value (wrong length, non-finite, std <= 0, unknown
            channel order, input_range <= 0).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_range: float = 1.0
    channel_order: str = "RGB"

    def __post_init__(self) -> None:
        mean = _floats("mean", self.mean)
        std = _floats("std", self.std)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        if self.channel_order not in CHANNEL_ORDERS:
            raise _bad(
                f"Preprocessing: `channel_order` must be one of {sorted(CHANNEL_ORDERS)}, got {self.channel_order!r}"
            )
        channels = CHANNEL_ORDERS[self.channel_order][1]
        for name, vals in (("mean", mean), ("std", std)):
            if len(vals) != channels:
                raise _bad(
                    f"Preprocessing: `{name}` needs {channels} value(s) for channel_order {self.channel_order!r}, "
                    f"got {len(vals)}: {list(vals)}"
                    + ("; a 1-channel input takes channel_order='GRAY'" if len(vals) == 1 else "")
                )
        for c, s in enumerate(std):
            if not s > 0:
                raise _bad(f"Preprocessing: `std[{c}]` must be > 0, got {s!r}")
        try:
            rng = float(self.input_range)
        except (TypeError, ValueError):
            raise _bad(f"Preprocessing: `input_range` must be a number, got {self.input_range!r}") from None
        if not (math.isfinite(rng) and rng > 0):
            raise _bad(f"Preprocessing: `input_range` must be a finite number > 0, got {self.input_range!r}")
        object.__setattr__(self, "input_range", rng)

    # ---- ncnn's terms

    @property
    def channels(self) -> int:
        return len(self.mean)

    @property
    def mean_vals(self) -> tuple[float, ...]:
        """``mean_vals`` for ``Mat::substract_mean_normalize`` on 0..255 pixels (per channel)."""
        return tuple(m * 255.0 / self.input_range for m in self.mean)

    @property
    def norm_vals(self) -> tuple[float, ...]:
        """``norm_vals`` for ``Mat::substract_mean_normalize`` on 0..255 pixels (per channel)."""
        return tuple(self.input_range / (255.0 * s) for s in self.std)

    @property
    def pixel_type(self) -> str:
        """The ``ncnn::Mat`` pixel type for pixels already in the model's channel order."""
        return CHANNEL_ORDERS[self.channel_order][0]

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """The model input PyTorch-style from ``HxWxC`` (or ``HxW`` gray) 8-bit pixels already in
        ``channel_order``: float32 ``CxHxW``. The reference the ncnn formula is checked against."""
        p = np.asarray(pixels)
        if p.ndim == 2:
            p = p[:, :, None]
        if p.ndim != 3 or p.shape[2] != self.channels:
            raise _bad(
                f"Preprocessing.normalize: pixels must be HxWx{self.channels}, got shape {tuple(np.shape(pixels))}"
            )
        x = p.astype(np.float32).transpose(2, 0, 1) * np.float32(self.input_range / 255.0)
        mean = np.asarray(self.mean, np.float32)[:, None, None]
        std = np.asarray(self.std, np.float32)[:, None, None]
        return (x - mean) / std

    # ---- serialisation

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (with the ncnn values, which :meth:`from_dict` recomputes and ignores)."""
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "input_range": self.input_range,
            "channel_order": self.channel_order,
            "ncnn": {"mean_vals": list(self.mean_vals), "norm_vals": list(self.norm_vals), "pixel_type": self.pixel_type},
        }

    @classmethod
    def from_dict(cls, d: Any) -> Preprocessing:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error naming them."""
        if isinstance(d, Preprocessing):
            return d
        if not isinstance(d, dict):
            raise _bad(f"Preprocessing.from_dict: expected a dict, got {type(d).__name__}")
        known = {"mean", "std", "input_range", "channel_order", "ncnn"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise _bad(f"Preprocessing.from_dict: unknown key(s) {unknown} (known: {sorted(known)})")
        missing = [k for k in ("mean", "std") if k not in d]
        if missing:
            raise _bad(f"Preprocessing.from_dict: missing key(s) {missing}")
        return cls(
            tuple(d["mean"]), tuple(d["std"]), d.get("input_range", 1.0), d.get("channel_order", "RGB")
        )


def _floats(name: str, vals: Any) -> tuple[float, ...]:
    if isinstance(vals, (int, float)):
        vals = (vals,)
    try:
        out = tuple(float(v) for v in vals)
    except (TypeError, ValueError):
        raise _bad(f"Preprocessing: `{name}` must be a sequence of numbers, got {vals!r}") from None
    if not out:
        raise _bad(f"Preprocessing: `{name}` is empty")
    for c, v in enumerate(out):
        if not math.isfinite(v):
            raise _bad(f"Preprocessing: `{name}[{c}]` must be finite, got {v!r}")
    return out


def find_preprocessing(*sources: Any) -> Preprocessing | None:
    """The first preprocessing found among ``sources``, in order.

    Each source may be a :class:`Preprocessing`, its dict form, None, or an object (a
    LightningDataModule, a LightningModule) with a ``preprocessing`` attribute holding one of
    those. Lets the callback and the export command take it from wherever the user put it.
    """
    for src in sources:
        if src is None:
            continue
        if isinstance(src, (Preprocessing, dict)):
            return Preprocessing.from_dict(src)
        val = getattr(src, "preprocessing", None)
        if val is not None and not callable(val):
            return Preprocessing.from_dict(val)
    return None
