"""The few statistical functions the drift detectors need, in plain numpy (the edge box has no scipy).

Written from the textbook formulas and tested against scipy in tests/test_drift_stats.py:
two-sample Kolmogorov-Smirnov statistic with its asymptotic p-value, the population stability
index, the chi-square survival function and a 2 x K chi-square homogeneity test, and the
Bonferroni / Benjamini-Hochberg corrections for testing many features at once.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

_SQRT_2PI = math.sqrt(2.0 * math.pi)
_K = np.arange(1, 21, dtype=np.float64)  # series terms: the 20th is below 1e-300 on both branches


def kolmogorov_sf(x: float) -> float:
    """P(K > x) for the Kolmogorov distribution (scipy.stats.kstwobign.sf).

    Two series of the same function: the alternating one 2 sum (-1)^(k-1) exp(-2 k^2 x^2) converges fast
    for large x; for small x the Jacobi theta form of the CDF, sqrt(2 pi)/x sum exp(-(2k-1)^2 pi^2 / (8 x^2)),
    does. Switching at x = 1 keeps both accurate to ~1e-15.
    """
    if not math.isfinite(x):
        return 0.0 if x > 0 else 1.0
    if x <= 0.0:
        return 1.0
    if x < 1.0:
        terms = np.exp(-((2.0 * _K - 1.0) ** 2) * (math.pi**2) / (8.0 * x * x))
        return float(min(1.0, max(0.0, 1.0 - _SQRT_2PI / x * terms.sum())))
    signs = np.where(_K % 2 == 1, 1.0, -1.0)
    return float(min(1.0, max(0.0, 2.0 * np.sum(signs * np.exp(-2.0 * _K * _K * x * x)))))


def ks_2samp(x: np.ndarray, y: np.ndarray, finite_n_correction: bool = True) -> tuple[float, float]:
    """Two-sided two-sample KS test: (D, asymptotic p-value); both samples must be non-empty and finite.

    D is the largest gap between the two empirical CDFs, equal to scipy's (ties included).
    The p-value is the Kolmogorov tail at sqrt(n_e) * D, n_e = n m / (n + m). With ``finite_n_correction``
    (default) the argument is Stephens' (sqrt(n_e) + 0.12 + 0.11 / sqrt(n_e)) * D, which tracks
    scipy's ``ks_2samp(method='asymp')`` (scipy >= 1.5 uses the exact one-sample law at n = round(n_e))
    within ~0.01 for n_e >= 100; without it the result is the pure limit, scipy's ``kstwobign.sf``.
    """
    return ks_2samp_sorted(np.sort(np.asarray(x, dtype=np.float64).ravel()), y, finite_n_correction)


def ks_2samp_sorted(ref_sorted: np.ndarray, y: np.ndarray, finite_n_correction: bool = True) -> tuple[float, float]:
    """:func:`ks_2samp` with the first sample already sorted (the reference, sorted once at fit time).

    Both CDFs are right-continuous steps, so between two distinct values of ``y`` the gap is largest at
    an end: it is enough to look at each distinct y value and just below it, 2 x len(y) binary searches
    into the reference instead of sorting the union (4x faster for a 200-frame window on 2000 values).
    """
    r = np.asarray(ref_sorted, dtype=np.float64)
    values, counts = np.unique(np.asarray(y, dtype=np.float64).ravel(), return_counts=True)
    n, m = r.size, int(counts.sum())
    if n == 0 or m == 0:
        raise ValueError("ks_2samp needs two non-empty samples")
    cum = np.cumsum(counts)
    cdf_y = cum / m
    cdf_y_below = (cum - counts) / m
    cdf_r = np.searchsorted(r, values, side="right") / n
    cdf_r_below = np.searchsorted(r, values, side="left") / n
    d = float(max(np.max(np.abs(cdf_r - cdf_y)), np.max(np.abs(cdf_r_below - cdf_y_below))))
    en = n * m / (n + m)
    root = math.sqrt(en)
    arg = (root + 0.12 + 0.11 / root) * d if finite_n_correction else root * d
    return d, kolmogorov_sf(arg)


def psi(expected: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray) -> float:
    """Population stability index sum (a - e) ln(a / e) of two share vectors (each sums to 1, all > 0).

    Callers smooth empty bins first (see :func:`smoothed_shares`); a zero share here is a bug upstream.
    """
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape or e.ndim != 1 or e.size == 0:
        raise ValueError(f"psi needs two share vectors of the same length, got {e.shape} and {a.shape}")
    if np.any(e <= 0) or np.any(a <= 0):
        raise ValueError("psi needs strictly positive shares: smooth empty bins before calling it")
    return float(np.sum((a - e) * np.log(a / e)))


def smoothed_shares(counts: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Shares with ``alpha`` pseudo-counts per bin, so an empty bin gives a finite PSI term."""
    c = np.asarray(counts, dtype=np.float64) + alpha
    return c / c.sum()


def chi2_sf(x: float, dof: float) -> float:
    """P(X > x) for a chi-square variable: the regularized upper incomplete gamma Q(dof/2, x/2).

    Power series of the lower function below a + 1, Lentz's continued fraction of the upper one above.
    """
    if dof <= 0:
        raise ValueError(f"chi2_sf needs dof > 0, got {dof}")
    if not math.isfinite(x):
        return 0.0 if x > 0 else 1.0
    if x <= 0.0:
        return 1.0
    a, z = 0.5 * dof, 0.5 * x
    log_front = -z + a * math.log(z) - math.lgamma(a)
    if z < a + 1.0:
        term = total = 1.0 / a
        denom = a
        for _ in range(10_000):
            denom += 1.0
            term *= z / denom
            total += term
            if abs(term) < abs(total) * 1e-16:
                break
        return float(min(1.0, max(0.0, 1.0 - total * math.exp(log_front))))
    tiny = 1e-300
    b = z + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return float(min(1.0, max(0.0, math.exp(log_front) * h)))


def chi2_homogeneity(ref_counts: np.ndarray, win_counts: np.ndarray, design_effect: float = 1.0) -> tuple[float, float, int]:
    """Pearson chi-square test that two count vectors come from one categorical law: (stat, p, dof).

    Categories empty in both are dropped. ``design_effect`` (>= 1) divides the statistic, a first-order
    correction for counts that are clustered (several detections of one frame are not independent).
    Returns (0.0, 1.0, 0) when fewer than two categories or an empty side leave nothing to test.
    """
    r = np.asarray(ref_counts, dtype=np.float64)
    w = np.asarray(win_counts, dtype=np.float64)
    keep = (r + w) > 0
    r, w = r[keep], w[keep]
    n_r, n_w = r.sum(), w.sum()
    if r.size < 2 or n_r <= 0 or n_w <= 0:
        return 0.0, 1.0, 0
    total = r + w
    exp_r = total * (n_r / (n_r + n_w))
    exp_w = total * (n_w / (n_r + n_w))
    stat = float(np.sum((r - exp_r) ** 2 / exp_r) + np.sum((w - exp_w) ** 2 / exp_w))
    stat /= max(1.0, float(design_effect))
    dof = int(r.size - 1)
    return stat, chi2_sf(stat, dof), dof


def adjust_p_values(p_values: Sequence[float], method: str) -> list[float]:
    """Multiple-testing correction across features: 'bonferroni', 'fdr' (Benjamini-Hochberg) or 'none'."""
    p = np.asarray(p_values, dtype=np.float64)
    k = p.size
    if k == 0 or method == "none":
        return [float(v) for v in p]
    if method == "bonferroni":
        return [float(v) for v in np.minimum(1.0, p * k)]
    if method == "fdr":
        order = np.argsort(p)
        ranked = p[order] * k / np.arange(1, k + 1)
        ranked = np.minimum.accumulate(ranked[::-1])[::-1]  # step-up: monotone from the largest down
        out = np.empty(k)
        out[order] = np.minimum(1.0, ranked)
        return [float(v) for v in out]
    raise ValueError(f"unknown correction {method!r}: use 'bonferroni', 'fdr' or 'none'")
