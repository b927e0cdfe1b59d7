"""The inspection loop on a real signed bundle (small real ONNX model): outputs, reports, hard examples,
drift alarms, spool full, settings mirror and error messages."""
from __future__ import annotations

import csv
import dataclasses
import json
import re
import sqlite3
import urllib.request

import numpy as np
import pytest
import yaml

from detect.linespec import DEFAULTS_PATH
from edge_runtime.cli import main as edge_main
from edge_runtime.drift.synthetic import IN_DISTRIBUTION, SHIFTED, BoardStream
from edge_runtime.errors import ConfigError
from edge_runtime.wire_report import validate_report
from edge_runtime.run import Inspector
from edge_runtime.runconfig import RunOptions
from edge_runtime.settings import BoxSettings, ReportSettings, SettingsLayer
from edge_runtime.spool import Spool
from tests.runkit import FakeCapture, FakeCameraFactory, make_bundle, make_keys, write_images

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    base = tmp_path_factory.mktemp("runloop")
    keys = make_keys(base)
    return {"base": base, "keys": keys, "bundle": make_bundle(base, keys)}


def _opts(kit, tmp_path, source, **kw) -> RunOptions:
    kw.setdefault("metrics_port", -1)
    return RunOptions(bundle=kit["bundle"], public_key=kit["keys"].public, source=str(source), device_id="box-1",
                      out_dir=tmp_path / "out", **kw)


def _lines(out):
    (path,) = sorted((out / "predictions").glob("*.jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines()]


def _spooled(state_dir, kind="report"):
    with sqlite3.connect(str(state_dir / "spool.db")) as conn:
        rows = conn.execute("SELECT payload, meta, alarm FROM items WHERE kind = ? ORDER BY id", (kind,)).fetchall()
    return rows


def test_report_settings_mirror_the_report_section_of_defaults_yaml():
    table = yaml.safe_load(DEFAULTS_PATH.read_text())["report"]
    assert dataclasses.asdict(ReportSettings()) == table
    assert ReportSettings.from_mapping(table) == ReportSettings()


def test_settings_file_errors_name_the_key_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section 'reprot'\. Did you mean 'report'\?"):
        SettingsLayer.checked({"reprot": {}}, "test")
    with pytest.raises(ConfigError, match=r"unknown key 'report\.interval'\. Did you mean 'interval_s'\?"):
        SettingsLayer.checked({"report": {"interval": 5}}, "test")
    with pytest.raises(ConfigError, match=r"need 0 <= hard_example_low < hard_example_high <= 1"):
        ReportSettings.from_mapping({"hard_example_low": 0.8, "hard_example_high": 0.2})
    with pytest.raises(ConfigError, match=r"'report\.hard_examples_per_hour' must be a whole number, got 2\.5"):
        ReportSettings.from_mapping({"hard_examples_per_hour": 2.5})
    bad = tmp_path / "s.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"settings override file '.*s\.json' is not valid JSON"):
        SettingsLayer.load(bad)
    s = BoxSettings.from_sections({"runtime": {"score_threshold": 0.4}, "drift": {"window": 50, "min_frames": 20},
                                   "report": {"interval_s": 5}}, "test")
    assert (s.runtime.score_threshold, s.drift.window, s.report.interval_s) == (0.4, 50, 5.0)


def test_folder_run_one_line_per_image_ng_images_summary_and_report(kit, tmp_path):
    imgs = tmp_path / "imgs"
    reds = [30, 240, 60, 220, 35, 250]  # dark red -> OK, bright red -> NG (scores follow the red channel)
    write_images(imgs, reds)
    (imgs / "corrupt.png").write_bytes(b"\x00\x17 not an image " * 20)
    good = (imgs / "part_0001.png").read_bytes()
    (imgs / "truncated.png").write_bytes(good[: len(good) // 2])
    (imgs / "empty.jpg").write_bytes(b"")
    summary = Inspector(_opts(kit, tmp_path, imgs)).run()
    assert (summary.frames, summary.ok, summary.ng, summary.errors) == (9, 3, 3, 3)
    lines = _lines(tmp_path / "out")
    assert len(lines) == 9 and sorted(r["source"] for r in lines) == sorted(str(p) for p in imgs.iterdir())
    errors = {r["source"].rsplit("/", 1)[1]: r["error"] for r in lines if "error" in r}
    assert errors == {"corrupt.png": "not a decodable image (corrupt or unknown format)",
                      "truncated.png": "truncated PNG (no IEND chunk)", "empty.jpg": "empty file"}
    verdicts = {r["source"].rsplit("/", 1)[1]: r["verdict"] for r in lines if "verdict" in r}
    assert verdicts == {f"part_{i:04d}.png": ("NG" if red > 200 else "OK") for i, red in enumerate(reds)}
    ng = [r for r in lines if r.get("verdict") == "NG"]
    assert all(r["bundle_version"] == "1.0.0" and set(r["latency_ms"]) >= {"decode", "pre", "infer", "post", "drift",
                                                                             "report", "total"} for r in ng)
    ng_files = sorted((tmp_path / "out" / "ng").rglob("*.jpg"))
    assert len(ng_files) == 3 and sorted(r["ng_image"] for r in ng) == [str(p) for p in ng_files]
    (csv_path,) = (tmp_path / "out" / "summary").glob("*.csv")
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 1 and (rows[0]["frames"], rows[0]["ok"], rows[0]["ng"], rows[0]["errors"]) == ("9", "3", "3", "3")
    assert rows[0]["ng_rate"] == "0.5" and rows[0]["bundle_version"] == "1.0.0"
    reports = [json.loads(p) for p, _m, _a in _spooled(tmp_path / "out" / "state")]
    assert len(reports) == 1  # the last, partial window is spooled at the end
    rep = validate_report(reports[0])
    assert rep["counts"] == {"frames": 9, "ok": 3, "ng": 3, "errors": 3, "per_class": {"short": 3, "open": 3}}
    assert rep["bundle_version"] == "1.0.0" and rep["line"] == "test-line" and rep["device_id"] == "box-1"
    assert rep["health"]["backend"] == "onnxruntime" and "brightness" in rep["drift"]["features"]
    state = json.loads((tmp_path / "out" / "state" / "state.json").read_text())
    assert state["last_exit"] == "clean" and state["current"] == "1.0.0"


def test_hard_examples_in_the_score_band_are_spooled_rate_limited(kit, tmp_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, [128] * 6 + [30, 250])  # red 128 -> top score ~0.5: in the band [0.3, 0.7)
    Inspector(_opts(kit, tmp_path, imgs, overrides={"report": {"hard_examples_per_hour": 4}})).run()
    hard = _spooled(tmp_path / "out" / "state", "hard_example")
    assert len(hard) == 4  # six frames in the band, four per hour allowed
    meta = json.loads(hard[0][1])
    assert 0.3 <= meta["max_score"] < 0.7 and meta["bundle_version"] == "1.0.0" and meta["source"].endswith(".png")
    assert hard[0][0][:3] == b"\xff\xd8\xff"  # a JPEG of the frame


def _camera(stream_style, n, seed):
    """A fake camera (no camera here) that shows ``n`` synthetic board frames, then drops for good."""
    stream = BoardStream(stream_style, seed=seed, size=160)
    return FakeCapture(script=[stream.next().image for _ in range(n)])


def test_drift_alarm_only_on_the_shifted_stream_and_reported_at_once(kit, tmp_path):
    # 600 in-distribution frames, then the camera "drops" and comes back showing a shifted line
    # (darker, blurred, other defects): the alarm report is spooled at once, not at the report interval.
    factory = FakeCameraFactory([_camera(IN_DISTRIBUTION, 600, 7), _camera(SHIFTED, 300, 8)])
    overrides = {"drift": {"window": 100, "min_frames": 50}, "report": {"interval_s": 3600.0}}
    opts = _opts(kit, tmp_path, "0", overrides=overrides, capture_factory=factory, max_frames=900)
    ins = Inspector(opts, drop_late_frames=False)  # the scripted camera is replayed frame by frame, none dropped
    summary = ins.run()  # its speed is measured in bench/edge_loop.py, not limited here
    assert summary.frames == 900 and ins.monitor.settings.window == 100
    lines = _lines(tmp_path / "out")
    states = [r["drift_state"] for r in lines]
    assert "alarm" not in states[:600]  # no alarm on the in-distribution stream
    first_alarm = states.index("alarm")
    assert 600 < first_alarm <= 700  # within the configured window of 100 frames after the shift
    reports = [(json.loads(p), a) for p, _m, a in _spooled(tmp_path / "out" / "state")]
    assert len(reports) == 2  # the alarm report, then the final partial window
    alarm, flag = reports[0]
    assert flag == 1 and alarm["alarm"] is True and alarm["drift"]["state"] == "alarm"
    assert alarm["counts"]["frames"] == first_alarm + 1
    in_alarm = {k for k, f in alarm["drift"]["features"].items() if f["state"] == "alarm"}
    assert in_alarm and in_alarm <= {"brightness", "contrast", "sharpness", "saturation", "mean_b", "mean_g", "mean_r"}
    final = reports[1][0]  # 200 shifted frames later: darker and blurred both in alarm
    assert {"brightness", "sharpness"} <= {k for k, f in final["drift"]["features"].items() if f["state"] == "alarm"}
    assert alarm["health"]["camera_drops"] == 1 and alarm["health"]["camera_reconnects"] == 1


def test_full_spool_is_reported_while_inspection_continues(kit, tmp_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, [30, 250] * 15)
    overrides = {"report": {"interval_s": 1e-9}}  # a report after every frame (the pipelined loop can take < 1 ms)
    ins = Inspector(_opts(kit, tmp_path, imgs, overrides=overrides, metrics_port=0))

    def fill_disk(_stages):
        # No small filesystem can be mounted here: SQLite's page limit gives the very "database or disk is
        # full" error of a full disk (as in test_spool_durability).
        if ins.summary.frames == 5:
            pages = ins.spool._conn.execute("PRAGMA page_count").fetchone()[0]
            ins.spool._conn.execute(f"PRAGMA max_page_count = {pages}")

    scraped = {}

    def scrape(_stages):  # while the loop runs: the local health endpoint says what is wrong
        if ins.summary.frames == 20:
            url = f"http://127.0.0.1:{ins._server.port}"
            with urllib.request.urlopen(url + "/healthz", timeout=5) as resp:
                scraped["health"] = (resp.status, json.loads(resp.read()))
            with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
                scraped["metrics"] = resp.read().decode()

    ins.frame_hooks += [fill_disk, scrape]
    summary = ins.run()
    assert summary.frames == 30 and summary.ok + summary.ng == 30  # every frame inspected
    assert len(_lines(tmp_path / "out")) == 30
    assert summary.spool_errors >= 20
    status, body = scraped["health"]
    assert status == 200 and body["status"] == "ok"  # degraded, but inspecting
    assert body["spool_full"] is True and "is full" in body["spool_error"] and "inspection continues" in body["spool_error"]
    assert float(re.search(r"^defectkit_spool_errors (\S+)$", scraped["metrics"], re.M).group(1)) >= 10
    assert 'defectkit_frames_total{verdict="OK"}' in scraped["metrics"]


def test_cli_errors_are_one_line_with_exit_codes(kit, tmp_path, capsys):
    base = ["run", "--bundle", str(kit["bundle"]), "--public-key", str(kit["keys"].public), "--metrics-port", "-1",
            "--out", str(tmp_path / "out")]
    assert edge_main(base + ["--source", str(tmp_path), "--device-id", "bad id"]) == 2
    assert "device id 'bad id' is not usable" in capsys.readouterr().err
    assert edge_main(base + ["--source", str(tmp_path), "--device-id", "b", "--collector", "http://127.0.0.1:9"]) == 2
    assert "--collector needs the device's token: pass --token-file FILE" in capsys.readouterr().err
    assert edge_main(base + ["--source", str(tmp_path / "nope"), "--device-id", "b"]) == 2
    assert "source '" in capsys.readouterr().err
    wrong = ["run", "--bundle", str(kit["bundle"]), "--public-key", str(tmp_path / "none.pem"), "--source", "x",
             "--device-id", "b"]
    assert edge_main(wrong) == 4
    assert "cannot read the public key" in capsys.readouterr().err
    settings = tmp_path / "s.json"
    settings.write_text(json.dumps({"runtime": {"class_thresholds": {"shrot": 0.3}}}))
    write_images(tmp_path / "imgs", [30])
    args = base + ["--source", str(tmp_path / "imgs"), "--device-id", "b", "--settings-override", str(settings)]
    assert edge_main(args) == 2
    err = capsys.readouterr().err
    assert "'shrot' (did you mean 'short'?)" in err and "settings override file" in err
    settings.write_text(json.dumps({"runtime": {"score_treshold": 0.3}}))  # refused before any bundle is loaded
    assert edge_main(args) == 2
    err = capsys.readouterr().err
    assert "unknown key 'runtime.score_treshold'. Did you mean 'score_threshold'?" in err and len(err.splitlines()) == 1
    settings.write_text(json.dumps({"drift": {"window": 30}}))  # fits the keys, breaks min_frames <= window
    assert edge_main(args) == 2
    assert "min_frames must be between 1 and window=30" in capsys.readouterr().err
