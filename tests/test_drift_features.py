"""Per-frame drift features: values on frames built here, invariances, cost, and bad input."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from edge_runtime.drift import feature_layout, frame_features, input_features, output_features
from edge_runtime.drift.synthetic import BoardStream
from edge_runtime.errors import DataError


def test_uniform_frame_has_exact_brightness_colour_and_no_contrast_or_sharpness():
    img = np.zeros((320, 320, 3), np.uint8)
    img[:] = (30, 120, 200)  # BGR
    f = input_features(img)
    assert (f["mean_b"], f["mean_g"], f["mean_r"]) == (30.0, 120.0, 200.0)
    assert f["brightness"] == pytest.approx(0.114 * 30 + 0.587 * 120 + 0.299 * 200, abs=0.6)
    assert f["contrast"] == 0.0 and f["sharpness"] == 0.0
    assert f["saturation"] == pytest.approx(255 * (200 - 30) / 200, abs=1.0)
    grey = input_features(np.full((240, 320), 77, np.uint8))
    assert grey["brightness"] == 77.0 and grey["saturation"] == 0.0 and grey["mean_r"] == 77.0


def test_darker_and_blurred_frames_move_the_right_features():
    frame = BoardStream(seed=5).next().image
    base = input_features(frame)
    dark = input_features(cv2.convertScaleAbs(frame, alpha=0.6))
    blur = input_features(cv2.GaussianBlur(frame, (0, 0), 2.0))
    assert dark["brightness"] == pytest.approx(0.6 * base["brightness"], rel=0.03)
    assert dark["contrast"] == pytest.approx(0.6 * base["contrast"], rel=0.05)
    assert blur["sharpness"] < 0.3 * base["sharpness"]
    assert blur["brightness"] == pytest.approx(base["brightness"], abs=1.0)


def test_features_do_not_depend_much_on_the_camera_resolution():
    frame = BoardStream(seed=6).next().image
    big = cv2.resize(frame, (1280, 1280), interpolation=cv2.INTER_CUBIC)
    a, b = input_features(frame), input_features(big)
    for key in ("brightness", "mean_b", "mean_g", "mean_r", "saturation"):
        assert b[key] == pytest.approx(a[key], rel=0.03), key
    bgra = input_features(cv2.cvtColor(frame, cv2.COLOR_BGR2BGRA))
    assert bgra == a


def test_output_features_counts_scores_and_ng():
    f = output_features(np.array([0.9, 0.2, 0.4]), np.array([2, 0, 2]), 3, True)
    assert f == {"score_max": 0.9, "score_mean": pytest.approx(0.5), "n_detections": 3.0,
                 "class_0": 1.0, "class_1": 0.0, "class_2": 2.0, "ng": 1.0}
    empty = output_features([], [], 2, False)
    assert empty["score_max"] == 0.0 and math.isnan(empty["score_mean"]) and empty["n_detections"] == 0.0
    assert output_features([0.5], [1.0], 2, False)["class_1"] == 1.0  # float ids from a backend are fine
    both = frame_features(np.zeros((64, 64, 3), np.uint8), [0.7], [0], 1, True)
    assert set(both) == set(feature_layout(1).keys)


@pytest.mark.parametrize("image,match", [
    (None, "non-empty numpy array"),
    (np.zeros((0, 5, 3), np.uint8), "non-empty"),
    (np.zeros((32, 32, 3), np.float32), "uint8"),
    (np.zeros((32, 32, 2), np.uint8), "grey or H x W x 3"),
    (np.zeros((2, 32, 32, 3), np.uint8), "grey or H x W x 3"),
])
def test_bad_images_are_refused_with_the_fix(image, match):
    with pytest.raises(DataError, match=match):
        input_features(image)


def test_bad_detections_are_refused_with_the_fix():
    with pytest.raises(DataError, match="one class id per detection"):
        output_features([0.5, 0.6], [0], 3, False)
    with pytest.raises(DataError, match="class id 3 is outside 0..2"):
        output_features([0.5], [3], 3, False)
    with pytest.raises(DataError, match="outside"):
        output_features([0.5], [-1], 3, False)
    with pytest.raises(DataError, match="whole numbers"):
        output_features([0.5], [0.5], 3, False)
    with pytest.raises(DataError, match="NaN"):
        output_features([np.nan], [0], 3, False)
    with pytest.raises(DataError, match="2 class names given for 3"):
        feature_layout(3, ["a", "b"])
# The cost of frame_features per frame is measured in bench/drift_cost.py (a speed limit in a test fails on a loaded
# shared machine and proves nothing about correctness).
