"""Golden-image self-test: matching within tolerance, both expected-output forms, and what it refuses."""
from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.bundle import verify_bundle
from edge_runtime.errors import BundleError, ConfigError, ModelError
from edge_runtime.postprocess import Detections
from edge_runtime.selftest import Tolerance, choose_model, compare, parse_expected, self_test
from edge_runtime.bundle_manager import BundleManager
from tests.runkit import CLASSES, make_bundle, make_keys

pytestmark = pytest.mark.timeout(60)


def _dets(rows):
    rows = np.array(rows, np.float32).reshape(-1, 6)
    return Detections.build(rows[:, 2:], rows[:, 1], rows[:, 0].astype(np.int64))


def test_compare_tolerates_small_differences_and_names_real_ones():
    tol = Tolerance(score=0.05, box_px=2.0, box_rel=0.05, min_score=0.3)
    expected = _dets([[0, 0.9, 10, 10, 50, 50], [1, 0.6, 100, 100, 120, 140], [0, 0.1, 0, 0, 5, 5]])
    same = _dets([[0, 0.93, 11, 9, 51, 50], [1, 0.57, 100, 101, 121, 140], [1, 0.12, 7, 7, 9, 9]])
    assert compare(expected, same, tol) == []  # the 0.1 leftovers differ but are below min_score
    moved = _dets([[0, 0.9, 10, 10, 60, 50], [1, 0.6, 100, 100, 120, 140]])
    assert compare(expected, moved, tol) == [
        "expected class 0 score 0.900 at [10.0, 10.0, 50.0, 50.0] is missing",
        "unexpected class 0 score 0.900 at [10.0, 10.0, 60.0, 50.0]",
    ]
    wrong_class = _dets([[1, 0.9, 10, 10, 50, 50], [1, 0.6, 100, 100, 120, 140]])
    assert len(compare(expected, wrong_class, tol)) == 2
    weaker = _dets([[0, 0.7, 10, 10, 50, 50], [1, 0.6, 100, 100, 120, 140]])
    assert compare(expected, weaker, tol)[0].startswith("expected class 0 score 0.900")
    near_floor = _dets([[0, 0.9, 10, 10, 50, 50], [1, 0.6, 100, 100, 120, 140], [0, 0.32, 70, 70, 80, 80]])
    assert compare(expected, near_floor, tol) == []  # 0.32 < min_score + score: may appear on one side only


def test_expected_outputs_in_both_forms_and_malformed_ones():
    rec = {"schema": "defectkit.golden/1", "detections": [
        {"class_id": 1, "class": "open", "score": 0.8, "box": [1, 2, 3, 4]}, {"class": "short", "score": 0.5,
                                                                            "box": [5, 6, 7, 8]}]}
    d = parse_expected(rec, CLASSES, "g.json")
    assert d.class_ids.tolist() == [1, 0] and d.scores.tolist() == pytest.approx([0.8, 0.5])
    rows = parse_expected({"boxes": [[0, 0.9, 1, 2, 3, 4]]}, CLASSES, "g.json")
    assert rows.boxes.tolist() == [[1, 2, 3, 4]] and rows.class_ids.tolist() == [0]
    with pytest.raises(BundleError, match=r"g\.json: golden expected output is malformed .*\[class, score, x1"):
        parse_expected({"boxes": [[0, 0.9, 1, 2]]}, CLASSES, "g.json")
    with pytest.raises(BundleError, match=r"g\.json: golden expected output is malformed .*'detections'"):
        parse_expected([1, 2], CLASSES, "g.json")
    with pytest.raises(BundleError, match="golden class id 5 is outside the bundle's 2 classes"):
        parse_expected({"boxes": [[5, 0.9, 1, 2, 3, 4]]}, CLASSES, "g.json")


def test_a_bundle_without_golden_images_is_not_started(tmp_path):
    keys = make_keys(tmp_path)
    bundle = make_bundle(tmp_path, keys, golden_reds=())
    report = self_test(verify_bundle(bundle, keys.public))
    assert not report.ok and "has no golden images: rebuild it with 'defectkit bundle build --golden" in report.line()
    with pytest.raises(BundleError, match="nothing was tested .*no golden images"):
        BundleManager(tmp_path / "state", keys.public).start(bundle)


def test_backend_choice_errors_name_what_is_runnable(tmp_path):
    keys = make_keys(tmp_path)
    manifest = verify_bundle(make_bundle(tmp_path, keys), keys.public)
    assert choose_model(manifest)[0] == "onnxruntime"
    with pytest.raises(ConfigError, match="unknown backend 'onnxrt'"):
        choose_model(manifest, "onnxrt")
    with pytest.raises(ModelError, match=r"backend 'paddle' has no model in this bundle \(it has onnx/any\).*"
                                         r"Runnable here: onnxruntime"):
        choose_model(manifest, "paddle")
