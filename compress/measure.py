"""Measure an exported model the way the gate needs it: COCO figures on the line's val set, and latency.

The figures come from the same pycocotools evaluation as training (``detect.evaluate.coco_eval``); the
detections come from the edge runtime's own ``Detector`` (same pre/post-processing as on the box), so an
INT8 ONNX file, a PaddleSlim model and a pruned export are all scored through one path.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from detect.data.coco import load_coco
from detect.evaluate import EvalResult, coco_eval
from detect.linespec import LineSpec
from edge_runtime.errors import DataError

try:  # progress is a nicety, never a requirement
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


def read_image(path: str | Path, what: str = "image") -> np.ndarray:
    """A BGR image of the line, or a DataError naming it (``what``: "golden image", "training image", ...)."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{what} {path} cannot be decoded; run `defectkit data check` on the line.")
    return img


def calibration_annotations(spec: LineSpec, images: Sequence[Path], dst: Path) -> Path | None:
    """The calibration images' ground truth (they are training images) as a COCO file of their own, so a
    quantizer can measure its mAP drop on them; None when the training annotations do not cover them all."""
    from detect.data.coco import load_coco, subset, write_coco

    try:
        coco = load_coco(spec.paths.train)
    except DataError:  # no training annotations at hand: the mAP criterion is skipped, detections still compared
        return None
    by_name = {Path(im["file_name"]).name: im["id"] for im in coco["images"]}
    ids = [by_name.get(Path(p).name) for p in images]
    if any(i is None for i in ids):
        return None
    return write_coco(dst, subset(coco, ids))


def evaluate_model(model: str | Path, spec: LineSpec, ann_file: str | Path | None = None, backend: str | None = None,
                   threads: int = 2, progress: bool = True) -> EvalResult:
    """COCO mAP of an exported model file (with its deploy.json) on ``ann_file`` (default: the line's val set).

    Class names map to the annotation file's category ids by name, so the contract order is what counts.
    """
    from edge_runtime.predict import Detector

    ann_file = Path(ann_file or spec.paths.val)
    coco = load_coco(ann_file)
    detector = Detector.from_model(model, backend=backend, threads=threads)
    by_name = {c["name"]: int(c["id"]) for c in coco["categories"]}
    missing = [n for n in detector.classes if n not in by_name]
    if missing:
        raise DataError(f"{ann_file}: no category named {missing} (the model's classes are {detector.classes}).")
    cat_ids = [by_name[n] for n in detector.classes]
    images = coco["images"]
    it = tqdm(images, desc=f"eval {Path(model).name}", unit="img", leave=False) if (progress and tqdm) else images
    dets = []
    for im in it:
        found = detector(read_image(spec.paths.images / im["file_name"]))
        for box, cls, score in zip(found.boxes, found.class_ids, found.scores):
            x1, y1, x2, y2 = (float(v) for v in box)
            dets.append({"image_id": im["id"], "category_id": cat_ids[int(cls)],
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return coco_eval(ann_file, dets)


def median_latency_ms(model: str | Path, images: Sequence[Path], backend: str | None = None, threads: int = 2,
                      warmup: int = 3, repeats: int = 20) -> float:
    """Median wall time of one ``backend.infer`` call (pre/post-processing excluded) over ``repeats`` runs."""
    from edge_runtime.predict import Detector
    from edge_runtime.preprocess import model_feeds

    detector = Detector.from_model(model, backend=backend, threads=threads)
    frames = [read_image(Path(p)) for p in images] or [np.zeros((320, 320, 3), np.uint8)]
    feeds = []
    for img in frames:
        feeds.append(model_feeds(img, detector.spec.input, detector.backend.input_names))
    for i in range(warmup):
        detector.backend.infer(feeds[i % len(feeds)])
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        detector.backend.infer(feeds[i % len(feeds)])
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 2)


__all__ = ["evaluate_model", "median_latency_ms", "read_image", "calibration_annotations"]
