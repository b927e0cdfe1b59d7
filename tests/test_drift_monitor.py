"""The drift monitor: the issue's bar on synthetic board streams, hysteresis, settings, snapshot.

Frames come from edge_runtime.drift.synthetic (one board design, per-frame exposure, colour, position
and sensor noise, drawn defects) with model outputs drawn to match; no model runs here.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from edge_runtime.drift import DriftMonitor, DriftReference, DriftSettings, Hysteresis, build_reference
from edge_runtime.drift.monitor import psi_bins
from edge_runtime.drift.synthetic import IN_DISTRIBUTION, SHIFTED, SynthStyle, synthetic_features
from edge_runtime.drift.synthetic import feature_dicts as _fake_frames
from edge_runtime.errors import ConfigError, DataError

CLASSES = ["spot", "scratch", "stain"]
INPUT_SHIFT = ("brightness", "contrast", "mean_b", "mean_g", "mean_r")


@pytest.fixture(scope="module")
def reference() -> DriftReference:
    """What the trainer would ship: the line's training images (seed 1) with the model's detections."""
    return build_reference(synthetic_features(500, seed=1), class_names=CLASSES)


@pytest.fixture(scope="module")
def in_distribution() -> list[dict]:
    """The same line on another day: same generator, new seed, 1000 frames."""
    return list(synthetic_features(1000, seed=2))


def _run(monitor: DriftMonitor, frames) -> list[str]:
    return [monitor.update(f) for f in frames]


def _frames_to_alarm(monitor: DriftMonitor, frames) -> int | None:
    for i, f in enumerate(frames, start=1):
        if monitor.update(f) == "alarm":
            return i
    return None


@pytest.mark.parametrize("settings", [{}, {"correction": "fdr"}, {"eval_every": 1}])
def test_no_alarm_on_1000_in_distribution_frames(reference, in_distribution, settings):
    monitor = DriftMonitor(reference, settings)
    states = _run(monitor, in_distribution)
    assert "alarm" not in states
    if settings.get("eval_every", 10) == 10:  # hysteresis counts evaluations: at eval_every=1 it is 3 frames
        assert states.count("warn") <= 100  # a rare warning is fine; alarms are what page people
    snap = monitor.snapshot()
    assert snap["state"] != "alarm" and snap["frames"] == 1000 and snap["window_frames"] == 200
    assert all(f["state"] != "alarm" for f in snap["features"].values())


def test_shifted_stream_alarms_within_the_window(reference, in_distribution):
    monitor = DriftMonitor(reference)
    _run(monitor, in_distribution[:300])
    assert monitor.state == "none"
    # darker, blurred, and a new defect look (lower scores, more detections, another class mix)
    frames = _frames_to_alarm(monitor, synthetic_features(monitor.settings.window, seed=3, style=SHIFTED))
    assert frames is not None and frames <= monitor.settings.window
    _run(monitor, synthetic_features(100, seed=4, style=SHIFTED))
    alarmed = {n for n, f in monitor.snapshot()["features"].items() if f["state"] == "alarm"}
    assert set(INPUT_SHIFT) | {"sharpness", "score_max", "n_detections"} <= alarmed


@pytest.mark.parametrize("style,expect", [
    (dataclasses.replace(IN_DISTRIBUTION, gain=0.6), {"brightness", "contrast"}),
    (dataclasses.replace(IN_DISTRIBUTION, blur_sigma=2.0), {"sharpness"}),
    # new defect look only; its class mix is diluted by uniform false positives to a warn-level PSI (0.09)
    (dataclasses.replace(SHIFTED, gain=1.0, blur_sigma=0.0), {"score_max", "n_detections"}),
])
def test_each_kind_of_shift_alone_alarms_on_its_features(reference, in_distribution, style: SynthStyle, expect):
    monitor = DriftMonitor(reference)
    _run(monitor, in_distribution[:200])
    states = _run(monitor, synthetic_features(200, seed=9, style=style))
    assert "alarm" in states  # within one window of the change
    alarmed = {n for n, f in monitor.snapshot()["features"].items() if f["state"] == "alarm"}
    assert expect <= alarmed, alarmed


def test_class_mix_and_ng_rate_alarm_through_the_categorical_detector():
    ref = build_reference(_fake_frames(1000, seed=1))
    monitor = DriftMonitor(ref)
    _run(monitor, _fake_frames(200, seed=2))
    assert monitor.state == "none"
    shifted = []
    for f in _fake_frames(200, seed=3):  # every class-0 detection now comes out as class 1, the brightness stays
        f["class_1"] += f["class_0"]
        f["class_0"] = 0.0
        shifted.append(f)
    states = _run(monitor, shifted)
    assert "alarm" in states and monitor.snapshot()["features"]["class_mix"]["state"] == "alarm"
    assert monitor.snapshot()["features"]["brightness"]["state"] == "none"
    monitor.reset()
    rng = np.random.default_rng(4)
    more_ng = [dict(f, ng=float(rng.random() < 0.8)) for f in _fake_frames(200, seed=5)]
    _run(monitor, more_ng)
    ng = monitor.snapshot()["features"]["ng_rate"]
    assert ng["state"] == "alarm" and ng["window_mean"] == pytest.approx(0.8, abs=0.08)  # reference 0.43


def test_hysteresis_state_machine():
    h = Hysteresis(3)
    assert [h.step(lv) for lv in (2, 0, 2, 0, 2, 2)] == ["none"] * 6  # alternating: never enters
    assert h.step(2) == "alarm"  # third consecutive alarm-level evaluation
    assert [h.step(lv) for lv in (1, 1, 1, 1)] == ["alarm"] * 4  # the warn band holds the alarm
    assert [h.step(lv) for lv in (0, 0, 1, 0, 0)] == ["alarm"] * 5  # two clear then not: still alarm
    assert h.step(0) == "none"  # three consecutive below warn
    assert [h.step(lv) for lv in (1, 2, 1)] == ["none", "none", "warn"]
    assert [h.step(lv) for lv in (0, 0, 0)] == ["warn", "warn", "none"]
    assert [Hysteresis(1).step(lv) for lv in (2,)] == ["alarm"]


def _boundary_stream(delta: float, n: int, seed: int):
    """A line whose brightness sits right at the alarm boundary (a 0.3 sigma shift on a 200-frame window)."""
    for f in _fake_frames(n, seed=seed):
        f["brightness"] += delta
        yield f


@pytest.mark.parametrize("seed", [5, 6])
def test_hysteresis_keeps_a_boundary_feature_from_flapping(seed):
    ref = build_reference(_fake_frames(2000, seed=1))
    frames = list(_boundary_stream(1.5, 3000, seed))

    def alarm_entries(settings) -> int:
        states = _run(DriftMonitor(ref, settings, features=["brightness"]), frames)
        return sum(1 for a, b in zip(states, states[1:]) if b == "alarm" and a != "alarm")

    flapping = alarm_entries({"hysteresis": 1, "psi_warn": 0.25, "ks_p_warn": 0.001})  # no hysteresis at all
    steady = alarm_entries({})  # defaults: 3 evaluations in, 3 below the warn level out
    assert flapping >= 10
    assert 1 <= steady <= 2


def test_bonferroni_multiplies_p_values_by_the_number_of_tested_features(reference, in_distribution):
    plain = DriftMonitor(reference, {"correction": "none"})
    bonf = DriftMonitor(reference)
    _run(plain, in_distribution[:200])
    _run(bonf, in_distribution[:200])
    a, b = plain.snapshot()["features"], bonf.snapshot()["features"]
    tested = [n for n, f in b.items() if f.get("p_adj") is not None]
    assert len(tested) == 12  # 10 continuous (score_mean has enough values) + class_mix + ng_rate
    for name in tested:
        raw = a[name]["p_adj"]
        assert raw == (a[name]["ks_p"] if a[name]["kind"] == "continuous" else a[name]["chi2_p"])
        assert b[name]["p_adj"] == pytest.approx(min(1.0, raw * len(tested)))


def test_snapshot_is_json_and_has_the_report_schema(reference, in_distribution):
    monitor = DriftMonitor(reference)
    empty = monitor.snapshot()
    assert empty["state"] == "none" and empty["evaluations"] == 0
    assert empty["features"]["brightness"]["psi"] is None
    _run(monitor, in_distribution[:150])
    snap = json.loads(json.dumps(monitor.snapshot(), allow_nan=False))
    assert snap["evaluations"] == 6  # frames 100, 110, ..., 150
    for name, f in snap["features"].items():
        assert {"state", "psi", "ks_stat", "ks_p", "window_mean", "ref_mean"} <= set(f), name
        assert f["state"] in ("none", "warn", "alarm")
    bright = snap["features"]["brightness"]
    assert bright["ref_mean"] == pytest.approx(reference.continuous["brightness"].mean, rel=1e-6)
    assert abs(bright["window_mean"] - bright["ref_mean"]) < 2.0 and 0 <= bright["ks_stat"] <= 1
    mix = snap["features"]["class_mix"]
    assert set(mix["window_shares"]) == set(CLASSES) and mix["ks_p"] is None and 0 <= mix["chi2_p"] <= 1
    assert snap["features"]["ng_rate"]["window_mean"] == pytest.approx(
        np.mean([f["ng"] for f in in_distribution[:150]]))


def test_reset_forgets_window_and_states(reference):
    monitor = DriftMonitor(reference)
    _run(monitor, synthetic_features(160, seed=5, style=SHIFTED))
    assert monitor.state == "alarm"
    monitor.reset()
    assert monitor.state == "none" and monitor.snapshot()["window_frames"] == 0


def test_settings_equal_the_defaults_table_and_refuse_bad_values():
    from detect.linespec import load_table  # the trainer side; the box has no YAML

    assert dataclasses.asdict(DriftSettings()) == load_table()["drift"]
    with pytest.raises(ConfigError, match="unknown key 'drift.windw'. Did you mean 'window'"):
        DriftSettings.from_mapping({"windw": 100})
    with pytest.raises(ConfigError, match="'drift.window' must be a whole number"):
        DriftSettings.from_mapping({"window": "200"})
    with pytest.raises(ConfigError, match="psi_warn <= psi_alarm"):
        DriftSettings.from_mapping({"psi_warn": 0.3, "psi_alarm": 0.2})
    with pytest.raises(ConfigError, match="correction must be one of bonferroni, fdr, none"):
        DriftSettings.from_mapping({"correction": "holm"})
    with pytest.raises(ConfigError, match="min_frames must be between 1 and window=50"):
        DriftSettings.from_mapping({"window": 50})
    assert DriftSettings.from_mapping({"psi_alarm": 1}).psi_alarm == 1.0  # ints are fine for floats


def test_monitor_errors_name_the_feature(reference, in_distribution):
    monitor = DriftMonitor(reference)
    frame = dict(in_distribution[0])
    del frame["class_2"]
    with pytest.raises(DataError, match="frame 0: feature 'class_2' is missing"):
        monitor.update(frame)
    with pytest.raises(DataError, match=r"frame 0: features must be numbers, got \{'brightness': 'dark'\}"):
        monitor.update(dict(in_distribution[0], brightness="dark"))
    assert monitor.frames == 0  # a refused frame leaves the window untouched
    with pytest.raises(ConfigError, match=r"unknown features \['focus'\]"):
        DriftMonitor(reference, features=["focus", "brightness"])


def test_psi_bins_keep_sampling_noise_below_a_quarter_of_the_warn_level():
    assert psi_bins(200, 2000, 0.1, 10) == 5
    assert psi_bins(100, 500, 0.1, 10) == 3
    assert psi_bins(2000, 100_000, 0.1, 10) == 10
    assert psi_bins(30, 50, 0.1, 10) == 2
