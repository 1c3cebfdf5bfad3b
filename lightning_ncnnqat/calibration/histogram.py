"""Statistics of each quantized layer's input over the calibration data: absmax, then histogram.

ncnn2table (``tools/quantize/ncnn2table.cpp``) walks its inputs twice, one sample at a time:

1. ``absmax``: the largest ``fabs(x)`` of the layer's input blob over all samples;
2. a 2048-bin histogram of ``fabs(x)``: bin ``min((int)(fabs(x) / absmax * 2048), 2047)``
   computed in float, exact zeros skipped.

ACIQ also needs ``total``: the element count of ONE sample's blob (``c * h * w``; the tool
keeps the last sample's, all are the same size). A batch gives the same counts as its samples
one by one, so batches are fed whole. Inputs come from a feed: forward pre-hooks on the folded
float model (nothing is modified), or ncnn's own float runtime (``ncnn_activations``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from lightning_ncnnqat.qat.batches import to_model

NUM_BINS = 2048


@dataclass
class InputStats:
    """One layer's input statistics (float32 ``absmax`` in the input's unit)."""

    absmax: float = 0.0
    elements_per_sample: int = 0
    samples: int = 0
    histogram: np.ndarray | None = field(default=None, repr=False)  # int64 [2048]


def finite_absmax_of(name: str, x: Tensor) -> float:
    """max |x| as a float32 value; raise naming the layer if ``x`` holds NaN or inf."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"layer '{name}': its input holds NaN or inf on a calibration batch; ncnn2table's "
            "histogram is undefined there (check the model and the data)"
        )
    return float(x.detach().abs().amax().float().item()) if x.numel() else 0.0


def histogram_of(x: Tensor, absmax: float) -> Tensor:
    """ncnn2table's 2048-bin histogram of ``|x|`` (int64 ``[2048]``, zeros skipped).

    ``fabs(x) / absmax`` is one float32 division (computed in float64 and rounded once, which
    is the same correctly rounded value), times 2048 (exact), truncated, capped at 2047.
    """
    v = x.detach().reshape(-1).float().abs()
    v = v[v != 0]
    if v.numel() == 0 or absmax <= 0:
        return torch.zeros(NUM_BINS, dtype=torch.int64)
    ratio = (v.double() / float(np.float32(absmax))).float()
    idx = torch.clamp((ratio * NUM_BINS).to(torch.int64), max=NUM_BINS - 1)
    return torch.bincount(idx.cpu(), minlength=NUM_BINS)


@contextmanager
def tap_inputs(model: nn.Module, names: Iterable[str], fn: Callable[[str, Tensor], None]) -> Iterator[None]:
    """Call ``fn(layer_name, input_tensor)`` for every call of the named modules during the block."""
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        if name not in modules:
            raise ValueError(f"layer '{name}' is not a module of {type(model).__name__}")

        def hook(module: nn.Module, args: tuple, _name: str = name) -> None:
            if not args or not isinstance(args[0], Tensor):
                raise TypeError(f"layer '{_name}' was called without a tensor as its first argument")
            fn(_name, args[0])

        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


#: A layer-input feed: ``feed(fn, max_samples=None)`` runs the calibration batches (the first
#: ``max_samples`` samples if given), calls ``fn(layer_name, input [N, ...])`` for every quantized
#: layer's input of every batch, and returns the number of samples seen. :func:`torch_feed` reads
#: them from the PyTorch model; ``ncnn_activations.ncnn_feed`` from ncnn's float runtime.
Feed = Callable[..., int]


def torch_feed(model: nn.Module, names: Iterable[str], batches: Callable[[], Iterable[Tensor]], device: torch.device) -> Feed:
    """The inputs of the modules ``names`` of ``model`` (eval, no grad), read with pre-hooks."""
    names = list(names)
    p = next(iter(model.parameters()), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32

    def feed(fn: Callable[[str, Tensor], None], max_samples: int | None = None) -> int:
        n = 0
        with tap_inputs(model, names, fn), torch.no_grad():
            for x in batches():
                if max_samples is not None and n >= max_samples:
                    break
                if max_samples is not None:
                    x = x[: max_samples - n]
                model(to_model(x, device, dtype))  # token ids stay integer
                n += int(x.shape[0])
        return n

    return feed


def collect_input_stats(feed: Feed, names: list[str], histogram: bool) -> dict[str, InputStats]:
    """Absmax pass, then (if ``histogram``) the histogram pass, each a full run of ``feed``.

    Args:
        feed: the layers' inputs over the calibration data (:data:`Feed`), run once per pass.
        names: the layers whose inputs are measured.
        histogram: run the second pass (KL, EQ); ACIQ needs only the first.
    Raises:
        ValueError: a layer input holds NaN/inf, or a layer was never called.
    """
    stats = {n: InputStats() for n in names}

    def absmax_hook(name: str, x: Tensor) -> None:
        s = stats[name]
        s.absmax = max(s.absmax, finite_absmax_of(name, x))
        s.elements_per_sample = int(x[0].numel()) if x.dim() else 1
        s.samples += int(x.shape[0]) if x.dim() else 1

    total = feed(absmax_hook)
    if total == 0:
        raise ValueError("`data` gave no calibration batch")
    missing = [n for n, s in stats.items() if s.samples == 0]
    if missing:
        raise ValueError(f"layers {missing} were never called on the calibration data")
    if not histogram:
        return stats
    hists = {n: torch.zeros(NUM_BINS, dtype=torch.int64) for n in names}

    def hist_hook(name: str, x: Tensor) -> None:
        hists[name] += histogram_of(x, stats[name].absmax)

    again = feed(hist_hook)
    if again != total:
        raise ValueError(
            f"`data` gave {total} samples on the first pass and {again} on the second: iterated again it must give "
            "the same batches (a generator is spent after one pass: pass a list or a DataLoader, or keep "
            "cache_batches=True)"
        )
    for n in names:
        stats[n].histogram = hists[n].numpy()
    return stats
