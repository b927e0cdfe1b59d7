"""Do two deployments of one model agree? Matches detections image by image and measures the gaps.

Used after every export (ONNX Runtime vs paddle.inference) and by the compression gate (variant vs
parent). NMS implementations return rows in different orders, so detections are matched per class by
best IoU, never by position.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_runtime.postprocess import Detections


@dataclass
class Agreement:
    images: int = 0
    count_mismatches: list[str] = field(default_factory=list)  # image names whose counts differ
    max_box_abs: float = 0.0  # pixels
    max_box_rel: float = 0.0  # relative to the box size
    max_score_abs: float = 0.0
    matched: int = 0

    def ok(self, box_rel_tol: float = 1e-3, score_tol: float = 1e-3) -> bool:
        return not self.count_mismatches and self.max_box_rel <= box_rel_tol and self.max_score_abs <= score_tol

    def summary(self) -> str:
        return (f"{self.images} images, {self.matched} matched detections, count mismatches "
                f"{len(self.count_mismatches)}, max box diff {self.max_box_abs:.2e} px "
                f"({self.max_box_rel:.2e} relative), max score diff {self.max_score_abs:.2e}")


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-9)


def compare_detections(a: Detections, b: Detections, name: str, acc: Agreement, min_score: float) -> None:
    """Fold one image's comparison into ``acc`` (only detections scoring at least ``min_score``)."""
    acc.images += 1
    ka, kb = a.scores >= min_score, b.scores >= min_score
    if int(ka.sum()) != int(kb.sum()):
        acc.count_mismatches.append(name)
    boxes_b, cls_b, scores_b = b.boxes[kb], b.class_ids[kb], b.scores[kb]
    used = np.zeros(len(boxes_b), dtype=bool)
    for box, cls, score in zip(a.boxes[ka], a.class_ids[ka], a.scores[ka]):
        cand = np.where((cls_b == cls) & ~used)[0]
        if cand.size == 0:
            continue
        j = cand[np.argmax(_iou(box, boxes_b[cand]))]
        used[j] = True
        diff = np.abs(box - boxes_b[j])
        size = max(float(box[2] - box[0]), float(box[3] - box[1]), 1.0)
        acc.max_box_abs = max(acc.max_box_abs, float(diff.max()))
        acc.max_box_rel = max(acc.max_box_rel, float(diff.max()) / size)
        acc.max_score_abs = max(acc.max_score_abs, abs(float(score) - float(scores_b[j])))
        acc.matched += 1


def compare_models(model_a: Path, model_b: Path, images: list[Path], min_score: float = 0.1,
                   backend_a: str | None = None, backend_b: str | None = None, threads: int = 2) -> Agreement:
    """Run two exported models on the same images with the edge runtime and compare the detections."""
    import cv2

    from edge_runtime.predict import Detector

    det_a = Detector.from_model(model_a, backend=backend_a, threads=threads)
    det_b = Detector.from_model(model_b, backend=backend_b, threads=threads)
    acc = Agreement()
    for path in images:
        img = cv2.imread(str(path))
        if img is None:
            continue
        compare_detections(det_a(img), det_b(img), path.name, acc, min_score)
    return acc
