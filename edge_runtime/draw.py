"""Annotated images for people: boxes, class names and scores, the ROI and the verdict."""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from edge_runtime.decision import Verdict
from edge_runtime.postprocess import Detections

_GREY = (160, 160, 160)
_RED = (40, 40, 230)
_GREEN = (60, 180, 60)
_ROI = (230, 160, 40)


def class_color(class_id: int) -> tuple[int, int, int]:
    """A stable, distinct BGR colour per class id (golden-ratio hues)."""
    hue = int((class_id * 0.618033988749895 % 1.0) * 180)
    hsv = np.uint8([[[hue, 200, 230]]])
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].tolist()
    return (b, g, r)


def _label(img: np.ndarray, text: str, x: int, y: int, color: tuple[int, int, int], scale: float) -> None:
    font = cv2.FONT_HERSHEY_SIMPLEX
    (tw, th), base = cv2.getTextSize(text, font, scale, 1)
    y = max(y, th + base + 1)
    cv2.rectangle(img, (x, y - th - base - 1), (x + tw + 2, y), color, thickness=-1)
    cv2.putText(img, text, (x + 1, y - base), font, scale, (255, 255, 255), 1, cv2.LINE_AA)


def draw_detections(
    image_bgr: np.ndarray,
    dets: Detections,
    classes: Sequence[str],
    verdict: Verdict | None = None,
    roi: Sequence[float] | None = None,
    min_score_drawn: float = 0.1,
) -> np.ndarray:
    """A copy of the image with the detections drawn: counted ones (from ``verdict``) in class colour
    and thick, ignored ones thin and grey (only from ``min_score_drawn`` up, or the image drowns in
    the NMS's low-score boxes); the verdict in the top-left corner."""
    img = image_bgr.copy()
    h, w = img.shape[:2]
    scale = max(0.4, min(1.2, max(h, w) / 1000))
    counted = verdict.mask.tolist() if verdict is not None else [True] * len(dets)
    if roi:
        x1, y1, x2, y2 = (int(round(v)) for v in roi)
        cv2.rectangle(img, (x1, y1), (x2, y2), _ROI, 1)
    # draw low scores first so the strongest boxes end on top
    rows = list(zip(dets.boxes.tolist(), dets.scores.tolist(), dets.class_ids.tolist(), counted))
    for box, score, cid, is_counted in reversed(rows):
        if not is_counted and score < min_score_drawn:
            continue
        color = class_color(cid) if is_counted else _GREY
        x1, y1, x2, y2 = (int(round(min(max(v, -1), lim))) for v, lim in zip(box, (w, h, w, h)))
        cv2.rectangle(img, (x1, y1), (x2, y2), color, 2 if is_counted else 1)
        name = classes[cid] if 0 <= cid < len(classes) else f"class_{cid}"
        _label(img, f"{name} {score:.2f}", max(x1, 0), max(y1, 0), color, scale)
    if verdict is not None:
        _label(img, verdict.verdict, 0, 0, _RED if verdict.is_ng else _GREEN, scale * 1.5)
    return img
