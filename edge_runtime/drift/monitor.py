"""Sliding-window drift monitor: per-feature none / warn / alarm with hysteresis, cheap per frame.

``update`` costs one row write into a ring buffer; every ``eval_every`` frames the window is compared with
the reference (PSI + KS per continuous feature, PSI + chi-square per categorical group), p-values are
corrected for testing many features at once, and each feature's state machine takes one step.
A feature enters alarm only after ``hysteresis`` consecutive evaluations at the alarm level and leaves
warn/alarm only after ``hysteresis`` consecutive evaluations below the warn level, so a line sitting at
a threshold does not flap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from edge_runtime.drift.detectors import CategoricalDetector, KSDetector, PSIDetector, Score
from edge_runtime.drift.features import check_frame
from edge_runtime.drift.reference import DriftReference, group_counts
from edge_runtime.drift.stats import adjust_p_values
from edge_runtime.settings import CORRECTIONS, MIN_VALID, DriftSettings
from edge_runtime.errors import ConfigError, DataError

STATES = ("none", "warn", "alarm")


def psi_bins(window: int, n_ref: int, psi_warn: float, max_bins: int) -> int:
    """Bins such that sampling noise alone gives a PSI of at most a quarter of ``psi_warn``.

    Without drift PSI ~ (bins - 1) * (1/window + 1/n_ref) on average (a chi-square over the bins), so ten
    bins on a 200-frame window would sit at half the warn level and warn on noise; five bins against a
    2000-value reference keep it at a quarter, where a chance warning needs a 1-in-100 window.
    """
    noise_per_bin = 1.0 / window + 1.0 / max(1, n_ref)
    return int(min(max_bins, max(2, 1 + math.floor(psi_warn / (4.0 * noise_per_bin)))))


class Hysteresis:
    """One feature's none / warn / alarm state machine over per-evaluation levels 0, 1 (warn), 2 (alarm)."""

    def __init__(self, m: int):
        self.m = m
        self.state = "none"
        self._alarm_run = self._high_run = self._clear_run = 0

    def step(self, level: int) -> str:
        self._alarm_run = self._alarm_run + 1 if level >= 2 else 0
        self._high_run = self._high_run + 1 if level >= 1 else 0
        self._clear_run = self._clear_run + 1 if level == 0 else 0
        if self._alarm_run >= self.m:
            self.state = "alarm"
        elif self.state == "none" and self._high_run >= self.m:
            self.state = "warn"
        elif self.state != "none" and self._clear_run >= self.m:
            self.state = "none"
        return self.state


def _num(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


class DriftMonitor:
    """Compares a sliding window of frame features with a :class:`DriftReference`.

    ``features`` restricts monitoring to some feature / group names (default: all in the reference).
    """

    def __init__(
        self,
        reference: DriftReference,
        settings: DriftSettings | Mapping[str, Any] | None = None,
        features: Iterable[str] | None = None,
    ):
        if not isinstance(settings, DriftSettings):
            settings = DriftSettings.from_mapping(settings)
        settings.validate()
        self.settings = settings
        self.reference = reference
        wanted = set(features) if features is not None else None
        known = set(reference.continuous) | set(reference.categorical)
        if wanted is not None and wanted - known:
            raise ConfigError(f"drift monitor: unknown features {sorted(wanted - known)}; the reference has {sorted(known)}.")
        s = settings
        # per continuous feature: buffer column, PSI detectors by bin count (fitted on first use), KS detector
        self._continuous: dict[str, tuple[int, dict[int, PSIDetector], KSDetector]] = {}
        self._categorical: dict[str, tuple[list[int], CategoricalDetector]] = {}
        self._unscored: list[str] = []
        keys: list[str] = []
        for name, ref in reference.continuous.items():
            if wanted is not None and name not in wanted:
                continue
            if ref.samples.size < MIN_VALID:
                self._unscored.append(name)  # e.g. score_mean when the model found nothing on the training images
                continue
            self._continuous[name] = (len(keys), {}, KSDetector(s.ks_p_alarm).fit(ref.samples))
            keys.append(name)
        for name, cref in reference.categorical.items():
            if wanted is not None and name not in wanted:
                continue
            cols = list(range(len(keys), len(keys) + len(cref.group.keys)))
            keys.extend(cref.group.keys)
            det = CategoricalDetector(s.psi_alarm, s.ks_p_alarm, labels=cref.group.labels).fit_counts(cref.counts, cref.units)
            self._categorical[name] = (cols, det)
        self._keys = keys
        self._buffer = np.full((s.window, len(keys)), np.nan)
        self.reset()

    def reset(self) -> None:
        """Forget the window and all states (after a model swap the output statistics start afresh)."""
        self._buffer[:] = np.nan
        self._pos = 0
        self._count = 0
        self.frames = 0
        self.evaluations = 0
        self._machines = {name: Hysteresis(self.settings.hysteresis) for name in [*self._continuous, *self._categorical]}
        self._last: dict[str, dict[str, Any]] = {}

    @property
    def state(self) -> str:
        """The worst feature state: none, warn or alarm."""
        worst = max((STATES.index(m.state) for m in self._machines.values()), default=0)
        return STATES[worst]

    def update(self, features: Mapping[str, float]) -> str:
        """Add one frame's features (from :func:`frame_features`); evaluate every ``eval_every`` frames."""
        try:
            row = [features[k] for k in self._keys]
        except KeyError:
            check_frame(features, self._keys, f"drift monitor, frame {self.frames}")
            raise
        try:
            self._buffer[self._pos] = row
        except (TypeError, ValueError):
            bad = {k: v for k, v in zip(self._keys, row) if not isinstance(v, (int, float, np.number))}
            raise DataError(f"drift monitor, frame {self.frames}: features must be numbers, got {bad}; "
                            "use frame_features to build them.") from None
        self._pos = (self._pos + 1) % self.settings.window
        self._count = min(self._count + 1, self.settings.window)
        self.frames += 1
        if self._count >= self.settings.min_frames and self.frames % self.settings.eval_every == 0:
            self.evaluate()
        return self.state

    def evaluate(self) -> str:
        """Score the current window against the reference and step every feature's state machine."""
        s = self.settings
        data = self._buffer[: self._count]
        results: dict[str, dict[str, Any]] = {}
        p_names: list[str] = []
        p_values: list[float] = []
        for name, (col, psi_dets, ks_det) in self._continuous.items():
            x = data[:, col]
            x = x[np.isfinite(x)]
            ref = self.reference.continuous[name]
            entry = {"kind": "continuous", "psi": None, "ks_stat": None, "ks_p": None, "p_adj": None,
                     "window_mean": _num(float(x.mean())) if x.size else None, "ref_mean": _num(ref.mean)}
            if x.size >= MIN_VALID:
                ks: Score = ks_det.score(x)
                psi_det = self._psi_detector(psi_dets, ref.samples, x.size)
                entry.update(psi=psi_det.score(x).distance, ks_stat=ks.distance, ks_p=ks.p_val, bins=psi_det.edges.size + 1)
                p_names.append(name)
                p_values.append(float(ks.p_val))
            results[name] = entry
        for name, (cols, det) in self._categorical.items():
            cref = self.reference.categorical[name]
            mat = group_counts(cref.group, data[:, cols])
            counts = mat.sum(axis=0)
            key_mean = float(data[:, cols].sum(axis=1).mean()) if data.shape[0] else None
            ref_key_mean = float(cref.counts[1:].sum() if cref.group.complement else cref.counts.sum()) / self.reference.frames
            entry = {"kind": "categorical", "psi": None, "ks_stat": None, "ks_p": None, "chi2": None, "chi2_p": None,
                     "p_adj": None, "window_mean": key_mean, "ref_mean": ref_key_mean,
                     "window_shares": _shares(cref.group.labels, counts), "ref_shares": _shares(cref.group.labels, cref.counts)}
            if counts.sum() > 0:
                sc = det.score_counts(counts, int(np.count_nonzero(mat.sum(axis=1) > 0)))
                entry.update(psi=sc.distance, chi2=sc.statistic, chi2_p=sc.p_val)
                p_names.append(name)
                p_values.append(float(sc.p_val))
            results[name] = entry
        for name, p_adj in zip(p_names, adjust_p_values(p_values, s.correction)):
            results[name]["p_adj"] = p_adj
        for name, entry in results.items():
            if entry["p_adj"] is None:
                entry["state"] = self._machines[name].state  # nothing to score: the state holds
                continue
            psi_val, p_adj = entry["psi"], entry["p_adj"]
            level = 2 if (psi_val >= s.psi_alarm or p_adj < s.ks_p_alarm) else 1 if (psi_val >= s.psi_warn or p_adj < s.ks_p_warn) else 0
            entry["level"] = level
            entry["state"] = self._machines[name].step(level)
        self._last = results
        self.evaluations += 1
        return self.state

    def _psi_detector(self, cache: dict[int, PSIDetector], ref_samples: np.ndarray, n_window: int) -> PSIDetector:
        """Bins for the values actually in the window: a half-full window or a feature present in few
        frames (score_mean) gets fewer bins, so its PSI noise stays below the warn level too."""
        s = self.settings
        bins = psi_bins(n_window, ref_samples.size, s.psi_warn, s.psi_max_bins)
        if bins not in cache:
            cache[bins] = PSIDetector(bins, s.psi_alarm, min_samples=MIN_VALID).fit(ref_samples)
        return cache[bins]

    def snapshot(self) -> dict[str, Any]:
        """The report form: worst state and, per feature, state and the numbers of the last evaluation."""
        feats: dict[str, Any] = {}
        for name in [*self._continuous, *self._categorical]:
            entry = dict(self._last.get(name, {"kind": "categorical" if name in self._categorical else "continuous"}))
            entry["state"] = self._machines[name].state
            for key in ("psi", "ks_stat", "ks_p", "window_mean", "ref_mean"):
                entry[key] = _num(entry.get(key))
            for key in ("p_adj", "chi2", "chi2_p"):
                if key in entry:
                    entry[key] = _num(entry[key])
            entry.pop("level", None)
            feats[name] = entry
        for name in self._unscored:
            feats[name] = {"kind": "continuous", "state": "none", "psi": None, "ks_stat": None, "ks_p": None,
                           "window_mean": None, "ref_mean": _num(self.reference.continuous[name].mean),
                           "note": "too few reference values to score"}
        return {
            "state": self.state,
            "frames": self.frames,
            "window_frames": self._count,
            "evaluations": self.evaluations,
            "correction": self.settings.correction,
            "features": feats,
        }


def _shares(labels: tuple[str, ...], counts: np.ndarray) -> dict[str, float] | None:
    total = float(np.sum(counts))
    if total <= 0:
        return None
    return {label: float(c) / total for label, c in zip(labels, counts)}
