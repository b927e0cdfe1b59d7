"""Drift detectors as small objects: ``fit(reference)``, ``score(batch)`` -> numbers, ``predict(batch)`` -> verdict.

The shape follows alibi-detect's ``cd/ks.py``: a detector holds its reference, ``score`` returns the
distance and p-value, ``predict`` wraps them in the wire form
``{"meta": {...}, "data": {"is_drift", "distance", "p_val", "threshold"}}``. Values that cannot be
computed (an empty window) come back as NaN distances and p = 1, never as exceptions, so the monitor
keeps running on a camera that delivers nothing useful.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from edge_runtime.drift.stats import chi2_homogeneity, ks_2samp_sorted, psi, smoothed_shares
from edge_runtime.errors import DataError
from edge_runtime.settings import DriftSettings  # detector defaults are the drift section's, not copies


class Score(NamedTuple):
    """What ``score`` returns: a distance, a p-value when the detector has a test, and the test statistic."""

    distance: float
    p_val: float | None = None
    statistic: float | None = None


def _finite(x: Any) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).ravel()
    return arr[np.isfinite(arr)]


def _verdict(name: str, score: Score, is_drift: bool, threshold: float, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "meta": {"name": name, "detector_type": "drift", "online": False, **extra},
        "data": {
            "is_drift": int(is_drift),
            "distance": score.distance,
            "p_val": score.p_val,
            "threshold": threshold,
        },
    }


class _Fitted:
    """Refuse to score before ``fit`` with a message that says so (not an AttributeError)."""

    _fitted = False

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise DataError(f"{type(self).__name__}: call fit(reference) before score() or predict().")


class PSIDetector(_Fitted):
    """Population stability index over quantile bins of the reference.

    Bin edges are reference quantiles, made unique, so a discrete feature (detections per frame) gets one
    bin per observed value instead of empty duplicates. ``alpha`` pseudo-counts per bin keep an empty bin
    finite on both sides. Drift when PSI >= ``threshold``.
    """

    def __init__(self, n_bins: int = DriftSettings.psi_max_bins, threshold: float = DriftSettings.psi_alarm,
                 alpha: float = 0.5, min_samples: int = 10):
        if n_bins < 2:
            raise DataError(f"PSIDetector: n_bins must be at least 2, got {n_bins}.")
        self.n_bins = n_bins
        self.threshold = threshold
        self.alpha = alpha
        self.min_samples = min_samples
        self.edges = np.empty(0)
        self.ref_shares = np.empty(0)

    def fit(self, reference: np.ndarray) -> "PSIDetector":
        ref = _finite(reference)
        if ref.size < self.min_samples:
            raise DataError(
                f"PSIDetector: the reference has {ref.size} finite values, at least {self.min_samples} are needed; "
                "build the reference from more frames."
            )
        # inverted-CDF quantiles are observed values, so a discrete feature gets no empty in-between bins
        srt = np.sort(ref)
        probs = np.linspace(0.0, 1.0, self.n_bins + 1)[1:-1]
        self.edges = np.unique(srt[np.clip(np.ceil(probs * srt.size).astype(np.int64) - 1, 0, srt.size - 1)])
        self.ref_shares = smoothed_shares(self._counts(ref), self.alpha)
        self._fitted = True
        return self

    def _counts(self, x: np.ndarray) -> np.ndarray:
        # bin i holds edges[i-1] < x <= edges[i]; the last bin everything above the last edge
        idx = np.searchsorted(self.edges, x, side="left")
        return np.bincount(idx, minlength=self.edges.size + 1).astype(np.float64)

    def window_shares(self, batch: np.ndarray) -> np.ndarray:
        self._check_fitted()
        return smoothed_shares(self._counts(_finite(batch)), self.alpha)

    def score(self, batch: np.ndarray) -> Score:
        self._check_fitted()
        x = _finite(batch)
        if x.size == 0:
            return Score(math.nan)
        return Score(psi(self.ref_shares, smoothed_shares(self._counts(x), self.alpha)))

    def predict(self, batch: np.ndarray) -> dict[str, Any]:
        s = self.score(batch)
        return _verdict("PSIDetector", s, s.distance >= self.threshold, self.threshold, {"bins": int(self.edges.size + 1)})


class KSDetector(_Fitted):
    """Two-sample Kolmogorov-Smirnov test against the reference sample; drift when p < ``p_val``."""

    def __init__(self, p_val: float = DriftSettings.ks_p_warn, finite_n_correction: bool = True):
        self.p_val = p_val
        self.finite_n_correction = finite_n_correction
        self.reference = np.empty(0)

    def fit(self, reference: np.ndarray) -> "KSDetector":
        ref = _finite(reference)
        if ref.size == 0:
            raise DataError("KSDetector: the reference has no finite values; build it from frames that have this feature.")
        self.reference = np.sort(ref)
        self._fitted = True
        return self

    def score(self, batch: np.ndarray) -> Score:
        self._check_fitted()
        x = _finite(batch)
        if x.size == 0:
            return Score(math.nan, 1.0)
        d, p = ks_2samp_sorted(self.reference, x, self.finite_n_correction)
        return Score(d, p, d)

    def predict(self, batch: np.ndarray) -> dict[str, Any]:
        s = self.score(batch)
        return _verdict("KSDetector", s, s.p_val is not None and s.p_val < self.p_val, self.p_val, {})


class CategoricalDetector(_Fitted):
    """Category shares (class mix, NG rate) against the reference: PSI over shares + chi-square test.

    The batch is a (frames x categories) count matrix; counts are summed over frames. Detections of one
    frame are not independent draws, so the chi-square statistic is divided by a design effect: the
    pooled mean count per frame that has any count (1 for one-per-frame indicators such as the NG flag),
    an upper bound of the variance inflation when a frame's detections share their class.
    Drift when PSI >= ``threshold`` or p < ``p_val``.
    """

    def __init__(self, threshold: float = DriftSettings.psi_alarm, p_val: float = DriftSettings.ks_p_alarm, alpha: float = 0.5,
                 labels: tuple[str, ...] = ()):
        self.threshold = threshold
        self.p_val = p_val
        self.alpha = alpha
        self.labels = tuple(labels)
        self.ref_counts = np.empty(0)
        self.ref_units = 0

    def fit(self, reference: np.ndarray) -> "CategoricalDetector":
        mat = self._matrix(reference)
        return self.fit_counts(mat.sum(axis=0), int(np.count_nonzero(mat.sum(axis=1) > 0)))

    def fit_counts(self, counts: np.ndarray, units: int) -> "CategoricalDetector":
        """Fit from summed counts and the number of frames that had any count (what the JSON reference stores)."""
        c = np.asarray(counts, dtype=np.float64).ravel()
        if c.size < 2 or np.any(~np.isfinite(c)) or np.any(c < 0):
            raise DataError(f"CategoricalDetector: reference counts must be >= 2 finite non-negative numbers, got {c.tolist()}.")
        if self.labels and len(self.labels) != c.size:
            raise DataError(f"CategoricalDetector: {len(self.labels)} labels for {c.size} categories.")
        self.ref_counts = c
        self.ref_units = int(units)
        self._fitted = True
        return self

    def _matrix(self, batch: np.ndarray) -> np.ndarray:
        mat = np.asarray(batch, dtype=np.float64)
        if mat.ndim == 1:
            mat = mat[None, :]
        if mat.ndim != 2 or (self._fitted and mat.shape[1] != self.ref_counts.size):
            want = self.ref_counts.size if self._fitted else "K"
            raise DataError(f"CategoricalDetector: expected a (frames x {want}) count matrix, got shape {mat.shape}.")
        return mat

    def score(self, batch: np.ndarray) -> Score:
        self._check_fitted()
        mat = self._matrix(batch)
        return self.score_counts(mat.sum(axis=0), int(np.count_nonzero(mat.sum(axis=1) > 0)))

    def score_counts(self, counts: np.ndarray, units: int) -> Score:
        self._check_fitted()
        w = np.asarray(counts, dtype=np.float64).ravel()
        if w.sum() <= 0:
            return Score(math.nan, 1.0)
        dist = psi(smoothed_shares(self.ref_counts, self.alpha), smoothed_shares(w, self.alpha))
        pooled_units = self.ref_units + units
        deff = (self.ref_counts.sum() + w.sum()) / pooled_units if pooled_units > 0 else 1.0
        stat, p, _ = chi2_homogeneity(self.ref_counts, w, design_effect=deff)
        return Score(dist, p, stat)

    def predict(self, batch: np.ndarray) -> dict[str, Any]:
        s = self.score(batch)
        drift = (s.distance >= self.threshold) or (s.p_val is not None and s.p_val < self.p_val)
        return _verdict("CategoricalDetector", s, bool(drift), self.threshold, {"p_val_threshold": self.p_val})
