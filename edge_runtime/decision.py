"""OK / NG for one part: which detections count, and why.

A detection counts when its score reaches its class threshold, its box is large enough and its centre
lies inside the inspection region. The settings are the ``runtime`` section of ``detect/defaults.yaml``
(mirrored in :class:`RuntimeConfig`; a test keeps the two equal, since the edge box has no YAML).
"""
from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from edge_runtime.errors import ConfigError
from edge_runtime.postprocess import Detections


def _finite(where: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}.")
    return float(value)


def _threshold(where: str, key: str, value: Any) -> float:
    value = _finite(where, key, value)
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{where}: '{key}' must be a score between 0 and 1, got {value}.")
    return value


@dataclass(frozen=True)
class RuntimeConfig:
    """Decision settings (defaults = ``runtime`` section of detect/defaults.yaml)."""

    score_threshold: float = 0.5
    class_thresholds: Mapping[str, float] = field(default_factory=dict)
    min_area: float = 0
    roi: tuple[float, float, float, float] | None = None  # [x1, y1, x2, y2] in original pixels

    @classmethod
    def from_dict(cls, raw: Any, where: str = "runtime config") -> "RuntimeConfig":
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: expected a JSON object of runtime settings, got {type(raw).__name__}.")
        known = ["score_threshold", "class_thresholds", "min_area", "roi"]
        for key in raw:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(known)}."
                raise ConfigError(f"{where}: unknown key '{key}'.{hint}")
        thresholds = raw.get("class_thresholds", {}) or {}
        if not isinstance(thresholds, Mapping):
            raise ConfigError(f"{where}: 'class_thresholds' must map class names to scores, got {thresholds!r}.")
        roi = raw.get("roi") or None
        if roi is not None:
            if not isinstance(roi, (list, tuple)) or len(roi) != 4:
                raise ConfigError(f"{where}: 'roi' must be [x1, y1, x2, y2] in pixels or [], got {roi!r}.")
            roi = tuple(_finite(where, f"roi[{i}]", v) for i, v in enumerate(roi))
            if roi[2] <= roi[0] or roi[3] <= roi[1]:
                raise ConfigError(f"{where}: 'roi' {list(roi)} is empty: x2 must exceed x1 and y2 must exceed y1.")
        min_area = _finite(where, "min_area", raw.get("min_area", cls.min_area))
        if min_area < 0:
            raise ConfigError(f"{where}: 'min_area' must be >= 0 pixels, got {min_area}.")
        return cls(
            score_threshold=_threshold(where, "score_threshold", raw.get("score_threshold", cls.score_threshold)),
            class_thresholds={
                str(k): _threshold(where, f"class_thresholds.{k}", v) for k, v in thresholds.items()
            },
            min_area=min_area,
            roi=roi,  # type: ignore[arg-type]
        )

    @classmethod
    def load(cls, path: str | Path) -> "RuntimeConfig":
        """A JSON file holding the runtime section, e.g. {"score_threshold": 0.4, "roi": [0, 0, 640, 480]}."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"runtime config '{path}' does not exist.")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ConfigError(f"runtime config '{path}' is not valid JSON: {exc}") from exc
        return cls.from_dict(raw, where=f"runtime config '{path}'")

    def with_overrides(self, **overrides: Any) -> "RuntimeConfig":
        """Command-line values win over the file (None = not given)."""
        merged = self.to_dict()
        merged.update({k: v for k, v in overrides.items() if v is not None})
        return self.from_dict(merged, where="command line")

    def to_dict(self) -> dict[str, Any]:
        return {
            "score_threshold": self.score_threshold,
            "class_thresholds": dict(self.class_thresholds),
            "min_area": self.min_area,
            "roi": list(self.roi) if self.roi else [],
        }

    def thresholds_for(self, classes: Sequence[str]) -> np.ndarray:
        """Per-class score thresholds in class-id order; unknown class names are refused."""
        unknown = sorted(set(self.class_thresholds) - set(classes))
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, list(classes), n=1)
                hints.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            raise ConfigError(
                f"runtime config: class_thresholds names classes the model does not have: {', '.join(hints)}. "
                f"The model's classes are: {', '.join(classes)}."
            )
        return np.array([self.class_thresholds.get(c, self.score_threshold) for c in classes], dtype=np.float32)


@dataclass(frozen=True)
class Verdict:
    """The decision for one image: ``verdict`` is "OK" or "NG"; ``counted`` are the detections behind it."""

    verdict: str
    counted: Detections
    reason: str
    mask: np.ndarray  # bool [K]: which of the input detections count


    @property
    def is_ng(self) -> bool:
        return self.verdict == "NG"


def decide(dets: Detections, classes: Sequence[str], runtime_cfg: RuntimeConfig) -> Verdict:
    """NG if any detection passes its class threshold, the minimum area and the ROI; else OK."""
    thresholds = runtime_cfg.thresholds_for(classes)
    if len(dets) == 0:
        return Verdict("OK", dets, "no detections", np.zeros((0,), dtype=bool))
    known = (dets.class_ids >= 0) & (dets.class_ids < len(classes))
    per_det = np.where(known, thresholds[np.clip(dets.class_ids, 0, len(classes) - 1)], np.inf)
    score_ok = dets.scores >= per_det
    area_ok = dets.areas() >= np.float32(runtime_cfg.min_area)
    roi_ok = np.ones(len(dets), dtype=bool)
    if runtime_cfg.roi is not None:
        x1, y1, x2, y2 = runtime_cfg.roi
        cx = (dets.boxes[:, 0] + dets.boxes[:, 2]) / 2
        cy = (dets.boxes[:, 1] + dets.boxes[:, 3]) / 2
        roi_ok = (cx >= x1) & (cx <= x2) & (cy >= y1) & (cy <= y2)
    counts = score_ok & area_ok & roi_ok
    counted = dets.select(counts)
    if len(counted):
        names = [classes[c] for c in counted.class_ids.tolist()]
        listed = ", ".join(f"{n} {s:.2f}" for n, s in zip(names[:5], counted.scores.tolist()))
        more = f" and {len(counted) - 5} more" if len(counted) > 5 else ""
        return Verdict("NG", counted, f"{len(counted)} defect(s): {listed}{more}", counts)
    parts = []
    for label, mask in (
        ("below threshold", ~score_ok),
        ("smaller than min_area", score_ok & ~area_ok),
        ("outside ROI", score_ok & area_ok & ~roi_ok),
    ):
        if mask.any():
            parts.append(f"{int(mask.sum())} {label}")
    return Verdict("OK", counted, f"{len(dets)} detection(s) ignored: " + ", ".join(parts), counts)
