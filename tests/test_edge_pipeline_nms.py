"""Post-processing sized to the decision, on real model outputs: the kit's base detector (PP-YOLOE+ tiny, 320 px,
base_weights/pcb-base-tiny-320) exported without NMS (ONNX on ONNX Runtime, paddle on paddle.inference), run on
the boards of a synthetic line. With the box's decision floor the host NMS keeps exactly the full NMS's
detections scoring at or above the floor, and the box's verdicts do not change."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from edge_runtime.decision import decide
from edge_runtime.predict import Detector
from edge_runtime.run import decision_floor
from edge_runtime.settings import BoxSettings, ReportSettings, RuntimeSettings

pytestmark = pytest.mark.timeout(600)


def _images(base_run, n=16):
    from detect.run_settings import load_run_spec

    spec = load_run_spec(base_run.root)
    paths = sorted(spec.paths.images.glob("*.jpg"))[:n] or sorted(spec.paths.images.iterdir())[:n]
    assert len(paths) >= 8
    return spec, [cv2.imread(str(p)) for p in paths]


@pytest.mark.parametrize("variant,backend", [("model_nonms.onnx", "onnxruntime"), ("model_nonms.pdmodel", "paddle")])
def test_nms_above_the_decision_floor_equals_the_full_nms_on_the_base_detector(base_run, base_export, variant, backend):
    spec, images = _images(base_run)
    det = Detector.from_model(base_export.directory / variant, backend=backend, threads=1)
    assert det.entry.nms == "host" and det.spec.postprocess.score_threshold == pytest.approx(0.01)
    classes = det.classes
    settings = [  # the line's defaults (floor = hard-example low 0.3), a low class threshold, no hard examples
        BoxSettings(),
        BoxSettings(runtime=RuntimeSettings(score_threshold=0.5, class_thresholds={classes[1]: 0.2})),
        BoxSettings(runtime=RuntimeSettings(score_threshold=0.6), report=ReportSettings(hard_examples_per_hour=0)),
    ]
    floors = [decision_floor(s) for s in settings]
    assert floors == pytest.approx([0.3, 0.2, 0.6])
    ng = dropped = kept = 0
    for image in images:
        outputs = det.infer(det.prepare(image))
        full = det.postprocess(outputs)  # the evaluation NMS: every candidate above 0.01, top 1000 per class
        for s, floor in zip(settings, floors):
            fast = det.postprocess(outputs, floor)
            above = full.select(full.scores >= np.float32(floor))
            np.testing.assert_array_equal(fast.scores, above.scores)
            np.testing.assert_array_equal(fast.boxes, above.boxes)
            np.testing.assert_array_equal(fast.class_ids, above.class_ids)
            v_full, v_fast = decide(full, classes, s.runtime), decide(fast, classes, s.runtime)
            assert v_fast.verdict == v_full.verdict
            np.testing.assert_array_equal(v_fast.counted.scores, v_full.counted.scores)
            np.testing.assert_array_equal(v_fast.counted.boxes, v_full.counted.boxes)
            ng += v_full.is_ng
            dropped += len(full) - len(above)
            kept += len(above)
        # a floor above every score of the frame: nothing left, and the verdict is OK
        top = float(full.scores.max()) if len(full) else 0.0
        empty = det.postprocess(outputs, min(1.0, top + 1e-3))
        assert len(empty) == 0
        assert decide(empty, classes, RuntimeSettings(score_threshold=min(1.0, top + 1e-3))).verdict == "OK"
    assert ng >= 1 and kept >= 1  # the check covers NG frames and kept detections ...
    assert dropped > kept  # ... and the floor really removed low-score detections (the full NMS keeps many)


def test_the_floor_keeps_ties_and_the_nms_top_k_cut_as_the_full_nms():
    # random boxes with many tied scores and more candidates than nms_top_k / keep_top_k: same detections above
    from edge_runtime.postprocess import multiclass_nms

    rng = np.random.default_rng(11)
    xy = rng.uniform(0, 300, (3000, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(4, 60, (3000, 2)).astype(np.float32)], axis=1)
    scores = np.round(rng.uniform(0, 1, (4, 3000)), 2).astype(np.float32)  # ties everywhere
    for floor in (0.3, 0.5, 0.97):
        full = multiclass_nms(boxes, scores, 0.01, 0.6, nms_top_k=1000, keep_top_k=100, normalized=False)
        fast = multiclass_nms(boxes, scores, 0.01, 0.6, nms_top_k=1000, keep_top_k=100, normalized=False,
                              min_score=floor)
        above = full.select(full.scores >= np.float32(floor))
        assert json.dumps(fast.to_records(["a", "b", "c", "d"])) == json.dumps(above.to_records(["a", "b", "c", "d"]))
        assert len(above) > 0 or floor > 0.9
