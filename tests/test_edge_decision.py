"""OK/NG decisions: thresholds per class, minimum area, ROI, reasons and config errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from detect.linespec import DEFAULTS_PATH
from edge_runtime.decision import decide
from edge_runtime.settings import BoxSettings, EffectiveSettings, RuntimeSettings, SettingsLayer
from edge_runtime.errors import ConfigError
from edge_runtime.postprocess import Detections

CLASSES = ["scratch", "dent", "stain"]


def _dets():
    boxes = [[10, 10, 20, 20], [100, 100, 140, 150], [0, 0, 3, 3], [300, 300, 340, 340]]
    return Detections.build(np.array(boxes), np.array([0.6, 0.45, 0.9, 0.7]), np.array([0, 1, 2, 1]))


def test_defaults_mirror_the_runtime_section_of_defaults_yaml():
    table = yaml.safe_load(DEFAULTS_PATH.read_text())["runtime"]
    assert RuntimeSettings().to_dict() == table
    assert RuntimeSettings.from_mapping(table) == RuntimeSettings()


def test_default_threshold_counts_scores_from_half():
    v = decide(_dets(), CLASSES, RuntimeSettings())
    assert v.verdict == "NG" and v.is_ng
    assert v.counted.scores.tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert v.mask.tolist() == [True, True, True, False]  # same order as the detections (by score)
    assert v.reason.startswith("3 defect(s): stain 0.90, dent 0.70, scratch 0.60")


def test_class_thresholds_min_area_and_roi_each_filter():
    d = _dets()
    v = decide(d, CLASSES, RuntimeSettings(class_thresholds={"dent": 0.4, "stain": 0.95, "scratch": 0.6}))
    assert sorted(v.counted.scores.tolist()) == pytest.approx([0.45, 0.6, 0.7])  # 0.6 >= 0.6 counts
    v = decide(d, CLASSES, RuntimeSettings(min_area=100))  # stain box is 3x3 = 9 px
    assert v.counted.class_ids.tolist() == [1, 0]
    v = decide(d, CLASSES, RuntimeSettings(roi=(0, 0, 150, 150)))  # centre (320, 320) is outside
    assert v.counted.class_ids.tolist() == [2, 0]
    v = decide(d, CLASSES, RuntimeSettings(score_threshold=0.95, roi=(0, 0, 50, 50)))
    assert v.verdict == "OK" and len(v.counted) == 0
    assert v.reason == "4 detection(s) ignored: 4 below threshold"
    v = decide(d, CLASSES, RuntimeSettings(score_threshold=0.5, min_area=50, roi=(0, 0, 50, 50)))
    assert v.verdict == "NG" and v.counted.class_ids.tolist() == [0]
    v = decide(d, CLASSES, RuntimeSettings(score_threshold=0.5, min_area=200, roi=(0, 0, 50, 50)))
    assert v.reason == "4 detection(s) ignored: 1 below threshold, 2 smaller than min_area, 1 outside ROI"


def test_no_detections_is_ok():
    v = decide(Detections.empty(), CLASSES, RuntimeSettings())
    assert (v.verdict, v.reason, len(v.counted)) == ("OK", "no detections", 0)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"score_treshold": 0.3}, r"unknown key 'runtime.score_treshold'. Did you mean 'score_threshold'\?"),
        ({"score_threshold": 1.5}, r"score_threshold must be a score between 0 and 1 \(got 1.5\)"),
        ({"score_threshold": "high"}, r"'runtime.score_threshold' must be a finite number, got 'high'"),
        ({"class_thresholds": {"dent": -1}}, r"class_thresholds.dent must be a score"),
        ({"roi": [10, 10, 5, 20]}, r"roi \[10, 10, 5, 20\] is empty"),
        ({"roi": [1, 2, 3]}, r"roi must be \[x1, y1, x2, y2\]"),
        ({"min_area": -4}, r"min_area must be >= 0"),
    ],
)
def test_config_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        RuntimeSettings.from_mapping(raw)


def test_unknown_class_names_are_refused_with_a_hint():
    cfg = RuntimeSettings(class_thresholds={"dnet": 0.3})
    with pytest.raises(ConfigError, match=r"'dnet' \(did you mean 'dent'\?\). The model's classes are: scratch, dent"):
        decide(_dets(), CLASSES, cfg)


def test_override_file_and_cli_overrides_over_the_bundle_settings(tmp_path):
    path = tmp_path / "runtime.json"
    path.write_text(json.dumps({"runtime": {"score_threshold": 0.3, "roi": [0, 0, 640, 480],
                                            "class_thresholds": {"dent": 0.2}}}))
    bundle = BoxSettings.from_sections({"runtime": {"min_area": 4.0}}, "bundle")
    eff = EffectiveSettings.resolve(bundle, "bundle x 1", [SettingsLayer.load(path)])
    cfg = eff.settings.runtime
    assert cfg.roi == (0, 0, 640, 480) and cfg.class_thresholds == {"dent": 0.2} and cfg.min_area == 4.0
    assert eff.sources["runtime.min_area"] == "bundle x 1" and eff.sources["runtime.roi"].startswith("settings override")
    over = cfg.with_overrides(score_threshold=0.8, min_area=None)
    assert (over.score_threshold, over.roi, over.min_area) == (0.8, cfg.roi, 4.0)
    path.write_text("[1, 2")
    with pytest.raises(ConfigError, match=r"runtime.json' is not valid JSON"):
        SettingsLayer.load(path)
    with pytest.raises(ConfigError, match=r"settings override file '.*nope.json' cannot be read"):
        SettingsLayer.load(tmp_path / "nope.json")
