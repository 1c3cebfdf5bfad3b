"""ncnn2table's KL threshold search, reproduced in float32 operation by operation.

Source: Tencent/ncnn ``tools/quantize/ncnn2table.cpp``, ``QuantNet::quantize_KL`` and
``compute_kl_divergence`` (read for the facts; this is our own code). The rules:

* the histogram has 2048 bins over ``[0, absmax]`` of ``|x|``; exact zeros are not counted;
  ``histogram_normed[j] = (float)(count[j] / (double)sum)``;
* every candidate bin count ``T`` in ``[128, 2048)`` is tried: the "clip" distribution is
  ``eps + normed[j]`` for ``j < T`` with the tail ``normed[T:]`` added to bin ``T-1`` one by one;
  it is resampled to 128 bins (a bin of width ``T/128`` takes fractional parts of the bins it
  straddles, and divides by its width) and expanded back to ``T`` bins (``eps`` plus the
  quantized value, fractions at the edges), ``eps = 0.0001f``;
* ``KL = sum a * logf(a / b)`` in float, in index order; the first ``T`` with the smallest KL
  wins (``<`` with ``FLT_MAX`` as start, so NaN never wins and an empty histogram keeps 128);
* ``threshold = (T + 0.5f) * absmax / 2048``, ``scale = 127 / threshold``, all in float.

Every float32 operation is done in the same order as the C++ (numpy float32 arrays, sequential
``cumsum`` for C's running sums), for the candidates a cheap float64 pass cannot rule out (see
:func:`kl_threshold_bin`). One function differs: ``logf``. glibc's is not correctly
rounded (we measured 0.13% of arguments off by one ulp against the correctly rounded value we
compute), so the search uses the correctly rounded log and then re-evaluates every candidate
within 1e-5 (relative) of the minimum with the C library's own ``logf`` when it can be loaded,
which decides near-ties exactly as ncnn2table on the same C library does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

import numpy as np

NUM_BINS = 2048
TARGET_BINS = 128
KL_EPS = np.float32(0.0001)
_F = np.float32
_NEAR_TIE = 1e-5


@functools.lru_cache(maxsize=1)
def _c_logf() -> Callable[[float], float] | None:
    """The C library's ``logf`` (what ncnn2table calls), or None where it cannot be loaded."""
    for name in (ctypes.util.find_library("m"), "libm.so.6"):
        if not name:
            continue
        try:
            fn = ctypes.CDLL(name).logf
        except (OSError, AttributeError):
            continue
        fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]
        return fn
    return None


def _log_rounded(v: np.ndarray) -> np.ndarray:
    """Correctly rounded float32 log (float64 log rounded once)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(v.astype(np.float64)).astype(np.float32)


def _log_c(v: np.ndarray) -> np.ndarray:
    fn = _c_logf()
    if fn is None:
        return _log_rounded(v)
    return np.array([fn(float(x)) for x in v], dtype=np.float32)


def normalize_histogram(counts: np.ndarray) -> np.ndarray:
    """``(float)(count / (double)sum)`` per bin: float32 ``[2048]`` (NaN if every count is 0)."""
    c = np.asarray(counts, dtype=np.uint64)
    if c.shape != (NUM_BINS,):
        raise ValueError(f"`counts` must have shape ({NUM_BINS},), got {c.shape}")
    total = float(c.sum(dtype=np.uint64))
    with np.errstate(divide="ignore", invalid="ignore"):
        return (c.astype(np.float64) / total).astype(np.float32)


def _seq_sum(terms: np.ndarray, axis: int = -1) -> np.ndarray:
    """C's ``s += t`` loop in float32 (sequential, unlike numpy's pairwise ``sum``)."""
    return np.cumsum(terms, axis=axis, dtype=np.float32).take(-1, axis=axis)


def _bin_edges(thresholds: np.ndarray) -> tuple[np.ndarray, ...]:
    """For the 128 target bins of each candidate ``T``: left_upper, left_scale, right_lower,
    right_scale (the C code's names), each ``[len(T), 128]``. ``j * (T / 128)`` is exact in
    float32 (at most 18 significant bits), so these equal the C values."""
    npb = thresholds.astype(np.float32)[:, None] / _F(TARGET_BINS)
    j = np.arange(TARGET_BINS, dtype=np.float32)[None, :]
    start = j * npb
    end = (j + _F(1)) * npb
    left_upper = np.ceil(start).astype(np.int64)
    left_scale = left_upper.astype(np.float32) - start
    right_lower = np.floor(end).astype(np.int64)
    right_scale = end - right_lower.astype(np.float32)
    return left_upper, left_scale, right_lower, right_scale


def _kl_terms(h: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clip (``a``) and expanded (``b``) distributions of each candidate ``T``, float32
    ``[len(T), 2048]``, and the mask of the ``T`` valid entries of each row."""
    n = len(thresholds)
    cols = np.arange(NUM_BINS)[None, :]
    t = thresholds[:, None]
    valid = cols < t
    rows = np.arange(n)
    # clip: eps + h[j]; the tail h[T:] added to bin T-1 one by one (zeros before it change nothing)
    a = np.where(valid, KL_EPS + h[None, :], _F(0))
    tail = np.where(cols >= t - 1, np.where(cols == t - 1, a, h[None, :]), _F(0))
    a[rows, thresholds - 1] = _seq_sum(tail, axis=1)
    # resample to 128 bins; terms in the C order: left part, right part, whole bins
    lu, ls, rl, rs = _bin_edges(thresholds)
    h_ext = np.concatenate((h, np.zeros(1, dtype=np.float32)))  # right_lower may be T == 2048 (scale 0)
    width = max(int((rl - lu).max()), 0)
    k = lu[:, :, None] + np.arange(width)[None, None, :]
    whole_terms = np.where(k < rl[:, :, None], h_ext[np.minimum(k, NUM_BINS)], _F(0))
    left = np.where(ls > 0, ls * h_ext[np.maximum(lu - 1, 0)], _F(0))
    right = np.where(rs > 0, rs * h_ext[rl], _F(0))
    terms = np.concatenate((left[:, :, None], right[:, :, None], whole_terms), axis=2)
    q = _seq_sum(terms, axis=2) / ((rl - lu).astype(np.float32) + ls + rs)
    # expand back. Index m of row T lies in target bin j = 128 m // T (integer arithmetic, exact);
    # it is whole when 128 (m + 1) <= (j + 1) T: it gets eps + q[j]. An edge index gets eps, then
    # the right part of bin j, then the left part of bin j + 1 (C's loop order).
    owner = np.minimum((TARGET_BINS * cols) // t, TARGET_BINS - 1)
    whole = valid & (TARGET_BINS * (cols + 1) <= (owner + 1) * t)
    b = np.where(whole, KL_EPS + np.take_along_axis(q, owner, axis=1), np.where(valid, KL_EPS, _F(0)))
    r_idx = np.nonzero(rs > 0)
    b[r_idx[0], rl[r_idx]] += rs[r_idx] * q[r_idx]
    l_idx = np.nonzero(ls > 0)
    b[l_idx[0], lu[l_idx] - 1] += ls[l_idx] * q[l_idx]
    return a, b, valid


def _kl_all(h: np.ndarray, thresholds: np.ndarray, exact_log: bool = False) -> np.ndarray:
    """``sum a * logf(a / b)`` in float32, index order, for each candidate: float32 ``[len(T)]``."""
    a, b, valid = _kl_terms(h, thresholds)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(valid, a / np.where(valid, b, _F(1)), _F(1))
    logs = (_log_c(ratio.ravel()) if exact_log else _log_rounded(ratio)).reshape(ratio.shape)
    terms = np.where(valid, a * logs, _F(0))
    return _seq_sum(terms, axis=1)


def kl_divergence(h: np.ndarray, threshold: int, exact_log: bool = False) -> np.float32:
    """ncnn2table's (unnormalised) KL divergence of candidate ``threshold`` (float32)."""
    return _kl_all(h, np.array([threshold]), exact_log)[0]


def _kl_float64(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every candidate's KL in float64 from per-bin prefix sums (``[1920, 128]`` arrays), and an
    upper bound of ``sum |a log(a/b)|``, which bounds how far the tool's float32 value can be.

    Inside a target bin ``b`` is constant, so ``sum a log(a/b) = sum a log a - log b * sum a``
    over its whole indices; the edge indices and the last index (which carries the tail) are
    added one by one.
    """
    ts = np.arange(TARGET_BINS, NUM_BINS)
    eps = float(KL_EPS)
    h64 = h.astype(np.float64)
    prefix_h = np.concatenate(([0.0], np.cumsum(h64)))
    a = eps + h64
    ala = a * np.log(a)
    p_a = np.concatenate(([0.0], np.cumsum(a)))
    p_ala = np.concatenate(([0.0], np.cumsum(ala)))
    p_abs = np.concatenate(([0.0], np.cumsum(np.abs(ala))))
    lu, ls, rl, rs = _bin_edges(ts)
    ls64, rs64 = ls.astype(np.float64), rs.astype(np.float64)
    h_ext = np.concatenate((h64, [0.0]))
    q = (
        np.where(ls > 0, ls64 * h_ext[np.maximum(lu - 1, 0)], 0.0)
        + np.where(rs > 0, rs64 * h_ext[rl], 0.0)
        + (prefix_h[np.minimum(rl, NUM_BINS)] - prefix_h[lu]) * (rl > lu)
    ) / ((rl - lu) + ls64 + rs64)
    b_whole = eps + q
    log_b = np.log(b_whole)
    # whole indices [lu, rl) of each bin; the last bin stops before T - 1
    hi = rl.copy()
    hi[:, -1] = ts - 1
    lo = np.minimum(lu, hi)
    s_a = p_a[hi] - p_a[lo]
    kl = (p_ala[hi] - p_ala[lo]) - log_b * s_a
    size = (p_abs[hi] - p_abs[lo]) + np.abs(log_b) * s_a
    # edge index rl_j (rs_j > 0): eps + right part of bin j + left part of bin j + 1
    edge = rs > 0
    nxt = np.concatenate((q[:, 1:], np.zeros((len(ts), 1))), axis=1)
    ls_next = np.concatenate((ls64[:, 1:], np.zeros((len(ts), 1))), axis=1)
    e_idx = np.minimum(rl, NUM_BINS - 1)
    a_e = a[e_idx]
    b_e = eps + rs64 * q + ls_next * nxt
    t_e = np.where(edge, a_e * np.log(a_e / b_e), 0.0)
    # the last index: eps + h[T-1] + the tail h[T:]
    a_last = eps + (prefix_h[NUM_BINS] - prefix_h[ts - 1])
    t_last = a_last * np.log(a_last / b_whole[:, -1])
    total = kl.sum(axis=1) + t_e.sum(axis=1) + t_last
    bound = size.sum(axis=1) + np.abs(t_e).sum(axis=1) + np.abs(t_last)
    return total, bound


def kl_threshold_bin(counts: np.ndarray) -> int:
    """The bin count ``T`` in ``[128, 2048)`` ncnn2table picks for a 2048-bin histogram.

    A float64 pass over all 1920 candidates keeps those whose float32 value could be the
    smallest: within ``5e-5 * B`` of the float64 minimum, ``B`` an upper bound of
    ``sum |a log(a/b)|`` (the float32 running sums were measured within ``4e-6 * B`` of the
    float64 value on heavy-tailed, Gaussian and sparse histograms; the worst case a float32 sum of
    2048 terms can reach, ``2048 * 2^-24 = 1.2e-4``, needs every rounding to go the same way).
    Only those are evaluated in float32 exactly as the tool does.

    Args:
        counts: int ``[2048]`` histogram of ``|x|`` over ``[0, absmax]`` (zeros not counted).
    Returns:
        ``T``; 128 when the histogram is empty (ncnn2table's NaN comparisons keep the start).
    """
    h = normalize_histogram(counts)
    if not np.isfinite(h).all():
        return TARGET_BINS
    approx, size = _kl_float64(h)
    slack = 5e-5 * size + 1e-6
    finite = np.isfinite(approx)
    if not finite.any():
        return TARGET_BINS
    bound = float(np.min(np.where(finite, approx + slack, np.inf)))
    cand = np.flatnonzero(finite & (approx - slack <= bound)) + TARGET_BINS
    kls = np.concatenate([_kl_all(h, cand[i : i + 240]) for i in range(0, len(cand), 240)])
    ok = np.isfinite(kls)
    if not ok.any():
        return TARGET_BINS
    best = float(kls[ok].min())
    tol = _NEAR_TIE * abs(best) + 1e-30
    near = [int(cand[i]) for i in np.flatnonzero(ok) if float(kls[i]) <= best + tol]
    if len(near) > 1 and _c_logf() is not None:
        # decide near-ties with the C library's logf, first smallest wins (C's strict `<`)
        exact = [float(kl_divergence(h, t, exact_log=True)) for t in near]
        return near[exact.index(min(exact))]
    return int(cand[int(np.argmin(np.where(ok, kls, np.inf)))])


def kl_threshold(counts: np.ndarray, absmax: float) -> tuple[int, float]:
    """``(T, threshold)`` with ``threshold = (T + 0.5f) * absmax / 2048`` in float32 (same unit as
    ``absmax``)."""
    t = kl_threshold_bin(counts)
    thr = (_F(t) + _F(0.5)) * _F(absmax) / _F(NUM_BINS)
    return t, float(thr)


def scale_from_threshold(threshold: float, qmax: int = 127) -> float:
    """``qmax / threshold`` in float32 (inf for a zero threshold, as the tool computes it)."""
    with np.errstate(divide="ignore"):
        return float(_F(qmax) / _F(threshold))
