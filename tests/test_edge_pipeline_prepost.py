"""The edge loop's cheaper pre- and post-processing give exactly what the straightforward arithmetic gives.

Pre-processing applies ppdet's per-pixel normalisation as one lookup table per channel (``cv2.LUT`` straight into the
CHW array); it must equal :func:`edge_runtime.preprocess.normalize` (the arithmetic, as ppdet writes it) on every
8-bit value of every channel, in both colour orders, with mean/std, with and without a resize. Post-processing
skips the classes without a candidate and sorts nothing for a class with one; the result must equal Paddle's own
``multiclass_nms3`` on sparse score maps (most classes empty or with one candidate, as in the loop with the
decision floor). No stand-ins: real OpenCV, real numpy, real Paddle.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge_runtime.modelspec import InputSpec
from edge_runtime.postprocess import multiclass_nms
from edge_runtime.preprocess import normalize, preprocess

SPECS = [
    InputSpec(size=(16, 32)),  # the export default: RGB, 1/255, no mean/std
    InputSpec(size=(16, 32), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),  # ImageNet
    InputSpec(size=(16, 32), color="BGR", scale=1.0, mean=(10.0, 0.5, 200.0), std=(2.0, 3.0, 0.7)),
]


def _every_value_image() -> np.ndarray:
    """16 x 32 BGR pixels holding every 8-bit value in every channel, each channel in another order."""
    v = np.arange(512, dtype=np.int64) % 256
    return np.stack([v, (v * 7 + 3) % 256, 255 - v], axis=1).astype(np.uint8).reshape(16, 32, 3)


def _reference(bgr: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The arithmetic without tables: colour, resize, normalize, CHW."""
    image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if spec.color == "RGB" else bgr
    if image.shape[:2] != spec.size:
        image = cv2.resize(image, (spec.width, spec.height), interpolation=spec.cv2_interp)
    return np.ascontiguousarray(normalize(image, spec).transpose(2, 0, 1))[None]


@pytest.mark.parametrize("spec", SPECS)
def test_table_preprocessing_equals_the_arithmetic_on_every_value(spec):
    bgr = _every_value_image()
    for c in range(3):
        assert sorted(set(bgr[..., c].ravel().tolist())) == list(range(256))
    image, scale_factor = preprocess(bgr, spec)
    assert image.dtype == np.float32 and image.shape == (1, 3, 16, 32) and image.flags.c_contiguous
    assert np.array_equal(image, _reference(bgr, spec))  # bit for bit
    np.testing.assert_array_equal(scale_factor, [[1.0, 1.0]])
    rng = np.random.default_rng(7)
    big = rng.integers(0, 256, (45, 71, 3), dtype=np.uint8)  # resized first, then the tables
    image, scale_factor = preprocess(big, spec)
    assert np.array_equal(image, _reference(big, spec))
    np.testing.assert_allclose(scale_factor, [[16 / 45, 32 / 71]], rtol=1e-7)


def test_grey_input_and_repeated_calls_do_not_share_buffers():
    spec = SPECS[0]
    grey = np.arange(16 * 32, dtype=np.int64).reshape(16, 32).astype(np.uint8)
    first, _ = preprocess(grey, spec)
    second, _ = preprocess(np.zeros((16, 32, 3), np.uint8), spec)
    assert not np.shares_memory(first, second)
    assert np.array_equal(first, _reference(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), spec))
    assert not second.any()


def _paddle_nms(boxes, scores, kw):
    from detect.heavy import paddle_stack

    paddle = paddle_stack().paddle
    from ppdet.modeling import ops

    from edge_runtime.postprocess import from_nms_output

    ref, num, _ = ops.multiclass_nms(paddle.to_tensor(boxes[None]), paddle.to_tensor(scores[None]), **kw)
    return from_nms_output(ref.numpy(), num.numpy(), 0.0)


def _rows(d):
    return sorted(zip(d.scores.tolist(), d.class_ids.tolist(), map(tuple, d.boxes.tolist())))


@pytest.mark.timeout(120)
def test_sparse_classes_match_paddle_multiclass_nms3():
    rng = np.random.default_rng(11)
    singles = 0
    for trial in range(12):
        a, c = 300, 6
        xy = rng.uniform(0, 0.8, (a, 2)).astype(np.float32)
        boxes = np.concatenate([xy, xy + rng.uniform(0.02, 0.2, (a, 2)).astype(np.float32)], axis=1)
        scores = rng.uniform(0, 0.05, (c, a)).astype(np.float32)  # below the threshold: no candidate
        for cls in range(c):
            hits = [0, 1, 1, 4][(cls + trial) % 4]  # classes with none, one (twice) or a few candidates
            idx = rng.choice(a, hits, replace=False)
            scores[cls, idx] = rng.uniform(0.2, 0.99, hits).astype(np.float32)
            if hits == 4:  # overlapping copies of one box so that NMS has something to suppress
                boxes[idx[1:]] = boxes[idx[0]] + np.float32(0.01)
        kw = dict(score_threshold=0.1, nms_top_k=[-1, 1, 1000][trial % 3], keep_top_k=[-1, 3, 100][trial % 3],
                  nms_threshold=0.5)
        ours = multiclass_nms(boxes, scores, kw["score_threshold"], kw["nms_threshold"], kw["nms_top_k"],
                              kw["keep_top_k"])
        ref = _paddle_nms(boxes, scores, kw)
        assert len(ours) == len(ref) > 0, (trial, kw)
        assert _rows(ours) == _rows(ref), (trial, kw)  # same rows, exactly (order of equal scores may differ)
        singles += sum(int((scores[k] > 0.1).sum()) == 1 for k in range(c))
    assert singles >= 12  # the one-candidate path ran, not only the general one
    empty = multiclass_nms(boxes, np.zeros_like(scores), 0.1, 0.5)
    assert len(empty) == 0 and empty.boxes.shape == (0, 4)
