"""Model outputs -> typed :class:`Detections`, with a host-side multiclass NMS for no-NMS exports.

Two output forms exist (STACK.md "Traps in export"): with NMS in the graph, ``bbox [K,6]`` rows
``(class, score, x1, y1, x2, y2)`` in original-image pixels plus ``bbox_num [N]``; without it
(``exclude_nms``), ``boxes [N,A,4]`` in original pixels and sigmoid ``scores [N,C,A]``.
:func:`multiclass_nms` has the semantics of Paddle's ``multiclass_nms3`` kernel as ppdet's
``MultiClassNMS`` calls it for PP-YOLOE (``normalized=True`` by default, ``nms_eta=1``, no background
class): per class keep scores strictly above ``score_threshold``, the ``nms_top_k`` best, greedy NMS that
drops a box whose IoU with a kept one exceeds ``nms_iou``; then the ``keep_top_k`` best across classes.

Sized to the decision: the box only looks at detections that can make a part NG or fall in the hard-example
band, so it passes ``min_score`` (``min(lowest decision threshold, hard_example_low)``): candidates scoring
below it are dropped before NMS in one vectorised pass. Greedy NMS visits boxes best score first and only a
kept, higher-scoring box can suppress another, and both top-k cuts keep the best scores; so every detection
scoring >= ``min_score`` comes out exactly as the full NMS (``score_threshold`` 0.01, the mAP-evaluation
setting, still used by export checks, evaluation and ``predict``) gives it, and nothing below it does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edge_runtime.errors import ModelError
from edge_runtime.modelspec import PostprocessSpec


@dataclass(frozen=True)
class Detections:
    """Detections of one image, best score first. Boxes are (x1, y1, x2, y2) in original pixels."""

    boxes: np.ndarray  # float32 [K, 4]
    scores: np.ndarray  # float32 [K]
    class_ids: np.ndarray  # int64 [K]

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int64))

    @classmethod
    def build(cls, boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray) -> "Detections":
        """Typed and sorted by score (descending; ties keep their order)."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        class_ids = np.asarray(class_ids).reshape(-1).astype(np.int64)
        order = np.argsort(-scores, kind="stable")
        return cls(boxes[order], scores[order], class_ids[order])

    def select(self, mask: np.ndarray) -> "Detections":
        return Detections(self.boxes[mask], self.scores[mask], self.class_ids[mask])

    def areas(self) -> np.ndarray:
        wh = np.clip(self.boxes[:, 2:] - self.boxes[:, :2], 0, None)
        return wh[:, 0] * wh[:, 1]

    def to_records(self, classes: Sequence[str]) -> list[dict]:
        """The wire form (JSON lines): class id, class name, score, box."""
        out = []
        for box, score, cid in zip(self.boxes.tolist(), self.scores.tolist(), self.class_ids.tolist()):
            name = classes[cid] if 0 <= cid < len(classes) else f"class_{cid}"
            out.append(
                {"class_id": int(cid), "class": name, "score": round(score, 5), "box": [round(v, 2) for v in box]}
            )
        return out


def _iou_one_to_many(
    box: np.ndarray, box_area: np.float32, cols: tuple[np.ndarray, ...], areas: np.ndarray, norm: np.float32
) -> np.ndarray:
    """Paddle's JaccardOverlap of one box with many (columns x1, y1, x2, y2 and areas given), in float32.

    The formula is symmetric in its two boxes, so the argument order of Paddle's kernel does not matter.
    A zero union gives NaN, which the caller's ``iou <= thr`` treats as overlapping (as Paddle does).
    """
    x1, y1, x2, y2 = cols
    disjoint = (x1 > box[2]) | (x2 < box[0]) | (y1 > box[3]) | (y2 < box[1])
    inter = (np.minimum(box[2], x2) - np.maximum(box[0], x1) + norm) * (
        np.minimum(box[3], y2) - np.maximum(box[1], y1) + norm
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / (box_area + areas - inter)
    iou[disjoint] = 0.0
    return iou


def _areas(boxes: np.ndarray, normalized: bool) -> np.ndarray:
    """Paddle's BBoxArea: 0 for inverted boxes, +1 on each side for pixel (non-normalized) boxes."""
    norm = np.float32(0.0 if normalized else 1.0)
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    area = (w + norm) * (h + norm)
    return np.where((w < 0) | (h < 0), np.float32(0.0), area).astype(np.float32)


def nms_single_class(
    boxes: np.ndarray,
    scores: np.ndarray,
    score_threshold: float,
    nms_iou: float,
    top_k: int,
    normalized: bool = True,
    max_keep: int = -1,
) -> np.ndarray:
    """Indices kept by greedy NMS for one class, best score first (at most ``max_keep`` when > -1)."""
    candidates = np.flatnonzero(scores > np.float32(score_threshold))
    if candidates.size <= 1 or top_k == 0 or max_keep == 0:  # nothing to compare: no sort, no IoU
        return candidates[: 0 if top_k == 0 or max_keep == 0 else 1].astype(np.int64, copy=False)
    order = candidates[np.argsort(-scores[candidates], kind="stable")]
    if top_k > -1:
        order = order[:top_k]
    cand = boxes[order]
    cols = tuple(np.ascontiguousarray(cand[:, i]) for i in range(4))
    areas = _areas(cand, normalized)
    norm = np.float32(0.0 if normalized else 1.0)
    thr = np.float32(nms_iou)
    alive = np.arange(order.size)
    keep: list[int] = []
    while alive.size and (max_keep < 0 or len(keep) < max_keep):
        best = int(alive[0])
        keep.append(best)
        rest = alive[1:]
        if not rest.size:
            break
        iou = _iou_one_to_many(cand[best], areas[best], tuple(c[rest] for c in cols), areas[rest], norm)
        alive = rest[iou <= thr]  # NaN (zero union) compares False: suppressed, as in Paddle
    return order[np.asarray(keep, dtype=np.int64)]


def multiclass_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    score_threshold: float,
    nms_iou: float,
    nms_top_k: int = -1,
    keep_top_k: int = -1,
    normalized: bool = True,
    min_score: float | None = None,
) -> Detections:
    """Per-class NMS of boxes [A,4] with scores [C,A]; then the ``keep_top_k`` best across classes.

    ``min_score``: drop candidates scoring below it (inclusive floor) before NMS; the detections at or above
    it are those of the full NMS (module docstring)."""
    boxes = np.asarray(boxes, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.ndim != 2 or scores.shape[1] != boxes.shape[0]:
        raise ModelError(
            f"multiclass NMS needs boxes [A,4] and scores [C,A], got {boxes.shape} and {scores.shape}."
        )
    if min_score is not None and min_score > score_threshold:
        boxes, scores = prefilter(boxes, scores, min_score)
    kept_boxes, kept_scores, kept_classes = [], [], []
    # only the classes with a candidate: with the decision floor most classes of most frames have none
    for c in np.flatnonzero((scores > np.float32(score_threshold)).any(axis=1)).tolist():
        # a class's box beyond its keep_top_k-th can never reach the overall top keep_top_k: stop there
        idx = nms_single_class(boxes, scores[c], score_threshold, nms_iou, nms_top_k, normalized, keep_top_k)
        kept_boxes.append(boxes[idx])
        kept_scores.append(scores[c, idx])
        kept_classes.append(np.full(idx.shape, c, dtype=np.int64))
    if not kept_scores:
        return Detections.empty()
    dets = Detections.build(np.concatenate(kept_boxes), np.concatenate(kept_scores), np.concatenate(kept_classes))
    if keep_top_k > -1 and len(dets) > keep_top_k:
        dets = dets.select(np.arange(keep_top_k))
    return dets


def prefilter(boxes: np.ndarray, scores: np.ndarray, min_score: float) -> tuple[np.ndarray, np.ndarray]:
    """Anchors with no class scoring >= ``min_score`` removed, and class scores below it set to -1 (never a
    candidate); the kept anchors keep their order, so ties are broken as in the full NMS."""
    floor = np.float32(min_score)
    passing = scores >= floor  # [C, A]
    cols = np.flatnonzero(passing.any(axis=0))
    sub = scores[:, cols]
    return boxes[cols], np.where(passing[:, cols], sub, np.float32(-1.0))


def from_nms_output(bbox: np.ndarray, bbox_num: np.ndarray | None, score_threshold: float,
                    min_score: float | None = None) -> Detections:
    """Rows (class, score, x1, y1, x2, y2) of the in-model NMS -> Detections of image 0.

    Paddle's NMS returns a single ``[[-1]]`` row (and bbox_num 1) when nothing is found; rows with a
    negative class and rows below the threshold are dropped.
    """
    bbox = np.asarray(bbox, dtype=np.float32)
    if bbox.size == 0 or (bbox.ndim == 2 and bbox.shape[1] == 1 and np.all(bbox == -1)):
        return Detections.empty()
    if bbox.ndim != 2 or bbox.shape[1] != 6:
        raise ModelError(f"an in-model NMS output must be bbox [K,6] (class, score, x1, y1, x2, y2), got {bbox.shape}.")
    if bbox_num is not None:
        num = np.asarray(bbox_num).reshape(-1)
        if num.size > 1:
            raise ModelError(f"the model returned detections for {num.size} images; the runtime feeds one at a time.")
        if num.size == 1:
            bbox = bbox[: int(num[0])]
    floor = score_threshold if min_score is None else max(score_threshold, min_score)
    keep = (bbox[:, 0] >= 0) & (bbox[:, 1] >= np.float32(floor))
    bbox = bbox[keep]
    return Detections.build(bbox[:, 2:6], bbox[:, 1], np.rint(bbox[:, 0]))


def from_raw_output(boxes: np.ndarray, scores: np.ndarray, post: PostprocessSpec, normalized: bool = True,
                    min_score: float | None = None) -> Detections:
    """No-NMS outputs boxes [1,A,4] and scores [1,C,A] -> host NMS -> Detections."""
    boxes = np.asarray(boxes, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    if boxes.ndim != 3 or scores.ndim != 3 or boxes.shape[0] != 1 or scores.shape[0] != 1:
        raise ModelError(
            f"a no-NMS model must output boxes [1,A,4] and scores [1,C,A] for one image, got {boxes.shape} and {scores.shape}."
        )
    return multiclass_nms(
        boxes[0], scores[0], post.score_threshold, post.nms_iou, post.nms_top_k, post.keep_top_k, normalized,
        min_score=min_score,
    )


def decode_outputs(outputs: Sequence[np.ndarray], nms: str, post: PostprocessSpec, num_classes: int,
                   min_score: float | None = None) -> Detections:
    """Pick the right arrays out of a backend's outputs by shape, whatever order the exporter gave them.

    ``min_score`` (the box's decision floor): only detections scoring >= it, computed as by the full NMS."""
    shapes = [tuple(np.shape(o)) for o in outputs]
    if nms == "in_model":
        bbox = [o for o in outputs if np.ndim(o) == 2]
        nums = [o for o in outputs if np.ndim(o) == 1]
        if len(bbox) != 1:
            raise ModelError(
                f"deploy.json says NMS is in the model, so one output bbox [K,6] is expected; got shapes {shapes}. "
                "If the model was exported with exclude_nms, set its entry's \"nms\" to \"host\"."
            )
        return from_nms_output(bbox[0], nums[0] if len(nums) == 1 else None, post.score_threshold, min_score)
    three_d = [i for i, o in enumerate(outputs) if np.ndim(o) == 3]
    for i in three_d:
        for j in three_d:
            b, s = shapes[i], shapes[j]
            if i != j and b[2] == 4 and s[1] == num_classes and s[2] == b[1]:
                return from_raw_output(outputs[i], outputs[j], post, min_score=min_score)
    raise ModelError(
        f"deploy.json says NMS runs on the host, so outputs boxes [1,A,4] and scores [1,{num_classes},A] are "
        f"expected; got shapes {shapes}. If the model has NMS inside, set its entry's \"nms\" to \"in_model\"."
    )
