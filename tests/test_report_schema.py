"""Report schema and builder, hard-example sampler and metadata: the contract both sides validate with."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from edge_runtime.errors import UserInputError
from edge_runtime.hard_examples import (
    HardExampleSampler, SCHEMA as HE_SCHEMA, encode_jpeg, hard_example_errors, spool_hard_example,
    validate_hard_example_meta,
)
from edge_runtime.report_builder import ReportBuilder
from edge_runtime.wire_report import (
    SCHEMA, Drift, Report, ReportSchemaError, parse_utc, report_errors, utc_iso, validate_report,
)
from edge_runtime.spool import Spool


class FakeClock:
    """A settable clock: the rate limit spans an hour, which a test cannot wait for."""

    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _valid() -> dict:
    b = ReportBuilder(device_id="press-01", line="line-a", bundle_version="1.2.0")
    b.record_frame(ng=False, latency_ms=10.0)
    return b.build().to_dict()


def test_builder_counts_latency_window_and_round_trip(tmp_path):
    clock = FakeClock()
    b = ReportBuilder(device_id="press-01", line="line-a", bundle_version="1.2.0", spool_dir=tmp_path, clock=clock)
    for i in range(1, 101):  # latencies 1..100 ms
        b.record_frame(ng=i % 10 == 0, classes=["scratch"] if i % 10 == 0 else [], latency_ms=float(i))
    b.record_error()
    clock.t += 60.0
    r = b.build(drift={"brightness": {"state": "warn", "psi": np.float32(0.12), "ks_p": 0.03, "mean": np.float64(97.5)},
                       "sharpness": {"state": "none", "psi": 0.01, "ks_p": 0.8}})
    d = r.to_dict()
    assert d["schema"] == SCHEMA and len(d["id"]) == 32
    assert d["counts"] == {"frames": 101, "ok": 90, "ng": 10, "errors": 1, "per_class": {"scratch": 10}}
    assert d["health"]["latency_ms_p50"] == pytest.approx(50.5)
    assert d["health"]["latency_ms_p95"] == pytest.approx(95.05)
    assert d["health"]["disk_free_mb"] > 0
    assert d["drift"]["state"] == "warn" and d["alarm"] is False
    assert d["drift"]["features"]["brightness"]["mean"] == 97.5
    assert parse_utc(d["window"]["end"]).timestamp() - parse_utc(d["window"]["start"]).timestamp() == pytest.approx(60)
    json.dumps(d, allow_nan=False)  # numpy scalars became plain numbers
    assert Report.from_dict(json.loads(json.dumps(d))).to_dict() == d
    # build() starts a new window
    d2 = b.build().to_dict()
    assert d2["counts"]["frames"] == 0 and d2["id"] != d["id"] and d2["window"]["start"] == d["window"]["end"]


def test_alarm_follows_drift_and_spool_counters(tmp_path):
    spool = Spool(tmp_path / "s.db", max_bytes=250)
    for i in range(5):
        spool.put("report", b"x" * 100, key=f"k{i}")  # cap 250 bytes: 3 of 5 dropped
    b = ReportBuilder(device_id="press-01", line="line-a", bundle_version="1")
    r = b.build(drift=Drift.from_features({"f": {"state": "alarm", "psi": 0.5, "ks_p": 1e-6}}), spool=spool).to_dict()
    assert r["alarm"] is True and r["drift"]["state"] == "alarm"
    assert r["health"]["spool_dropped"] == 3 and r["health"]["spool_pending"] == 2
    assert b.build(spool=spool).to_dict()["health"]["spool_dropped"] == 0  # counted once
    assert b.build(alarm=True).to_dict()["alarm"] is True  # e.g. an NG-rate alarm without drift


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("health"), "missing keys: health"),
    (lambda d: d.update(extra=1), "unknown keys: extra"),
    (lambda d: d.update(schema="defectkit.report/0"), "schema must be 'defectkit.report/1'"),
    (lambda d: d.update(id="not-a-uuid"), "id must be 32 lowercase hex"),
    (lambda d: d.update(device_id="../etc"), "device_id must be 1-64 characters"),
    (lambda d: d["counts"].update(ok=5), "must equal counts.frames"),
    (lambda d: d["counts"].update(ng=-1), "counts.ng must be a non-negative integer"),
    (lambda d: d["counts"]["per_class"].update(scratch=1.5), "counts.per_class['scratch']"),
    (lambda d: d["window"].update(start="2026-01-01T10:00:00"), "window.start must be an ISO 8601 UTC"),
    (lambda d: d["window"].update(start="2099-01-01T10:00:00Z"), "is before window.start"),
    (lambda d: d["drift"].update(state="bad"), "drift.state must be one of none|warn|alarm"),
    (lambda d: d["drift"].update(state="alarm"), "alarm must be true when drift.state is 'alarm'"),
    (lambda d: d["drift"]["features"].update(f={"state": "alarm", "psi": 1.0, "ks_p": None}),
     "drift.state must be 'alarm' when feature 'f' is in alarm"),
    (lambda d: d["drift"]["features"].update(f={"state": "none", "psi": float("nan"), "ks_p": None}),
     "drift.features['f'].psi must be a finite number"),
    (lambda d: d["health"].pop("uptime_s"), "health.uptime_s is missing"),
    (lambda d: d["health"].update(spool_dropped=-2), "health.spool_dropped must be a non-negative integer"),
    (lambda d: d.update(alarm="yes"), "alarm must be true or false"),
])
def test_validation_names_each_problem(mutate, message):
    d = _valid()
    assert report_errors(d) == []
    bad = copy.deepcopy(d)
    mutate(bad)
    errs = report_errors(bad)
    assert any(message in e for e in errs), errs
    with pytest.raises(ReportSchemaError, match="does not follow defectkit.report/1"):
        validate_report(bad)


def test_validation_of_non_objects_and_many_errors_at_once():
    assert report_errors([1, 2]) == ["a report must be a JSON object, got list"]
    errs = report_errors({"schema": SCHEMA})
    assert len(errs) == 1 and errs[0].startswith("missing keys: id, device_id, line")
    assert ReportSchemaError.exit_code == 2  # a UserInputError: the CLI says what to fix


def test_builder_refuses_unusable_names_and_times():
    with pytest.raises(UserInputError, match="device_id 'press 01' is not usable"):
        ReportBuilder(device_id="press 01", line="a", bundle_version="1")
    from datetime import datetime

    with pytest.raises(UserInputError, match="has no time zone"):
        utc_iso(datetime(2026, 1, 1))
    assert utc_iso(0.0) == "1970-01-01T00:00:00.000Z"


def test_sampler_band_and_hourly_rate_limit():
    clock = FakeClock(0.0)
    s = HardExampleSampler(0.3, 0.7, max_per_hour=3, clock=clock)
    assert not s.should_sample(0.95) and not s.should_sample(0.1) and not s.should_sample(0.7)
    taken = [s.should_sample(0.5) for _ in range(5)]
    assert taken == [True, True, True, False, False] and s.rate_limited == 2
    clock.t += 3599.0
    assert not s.should_sample(0.5)
    clock.t += 1.0  # the first three leave the one-hour window
    assert s.should_sample(0.31)
    with pytest.raises(UserInputError, match=r"band \[0.7, 0.3\) is not usable"):
        HardExampleSampler(0.7, 0.3, 10)


def test_hard_example_spooled_as_jpeg_with_valid_metadata(tmp_path):
    spool = Spool(tmp_path / "s.db")
    frame = np.full((48, 64, 3), 128, np.uint8)
    s = HardExampleSampler(0.3, 0.7, max_per_hour=10)
    dets = [{"class": "scratch", "score": np.float32(0.55), "box": [1, 2, 30, 40]}]
    hid = s.offer(spool, image=frame, detections=dets, device_id="press-01", line="line-a", bundle_version="1")
    assert hid is not None
    assert s.offer(spool, image=frame, detections=[{"class": "scratch", "score": 0.9, "box": [0, 0, 1, 1]}],
                   device_id="press-01", line="line-a", bundle_version="1") is None
    (item,) = spool.pending()
    assert item.kind == "hard_example" and item.key == hid and item.payload[:2] == b"\xff\xd8"
    assert item.meta["schema"] == HE_SCHEMA and item.meta["width"] == 64 and item.meta["height"] == 48
    assert item.meta["max_score"] == pytest.approx(0.55) and hard_example_errors(item.meta) == []
    assert encode_jpeg(b"\xff\xd8raw") == b"\xff\xd8raw"
    with pytest.raises(UserInputError, match="unknown keys: colour"):
        validate_hard_example_meta({**item.meta, "colour": "red"})
    hid2 = spool_hard_example(spool, image=b"\xff\xd8jpeg", detections=[], device_id="press-01", line="line-a",
                              bundle_version="1", source="cam0", verdict="OK")
    assert spool.pending()[1].meta["source"] == "cam0" and spool.pending()[1].key == hid2


def test_hard_example_meta_errors():
    errs = hard_example_errors({"schema": HE_SCHEMA, "id": "x", "device_id": "d/1", "line": "l", "bundle_version": "1",
                                "time": "yesterday", "max_score": 3, "detections": [{"class": 1}]})
    text = "; ".join(errs)
    for part in ("id must be 32", "device_id must be", "time must be ISO 8601", "max_score must be a number in [0, 1]",
                 "detections[0] must be"):
        assert part in text
