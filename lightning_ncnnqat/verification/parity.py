"""How closely one set of outputs follows another: :class:`Agreement` and :func:`agreement`.

Whole-model parity compares, per output blob and on the held batch, the PyTorch QAT model in
eval mode with ncnn int8, and the folded float model with ncnn float32; per-layer parity lives
in :mod:`lightning_ncnnqat.verification.layer_checks`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lightning_ncnnqat.policy import NEAR_TIE_SIGMAS


@dataclass
class Agreement:
    """How closely ``got`` follows ``ref`` over a batch (``[N, K]`` each)."""

    n: int
    top1_agreement: float | None  # fraction of samples with the same argmax (None: not a [N, C>1] output)
    cosine: float  # over the whole batch, flattened
    min_sample_cosine: float
    max_abs_err: float
    max_rel_err: float  # max |got - ref| / max |ref|
    mean_abs_err: float
    top1_flips: int = 0  # samples whose argmax differs
    near_tie_flips: int = 0  # of those, flips whose reference margin is within the measured noise
    noise_rms: float = 0.0  # RMS of got - ref over the batch: the measured int8 noise per value
    top1_agreement_beyond_noise: float | None = None  # near-tie flips counted as agreements


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays, flattened, in float64 (1.0 for two zero arrays)."""
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def agreement(ref: np.ndarray, got: np.ndarray, classes: bool = True) -> Agreement:
    """Agreement of ``got`` with ``ref``, both ``[N, ...]`` (flattened per sample).

    A top-1 flip (``argmax`` differs) is a *near-tie* when the reference's own margin between
    its top class and the class ``got`` picked, ``ref[a] - ref[b]``, is within
    ``NEAR_TIE_SIGMAS * sqrt(2) * noise_rms``: the int8 noise measured over the whole batch can
    flip it, so it says nothing about a defect (an undertrained model has many such ties). A
    real defect moves the output far beyond that noise and shows in the cosine and in flips
    that are not near-ties.

    ``classes=False`` (an output that is not one score per class, e.g. a feature map or boxes):
    no top-1 figures.

    Raises ValueError if the per-sample sizes differ.
    """
    ref = np.asarray(ref, dtype=np.float64).reshape(len(ref), -1)
    got = np.asarray(got, dtype=np.float64).reshape(len(got), -1)
    if ref.shape != got.shape:
        raise ValueError(f"output shapes differ: PyTorch {ref.shape}, ncnn {got.shape}")
    err = np.abs(ref - got)
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    finite = bool(np.isfinite(got).all())
    top1 = float((ref.argmax(1) == got.argmax(1)).mean()) if classes and ref.shape[1] > 1 and finite else None
    flips = near = 0
    noise = float(np.sqrt(np.mean((ref - got) ** 2))) if finite and ref.size else 0.0
    if top1 is not None:
        a, b = ref.argmax(1), got.argmax(1)
        rows = np.nonzero(a != b)[0]
        margins = ref[rows, a[rows]] - ref[rows, b[rows]]
        flips = int(len(rows))
        near = int((margins <= NEAR_TIE_SIGMAS * np.sqrt(2.0) * noise).sum())
    return Agreement(
        n=len(ref),
        top1_agreement=top1 if finite or not classes or ref.shape[1] <= 1 else 0.0,
        cosine=cosine(ref, got) if finite else 0.0,
        min_sample_cosine=min(cosine(r, g) for r, g in zip(ref, got)) if finite and len(ref) else 0.0,
        max_abs_err=float(err.max()) if finite and err.size else (0.0 if finite else float("inf")),
        max_rel_err=(float(err.max()) / scale if scale > 0 else float(err.max(initial=0.0))) if finite else float("inf"),
        mean_abs_err=float(err.mean()) if finite and err.size else (0.0 if finite else float("inf")),
        top1_flips=flips,
        near_tie_flips=near,
        noise_rms=noise,
        top1_agreement_beyond_noise=None if top1 is None else 1.0 - (flips - near) / max(1, len(ref)),
    )
