"""Host NMS and output decoding: hand-computed cases, then Paddle's own multiclass_nms3 on random boxes."""
from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.errors import ModelError
from edge_runtime.modelspec import PostprocessSpec
from edge_runtime.postprocess import Detections, decode_outputs, from_nms_output, multiclass_nms


def _rows(d: Detections) -> list[tuple]:
    return [(int(c), round(float(s), 4), *[round(float(v), 3) for v in b])
            for c, s, b in zip(d.class_ids, d.scores, d.boxes)]


BOXES = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10.5]], np.float32)


def test_hand_computed_per_class_nms_and_sorting():
    # IoU(b0, b1) = 81 / 119 = 0.68; IoU(b0, b3) = 100 / 105 = 0.95; b2 is far away.
    scores = np.array([[0.9, 0.8, 0.7, 0.05], [0.1, 0.2, 0.3, 0.95]], np.float32)
    d = multiclass_nms(BOXES, scores, score_threshold=0.05, nms_iou=0.6)
    # class 0: b0 kept, b1 suppressed, b2 kept, b3 has score == threshold (strictly greater is needed)
    # class 1: b3 kept, b0 (IoU 0.95) and b1 (IoU 85.5/119.5 = 0.72) suppressed, b2 kept
    assert _rows(d) == [
        (1, 0.95, 0, 0, 10, 10.5), (0, 0.9, 0, 0, 10, 10), (0, 0.7, 50, 50, 60, 60), (1, 0.3, 50, 50, 60, 60)
    ]
    assert d.boxes.dtype == np.float32 and d.scores.dtype == np.float32 and d.class_ids.dtype == np.int64
    # a looser IoU threshold keeps b1 in class 0; keep_top_k cuts across classes by score
    d = multiclass_nms(BOXES, scores, score_threshold=0.05, nms_iou=0.7, keep_top_k=3)
    assert _rows(d) == [(1, 0.95, 0, 0, 10, 10.5), (0, 0.9, 0, 0, 10, 10), (0, 0.8, 1, 1, 11, 11)]
    # nms_top_k keeps the best candidates of each class before NMS
    d = multiclass_nms(BOXES, scores, score_threshold=0.0, nms_iou=0.6, nms_top_k=1)
    assert _rows(d) == [(1, 0.95, 0, 0, 10, 10.5), (0, 0.9, 0, 0, 10, 10)]


def test_pixel_boxes_with_normalized_false_add_one():
    # [0,0,1,1] vs [1,0,2,1]: they touch; normalized IoU 0, pixel IoU (1*2)/(4+4-2) = 1/3
    boxes = np.array([[0, 0, 1, 1], [1, 0, 2, 1]], np.float32)
    scores = np.array([[0.9, 0.8]], np.float32)
    assert len(multiclass_nms(boxes, scores, 0.0, nms_iou=0.3, normalized=True)) == 2
    assert len(multiclass_nms(boxes, scores, 0.0, nms_iou=0.3, normalized=False)) == 1


def test_nothing_above_threshold_and_shape_errors():
    assert len(multiclass_nms(BOXES, np.zeros((3, 4), np.float32), 0.01, 0.6)) == 0
    with pytest.raises(ModelError, match=r"boxes \[A,4\] and scores \[C,A\], got \(4, 4\) and \(2, 3\)"):
        multiclass_nms(BOXES, np.zeros((2, 3), np.float32), 0.01, 0.6)


def test_in_model_rows_are_typed_filtered_and_cut_to_bbox_num():
    bbox = np.array([[1, 0.3, 5, 5, 9, 9], [0, 0.8, 1, 2, 3, 4], [0, 0.005, 0, 0, 1, 1], [2, 0.9, 0, 0, 2, 2]],
                    np.float32)
    d = from_nms_output(bbox, np.array([3], np.int32), score_threshold=0.01)
    assert _rows(d) == [(0, 0.8, 1, 2, 3, 4), (1, 0.3, 5, 5, 9, 9)]  # row 3 is past bbox_num, row 2 too low
    assert len(from_nms_output(np.array([[-1]], np.float32), np.array([1], np.int32), 0.01)) == 0  # Paddle's "none"
    assert len(from_nms_output(np.zeros((0, 6), np.float32), np.array([0], np.int32), 0.01)) == 0
    with pytest.raises(ModelError, match=r"feeds one at a time"):
        from_nms_output(bbox, np.array([2, 2], np.int32), 0.01)


def test_decode_outputs_finds_arrays_by_shape_and_explains_mismatches():
    post = PostprocessSpec(score_threshold=0.05, nms_iou=0.6)
    scores = np.array([[[0.9, 0.8, 0.7, 0.05]]], np.float32)
    a = decode_outputs([BOXES[None], scores], "host", post, num_classes=1)
    b = decode_outputs([scores, BOXES[None]], "host", post, num_classes=1)
    assert _rows(a) == _rows(b) == [(0, 0.9, 0, 0, 10, 10), (0, 0.7, 50, 50, 60, 60)]
    with pytest.raises(ModelError, match=r"set its entry's \"nms\" to \"in_model\""):
        decode_outputs([np.zeros((3, 6), np.float32), np.array([3], np.int32)], "host", post, num_classes=1)
    with pytest.raises(ModelError, match=r"set its entry's \"nms\" to \"host\""):
        decode_outputs([BOXES[None], scores], "in_model", post, num_classes=1)


def test_records_are_the_wire_form():
    d = Detections.build(np.array([[1.234567, 2, 3, 4]]), np.array([0.876543]), np.array([1]))
    assert d.to_records(["a", "b"]) == [{"class_id": 1, "class": "b", "score": 0.87654, "box": [1.23, 2.0, 3.0, 4.0]}]


@pytest.mark.parametrize("normalized", [True, False])
def test_matches_paddle_multiclass_nms3_on_random_boxes(normalized):
    from detect.heavy import paddle_stack

    paddle = paddle_stack().paddle
    from ppdet.modeling import ops

    rng = np.random.default_rng(1 + normalized)
    suppressed = 0
    for trial in range(6):
        a, c = int(rng.integers(20, 300)), int(rng.integers(1, 5))
        xy = rng.uniform(0, 300, (a, 2))
        wh = rng.uniform(2, 80, (a, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
        boxes[::17, 2] = boxes[::17, 0] - 1  # a few inverted boxes: Paddle gives them area 0
        # clusters of near-duplicates so NMS has work to do
        boxes[1::3] = boxes[0::3][: len(boxes[1::3])] + rng.normal(0, 3, boxes[1::3].shape).astype(np.float32)
        scores = rng.uniform(0, 1, (c, a)).astype(np.float32) ** 3
        kw = dict(score_threshold=float(rng.choice([0.01, 0.05, 0.2])), nms_top_k=int(rng.choice([-1, 50, 1000])),
                  keep_top_k=int(rng.choice([-1, 30, 100])), nms_threshold=float(rng.choice([0.45, 0.6, 0.7])))
        ref, num, _ = ops.multiclass_nms(paddle.to_tensor(boxes[None]), paddle.to_tensor(scores[None]),
                                         normalized=normalized, **kw)
        ref = from_nms_output(ref.numpy(), num.numpy(), 0.0)
        ours = multiclass_nms(boxes, scores, kw["score_threshold"], kw["nms_threshold"], kw["nms_top_k"],
                              kw["keep_top_k"], normalized=normalized)
        assert len(ours) == len(ref) > 0, (trial, kw)
        suppressed += int((scores > kw["score_threshold"]).sum()) - len(ref)
        # same set of rows; order of equal scores may differ, so compare sorted rows exactly
        key = lambda d: sorted(zip(d.scores.tolist(), d.class_ids.tolist(), map(tuple, d.boxes.tolist())))
        assert key(ours) == key(ref), (trial, kw)
    assert suppressed > 50  # the comparison exercised suppression, not only thresholding
