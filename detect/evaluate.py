"""COCO evaluation with pycocotools: mAP50-95, mAP50 and AP per class, from a detections file.

ppdet's ``COCOMetric`` writes the model's detections to ``bbox.json``; the numbers come from
pycocotools here (ppdet only returns the summary line, not the per-class table).
"""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class EvalResult:
    """Figures of one evaluation; ``per_class`` maps class name to AP50-95 (NaN: no ground truth)."""

    map50_95: float
    map50: float
    per_class: dict[str, float] = field(default_factory=dict)
    per_class_ap50: dict[str, float] = field(default_factory=dict)
    images: int = 0
    detections: int = 0

    def to_dict(self) -> dict[str, Any]:
        def clean(d: dict[str, float]) -> dict[str, float | None]:
            return {k: (None if np.isnan(v) else round(float(v), 4)) for k, v in d.items()}

        out = asdict(self)
        out["map50_95"] = round(self.map50_95, 4)
        out["map50"] = round(self.map50, 4)
        out["per_class"] = clean(self.per_class)
        out["per_class_ap50"] = clean(self.per_class_ap50)
        return out


def coco_eval(ann_file: Path, detections: list[dict[str, Any]]) -> EvalResult:
    """Evaluate COCO-format ``detections`` (image_id, category_id, bbox xywh, score) against ``ann_file``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
    cats = sorted(gt.getCatIds())
    names = [gt.cats[c]["name"] for c in cats]
    n_images = len(gt.getImgIds())
    if not detections:
        nan = {n: (float("nan") if not gt.getAnnIds(catIds=[c]) else 0.0) for n, c in zip(names, cats)}
        return EvalResult(0.0, 0.0, nan, dict(nan), n_images, 0)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"]  # [IoU thresholds, recall, classes, area ranges, max dets]
    per_class, per_class50 = {}, {}
    for k, name in enumerate(names):
        p = precision[:, :, k, 0, -1]
        per_class[name] = float(np.mean(p[p > -1])) if (p > -1).any() else float("nan")
        p50 = precision[0, :, k, 0, -1]
        per_class50[name] = float(np.mean(p50[p50 > -1])) if (p50 > -1).any() else float("nan")
    return EvalResult(max(0.0, float(ev.stats[0])), max(0.0, float(ev.stats[1])), per_class, per_class50,
                      n_images, len(detections))


def coco_eval_file(ann_file: Path, bbox_json: Path) -> EvalResult:
    """Evaluate ppdet's ``bbox.json`` (missing or empty file = no detections)."""
    dets = json.loads(bbox_json.read_text()) if bbox_json.is_file() else []
    return coco_eval(ann_file, dets)


def format_table(result: EvalResult) -> str:
    """A small text table for the terminal and the report."""
    lines = [f"mAP50-95 {result.map50_95:.3f}   mAP50 {result.map50:.3f}   "
             f"({result.images} images, {result.detections} detections)",
             f"{'class':<20} {'AP50-95':>8} {'AP50':>8}"]
    for name, ap in result.per_class.items():
        ap50 = result.per_class_ap50.get(name, float("nan"))
        fmt = lambda v: "     n/a" if np.isnan(v) else f"{v:8.3f}"  # noqa: E731
        lines.append(f"{name:<20} {fmt(ap)} {fmt(ap50)}")
    return "\n".join(lines)
