"""drift_reference.json: build from frames, atomic save, load with validation that names the fix."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edge_runtime.drift import SCHEMA, DriftReference, build_reference, load_reference, save_reference
from edge_runtime.drift.synthetic import feature_dicts as _fake_frames
from edge_runtime.drift.synthetic import synthetic_features
from edge_runtime.errors import BundleError, DataError


@pytest.fixture(scope="module")
def reference() -> DriftReference:
    return build_reference(synthetic_features(60, seed=11), class_names=["spot", "scratch", "stain"], meta={"line": "demo"})


def test_build_reference_from_board_frames(reference):
    assert reference.frames == 60 and reference.class_names == ["spot", "scratch", "stain"]
    assert set(reference.continuous) >= {"brightness", "sharpness", "score_max", "n_detections"}
    bright = reference.continuous["brightness"]
    assert bright.samples.size == 60 and bright.mean == pytest.approx(bright.samples.mean())
    mean_ref = reference.continuous["score_mean"]
    assert mean_ref.n_missing == 60 - mean_ref.samples.size  # frames without detections have no mean score
    mix = reference.categorical["class_mix"]
    assert mix.group.labels == ("spot", "scratch", "stain") and mix.counts.sum() > 0
    ng = reference.categorical["ng_rate"]
    assert ng.counts.sum() == 60 and ng.units == 60 and ng.group.labels == ("ok", "ng")
    assert reference.meta["line"] == "demo" and "created" in reference.meta


def test_save_load_round_trip_is_atomic_and_compact(tmp_path, reference):
    path = save_reference(reference, tmp_path / "bundle" / "drift_reference.json")
    assert [p.name for p in path.parent.iterdir()] == ["drift_reference.json"]  # no temp file left
    raw = json.loads(path.read_text())
    assert raw["schema"] == SCHEMA
    back = load_reference(path)
    assert back.frames == reference.frames and back.class_names == reference.class_names
    for name, ref in reference.continuous.items():
        np.testing.assert_allclose(back.continuous[name].samples, ref.samples, rtol=1e-5)
    for name, ref in reference.categorical.items():
        assert back.categorical[name].group == ref.group
        np.testing.assert_array_equal(back.categorical[name].counts, ref.counts)
    assert back.layout == reference.layout


def test_reservoir_keeps_memory_bounded_and_is_seeded():
    a = build_reference(_fake_frames(3000, seed=1), max_samples=500, seed=4)
    b = build_reference(_fake_frames(3000, seed=1), max_samples=500, seed=4)
    s = a.continuous["brightness"]
    assert s.samples.size == 500 and s.n_frames == 3000
    np.testing.assert_array_equal(s.samples, b.continuous["brightness"].samples)
    assert s.samples.mean() == pytest.approx(100, abs=1.0)  # an unbiased sample of the whole stream
    assert s.mean == pytest.approx(100, abs=0.5) and s.std == pytest.approx(5, rel=0.1)


def test_build_reference_refuses_too_few_frames_and_missing_keys():
    with pytest.raises(DataError, match="at least 30 are needed"):
        build_reference(_fake_frames(10))
    with pytest.raises(DataError, match="0 frames given"):
        build_reference(iter([]))
    frames = list(_fake_frames(40))
    del frames[7]["sharpness"]
    with pytest.raises(DataError, match="frame 7: feature 'sharpness' is missing"):
        build_reference(frames)
    with pytest.raises(DataError, match="2 classes but 3 class names"):
        build_reference(_fake_frames(40), class_names=["a", "b", "c"])
    bad = list(_fake_frames(40))
    bad[3]["class_1"] = -1.0
    with pytest.raises(DataError, match="frame 3: counts"):
        build_reference(bad)


def _corrupt(tmp_path, reference, edit):
    raw = reference.to_dict()
    edit(raw)
    path = tmp_path / "drift_reference.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("edit,match", [
    (lambda r: r.update(schema="defectkit.drift_reference/0"), "schema is 'defectkit.drift_reference/0'"),
    (lambda r: r.update(features_version=99), "features version 99"),
    (lambda r: r.pop("frames"), "'frames' is missing"),
    (lambda r: r["continuous"]["brightness"]["samples"].append("x"), "continuous feature 'brightness': 'samples' must be a list of numbers"),
    (lambda r: r["continuous"]["contrast"].update(n_missing=10_000), "n_missing <= n_frames"),
    (lambda r: r["categorical"]["ng_rate"].update(counts=[1.0]), "categorical feature 'ng_rate': 'counts' must hold 2"),
    (lambda r: r["categorical"]["class_mix"].update(labels=["a"]), "'labels' must name 3"),
    (lambda r: r.update(class_names="spot"), "'class_names' must be a list"),
])
def test_load_refuses_a_malformed_reference_naming_file_entry_and_fix(tmp_path, reference, edit, match):
    path = _corrupt(tmp_path, reference, edit)
    with pytest.raises(BundleError, match=match) as info:
        load_reference(path)
    assert str(path) in str(info.value) and "rebuild it with edge_runtime.drift.build_reference" in str(info.value)


def test_load_refuses_missing_file_and_non_json(tmp_path):
    with pytest.raises(BundleError, match="not found; the bundle must ship drift_reference.json"):
        load_reference(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(BundleError, match="not readable JSON"):
        load_reference(tmp_path / "bad.json")
    (tmp_path / "nan.json").write_text('{"schema": "%s", "x": NaN}' % SCHEMA)
    with pytest.raises(BundleError, match="'features_version' is missing"):
        load_reference(tmp_path / "nan.json")


def test_nan_summary_survives_the_round_trip(tmp_path):
    frames = list(_fake_frames(40))
    for f in frames:  # a model that finds nothing on the training images
        f.update(score_max=0.0, score_mean=math.nan, n_detections=0.0, class_0=0.0, class_1=0.0, ng=0.0)
    ref = build_reference(frames)
    assert ref.continuous["score_mean"].samples.size == 0 and math.isnan(ref.continuous["score_mean"].mean)
    back = load_reference(save_reference(ref, tmp_path / "r.json"))
    assert math.isnan(back.continuous["score_mean"].mean) and back.continuous["score_mean"].n_missing == 40
    assert "NaN" not in (tmp_path / "r.json").read_text()  # strict JSON for other readers
