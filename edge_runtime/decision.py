"""OK / NG for one part: which detections count, and why.

A detection counts when its score reaches its class threshold, its box is large enough and its centre
lies inside the inspection region. The settings are the ``runtime`` section
(:class:`edge_runtime.settings.RuntimeSettings`), shipped in the bundle manifest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edge_runtime.postprocess import Detections
from edge_runtime.settings import RuntimeSettings


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


def decide(dets: Detections, classes: Sequence[str], runtime_cfg: RuntimeSettings) -> Verdict:
    """NG if any detection passes its class threshold, the minimum area and the ROI; else OK."""
    thresholds = runtime_cfg.thresholds_for(classes)
    if len(dets) == 0:
        return Verdict("OK", dets, "no detections", np.zeros((0,), dtype=bool))
    known = (dets.class_ids >= 0) & (dets.class_ids < len(classes))
    per_det = np.where(known, thresholds[np.clip(dets.class_ids, 0, len(classes) - 1)], np.inf)
    score_ok = dets.scores >= per_det
    area_ok = dets.areas() >= np.float32(runtime_cfg.min_area)
    roi_ok = np.ones(len(dets), dtype=bool)
    if runtime_cfg.roi:
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
