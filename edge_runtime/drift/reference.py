"""The drift reference: what the line looked like to the model at training time (``drift_reference.json``).

The trainer runs the trained model on the line's training images, computes :func:`frame_features` per
image and calls :func:`build_reference`; the bundle ships the JSON and the edge box loads it into a
:class:`DriftMonitor`. Continuous features keep a sample of values (a seeded reservoir of at most
``max_samples``) so the box can run both PSI and KS; categorical groups keep summed counts.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from edge_runtime.drift.features import (
    FEATURE_SIDE,
    FEATURES_VERSION,
    CategoricalGroup,
    FeatureLayout,
    check_frame,
    class_key,
    feature_layout,
)
from edge_runtime.errors import BundleError, DataError
from edge_runtime.fileio import atomic_write_json

SCHEMA = "defectkit.drift_reference/1"
FILENAME = "drift_reference.json"
MIN_REFERENCE_FRAMES = 30
DEFAULT_MAX_SAMPLES = 2000


@dataclass
class ContinuousReference:
    """A reference sample of one continuous feature (finite values only) and its exact summary."""

    samples: np.ndarray
    n_frames: int
    n_missing: int
    mean: float
    std: float


@dataclass
class CategoricalReference:
    """Summed counts of one categorical group and the number of frames that had any count."""

    group: CategoricalGroup
    counts: np.ndarray
    units: int


@dataclass
class DriftReference:
    """Per-feature reference data plus what the edge box must agree on (feature version, classes)."""

    continuous: dict[str, ContinuousReference]
    categorical: dict[str, CategoricalReference]
    frames: int
    class_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    features_version: int = FEATURES_VERSION
    feature_side: int = FEATURE_SIDE

    @property
    def layout(self) -> FeatureLayout:
        return FeatureLayout(tuple(self.continuous), tuple(c.group for c in self.categorical.values()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "features_version": self.features_version,
            "feature_side": self.feature_side,
            "frames": self.frames,
            "class_names": list(self.class_names),
            "meta": dict(self.meta),
            "continuous": {
                name: {
                    "n_frames": ref.n_frames,
                    "n_missing": ref.n_missing,
                    "mean": _json_float(ref.mean),
                    "std": _json_float(ref.std),
                    "samples": [float(f"{v:.6g}") for v in ref.samples.tolist()],
                }
                for name, ref in self.continuous.items()
            },
            "categorical": {
                name: {
                    "keys": list(ref.group.keys),
                    "labels": list(ref.group.labels),
                    "complement": ref.group.complement,
                    "counts": [float(v) for v in ref.counts.tolist()],
                    "units": ref.units,
                }
                for name, ref in self.categorical.items()
            },
        }

    def save(self, path: str | Path) -> Path:
        """Write atomically (a reader sees the old file or the new one, never half)."""
        return atomic_write_json(path, self.to_dict(), indent=None)

    @classmethod
    def load(cls, path: str | Path) -> "DriftReference":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BundleError(f"{path}: drift reference not found; the bundle must ship {FILENAME} (rebuild the bundle).") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{path}: drift reference is not readable JSON ({exc}); rebuild it with build_reference.") from exc
        return cls.from_dict(raw, where=str(path))

    @classmethod
    def from_dict(cls, raw: Any, where: str = FILENAME) -> "DriftReference":
        """Validate the JSON form; every problem names the file, the entry and the fix."""
        fix = "rebuild it with edge_runtime.drift.build_reference from this kit version"

        def bad(msg: str) -> BundleError:
            return BundleError(f"{where}: {msg}; {fix}.")

        if not isinstance(raw, dict):
            raise bad(f"expected a JSON object, got {type(raw).__name__}")
        if raw.get("schema") != SCHEMA:
            raise bad(f"schema is {raw.get('schema')!r}, this runtime reads {SCHEMA!r}")
        for key in ("features_version", "feature_side", "frames", "class_names", "continuous", "categorical"):
            if key not in raw:
                raise bad(f"required key '{key}' is missing")
        if raw["features_version"] != FEATURES_VERSION or raw["feature_side"] != FEATURE_SIDE:
            raise bad(
                f"built with features version {raw['features_version']} at side {raw['feature_side']}, this runtime "
                f"computes version {FEATURES_VERSION} at side {FEATURE_SIDE}"
            )
        if not _is_int(raw["frames"]) or raw["frames"] < 1:
            raise bad(f"'frames' must be a positive whole number, got {raw['frames']!r}")
        names = raw["class_names"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise bad("'class_names' must be a list of strings")
        if not isinstance(raw["continuous"], dict) or not isinstance(raw["categorical"], dict):
            raise bad("'continuous' and 'categorical' must be JSON objects")
        continuous: dict[str, ContinuousReference] = {}
        for name, entry in raw["continuous"].items():
            continuous[name] = _continuous_from(entry, lambda m, n=name: bad(f"continuous feature '{n}': {m}"))
        categorical: dict[str, CategoricalReference] = {}
        for name, entry in raw["categorical"].items():
            categorical[name] = _categorical_from(name, entry, lambda m, n=name: bad(f"categorical feature '{n}': {m}"))
        meta = raw.get("meta", {})
        if not isinstance(meta, dict):
            raise bad("'meta' must be a JSON object")
        return cls(continuous, categorical, int(raw["frames"]), list(names), meta)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _json_float(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(f"{v:.6g}")


def _continuous_from(entry: Any, bad: Any) -> ContinuousReference:
    if not isinstance(entry, dict):
        raise bad("expected an object")
    for key in ("n_frames", "n_missing", "samples"):
        if key not in entry:
            raise bad(f"'{key}' is missing")
    samples = entry["samples"]
    if not isinstance(samples, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in samples):
        raise bad("'samples' must be a list of numbers")
    arr = np.asarray(samples, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise bad("'samples' holds a non-finite number")
    if not _is_int(entry["n_frames"]) or not _is_int(entry["n_missing"]) or entry["n_missing"] > entry["n_frames"]:
        raise bad("'n_frames' and 'n_missing' must be whole numbers with n_missing <= n_frames")
    mean = entry.get("mean")
    std = entry.get("std")
    return ContinuousReference(
        arr, entry["n_frames"], entry["n_missing"], math.nan if mean is None else float(mean), math.nan if std is None else float(std)
    )


def _categorical_from(name: str, entry: Any, bad: Any) -> CategoricalReference:
    if not isinstance(entry, dict):
        raise bad("expected an object")
    for key in ("keys", "labels", "complement", "counts", "units"):
        if key not in entry:
            raise bad(f"'{key}' is missing")
    keys, labels, counts = entry["keys"], entry["labels"], entry["counts"]
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
        raise bad("'keys' must be a non-empty list of feature keys")
    n_cat = len(keys) + (1 if entry["complement"] else 0)
    if not isinstance(labels, list) or len(labels) != n_cat:
        raise bad(f"'labels' must name {n_cat} categories")
    if not isinstance(counts, list) or len(counts) != n_cat:
        raise bad(f"'counts' must hold {n_cat} numbers")
    arr = np.asarray(counts, dtype=np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise bad("'counts' must be finite and non-negative")
    if not _is_int(entry["units"]) or entry["units"] < 0:
        raise bad("'units' must be a whole number >= 0")
    group = CategoricalGroup(name, tuple(keys), tuple(str(x) for x in labels), bool(entry["complement"]))
    return CategoricalReference(group, arr, entry["units"])


def group_counts(group: CategoricalGroup, rows: np.ndarray) -> np.ndarray:
    """(frames x categories) counts of a group from its key columns (frames x len(keys))."""
    rows = np.asarray(rows, dtype=np.float64)
    if not group.complement:
        return rows
    rest = np.clip(1.0 - rows.sum(axis=1, keepdims=True), 0.0, None)
    return np.concatenate([rest, rows], axis=1)


def build_reference(
    frames_iter: Iterable[Mapping[str, float]],
    *,
    class_names: Sequence[str] | None = None,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    seed: int = 0,
    meta: Mapping[str, Any] | None = None,
) -> DriftReference:
    """A reference from per-frame feature dicts (:func:`frame_features` on the training images).

    Streams: memory stays at ``max_samples`` values per feature however many frames come in.
    """
    rng = random.Random(seed)
    layout: FeatureLayout | None = None
    reservoirs: dict[str, list[float]] = {}
    seen: dict[str, int] = {}
    sums: dict[str, list[float]] = {}
    key_rows: dict[str, list[list[float]]] = {}
    frames = 0
    for index, feats in enumerate(frames_iter):
        where = f"build_reference: frame {index}"
        if not isinstance(feats, Mapping):
            raise DataError(f"{where}: expected a dict from frame_features, got {type(feats).__name__}.")
        if layout is None:
            n_cls = sum(1 for k in feats if k.startswith("class_"))
            if [class_key(i) for i in range(n_cls)] != sorted((k for k in feats if k.startswith("class_")), key=lambda k: int(k[6:])):
                raise DataError(f"{where}: class keys {sorted(k for k in feats if k.startswith('class_'))} are not class_0..class_{n_cls - 1}.")
            if class_names is not None and len(class_names) != n_cls:
                raise DataError(f"{where}: the frames count {n_cls} classes but {len(class_names)} class names were given; pass the model's classes.")
            layout = feature_layout(n_cls, class_names)
            reservoirs = {name: [] for name in layout.continuous}
            seen = {name: 0 for name in layout.continuous}
            sums = {name: [0.0, 0.0] for name in layout.continuous}
            key_rows = {g.name: [] for g in layout.categorical}
        check_frame(feats, layout.keys, where)
        for name in layout.continuous:
            value = float(feats[name])
            if not math.isfinite(value):
                continue
            sums[name][0] += value
            sums[name][1] += value * value
            seen[name] += 1
            res = reservoirs[name]
            if len(res) < max_samples:
                res.append(value)
            else:
                j = rng.randrange(seen[name])
                if j < max_samples:
                    res[j] = value
        for group in layout.categorical:
            row = [float(feats[k]) for k in group.keys]
            if not all(math.isfinite(v) and v >= 0 for v in row):
                raise DataError(f"{where}: counts {dict(zip(group.keys, row))} must be finite and >= 0.")
            key_rows[group.name].append(row)
        frames += 1
    if layout is None or frames < MIN_REFERENCE_FRAMES:
        raise DataError(
            f"build_reference: {frames} frames given, at least {MIN_REFERENCE_FRAMES} are needed for a usable drift "
            "reference; pass more training images."
        )
    continuous = {}
    for name in layout.continuous:
        n = seen[name]
        mean = sums[name][0] / n if n else math.nan
        var = max(0.0, sums[name][1] / n - mean * mean) if n else math.nan
        continuous[name] = ContinuousReference(np.asarray(reservoirs[name]), frames, frames - n, mean, math.sqrt(var) if n else math.nan)
    categorical = {}
    for group in layout.categorical:
        mat = group_counts(group, np.asarray(key_rows[group.name], dtype=np.float64))
        categorical[group.name] = CategoricalReference(group, mat.sum(axis=0), int(np.count_nonzero(mat.sum(axis=1) > 0)))
    info = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "max_samples": max_samples, "seed": seed}
    info.update(meta or {})
    class_mix = next((g for g in layout.categorical if g.name == "class_mix"), None)
    names = list(class_mix.labels) if class_mix is not None else []
    return DriftReference(continuous, categorical, frames, names, info)


def save_reference(reference: DriftReference, path: str | Path) -> Path:
    """Atomic save of ``drift_reference.json`` (same as ``reference.save``)."""
    return reference.save(path)


def load_reference(path: str | Path) -> DriftReference:
    """Load and validate ``drift_reference.json``; raises BundleError naming the file and the fix."""
    return DriftReference.load(path)
