"""The box runs on the line's settings from the verified bundle manifest (flags and an override file on top),
shows them with their sources while it runs, switches to a new bundle's settings at an update, refuses a bundle
whose settings are missing or malformed while the old one keeps inspecting, and counts frames and latency the
same way in the CSV summary, the report and /metrics."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from compress.bundle import ModelFile
from edge_runtime.bundle import verify_bundle
from edge_runtime.errors import BundleError
from edge_runtime.run import EFFECTIVE_SETTINGS, Inspector
from edge_runtime.runconfig import RunOptions
from edge_runtime.settings import BoxSettings
from tests.runkit import (BASE_SCORES, BOXES, CLASSES, FakeCameraFactory, FakeCapture, archive_of, make_bundle,
                          make_keys, red_image, resign_bundle, write_images)
from tests.test_edge_onnx_models import build_raw_model, write_deploy

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[1]
# short scores ~ red / 255: red 100 gives ~0.39, between this line's class threshold (0.3) and the default (0.5)
LINE = {"runtime": {"class_thresholds": {"short": 0.3, "open": 0.95}}, "drift": {"window": 60, "min_frames": 30}}


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    base = tmp_path_factory.mktemp("runsettings")
    keys = make_keys(base)
    line = BoxSettings.from_sections(LINE, "test line")
    v1 = make_bundle(base, keys, "1.0.0", settings=line)
    v2 = make_bundle(base, keys, "1.0.1", parent="1.0.0")  # the default settings: red 100 is OK again
    return {"base": base, "keys": keys, "v1": v1, "v2": v2}


def _wait(pred, what, timeout=60.0, proc=None):
    """Until ``pred()`` holds (a condition, not a speed limit: the timeout only ends a hung run)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the box exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _get(url):
    """The body, also of a 503 (/healthz while the box is still starting)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.read().decode()


def _metric(text, name):
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return None if m is None else float(m.group(1))


def _lines(out):
    (path,) = sorted((out / "predictions").glob("*.jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_running_box_shows_and_uses_the_bundle_settings_with_the_flags_on_top(kit, tmp_path):
    imgs = tmp_path / "imgs"
    reds = [100, 40] * 35  # 70 frames: more than the line's drift window of 60
    write_images(imgs, reds)
    out, log = tmp_path / "out", tmp_path / "box.log"
    cmd = [sys.executable, "-m", "edge_runtime", "run", "--bundle", str(archive_of(kit["v1"])),
           "--public-key", str(kit["keys"].public), "--source", str(imgs), "--watch", "--settle-ms", "50",
           "--device-id", "box-1", "--out", str(out), "--backend", "onnxruntime", "--threads", "1",
           "--metrics-port", "0", "--report-interval", "3600"]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        url = _wait(lambda: (re.search(r"health and metrics on (http://\S+)/healthz", log.read_text()) or [None, None])[1],
                    "the metrics server", proc=proc)
        _wait(lambda: json.loads(_get(url + "/healthz"))["frames"] == len(reds), "all frames inspected", proc=proc)
        metrics = _wait(lambda: (lambda t: t if _metric(t, "defectkit_drift_window_frames") == 60 else None)(
            _get(url + "/metrics")), "the drift window to fill", proc=proc)
        health = json.loads(_get(url + "/healthz"))
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, log.read_text()[-3000:]
    shown = health["settings"]
    values, sources = shown["values"], shown["sources"]
    assert shown["bundle_version"] == "1.0.0"
    assert values["runtime"]["class_thresholds"] == {"short": 0.3, "open": 0.95}
    assert values["drift"]["window"] == 60 and values["drift"]["min_frames"] == 30
    assert values["report"]["interval_s"] == 3600.0 and values["runtime"]["score_threshold"] == 0.5
    assert sources["runtime.class_thresholds"] == sources["drift.window"] == "bundle test-line 1.0.0"
    assert sources["report.interval_s"] == "command line"
    assert _metric(metrics, "defectkit_drift_window_frames") == 60  # the monitor runs on the line's window
    assert json.loads((out / "state" / EFFECTIVE_SETTINGS).read_text()) == shown
    # the decision used the line's class thresholds: red 100 puts "short" between 0.3 and the default 0.5
    lines = _lines(out)
    assert len(lines) == len(reds) and f"{len(reds)} frames: {len(reds) // 2} NG" in stdout
    for rec in lines:
        red = reds[int(Path(rec["source"]).stem.split("_")[1])]
        counted = [d for d in rec["detections"] if d["counted"]]
        if red == 100:
            assert rec["verdict"] == "NG" and [d["class"] for d in counted] == ["short"]
            assert 0.3 <= counted[0]["score"] < 0.5  # NG only because of the line's threshold
            assert any(d["class"] == "open" and 0.3 <= d["score"] < 0.95 and not d["counted"] for d in rec["detections"])
        else:
            assert rec["verdict"] == "OK" and counted == []


def test_predict_on_the_bundle_uses_its_settings_and_an_override_file_wins(kit, tmp_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, [100])
    base = [sys.executable, "-m", "edge_runtime", "predict", "--bundle", str(kit["v1"]),
            "--public-key", str(kit["keys"].public), "--source", str(imgs), "--threads", "1"]
    out = subprocess.run(base + ["--out", str(tmp_path / "a.jsonl")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "a.jsonl").read_text())["verdict"] == "NG"
    override = tmp_path / "o.json"
    override.write_text(json.dumps({"runtime": {"class_thresholds": {}}}))
    out = subprocess.run(base + ["--out", str(tmp_path / "b.jsonl"), "--settings-override", str(override)], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "b.jsonl").read_text())["verdict"] == "OK"  # back to the default 0.5


def _drop(src_archive, inbox, name):
    tmp = inbox / f".{name}.part"
    tmp.write_bytes(src_archive.read_bytes())
    os.utime(tmp, (time.time() - 5, time.time() - 5))
    os.replace(tmp, inbox / name)


def test_bundles_with_missing_or_malformed_settings_are_refused_and_an_update_switches_settings(kit, tmp_path):
    missing = resign_bundle(kit["v1"], kit["keys"], "1.0.5", lambda m: m.pop("settings"))
    malformed = resign_bundle(kit["v1"], kit["keys"], "1.0.6", lambda m: m["settings"]["drift"].update(window="big"))
    lacking = resign_bundle(kit["v1"], kit["keys"], "1.0.7", lambda m: m["settings"]["report"].pop("spool_max_mb"))
    with pytest.raises(BundleError, match=r"missing field 'settings'"):
        verify_bundle(missing, kit["keys"].public)
    frame = red_image(100, 3)
    camera = FakeCameraFactory([FakeCapture(generator=lambda: frame)])  # a fake camera: no camera here
    opts = RunOptions(bundle=kit["v1"], public_key=kit["keys"].public, source="0", device_id="box-1",
                      out_dir=tmp_path / "out", metrics_port=-1, capture_factory=camera, update_poll_s=0.05,
                      overrides={"report": {"interval_s": 3600.0}})
    ins = Inspector(opts)
    inbox = opts.state_dir / "inbox"
    marks = {}

    def operator():  # drops bundles into the inbox while the line runs
        try:
            _wait(lambda: ins.summary.frames > 20, "frames")
            for bundle in (missing, malformed, lacking):
                name = f"{bundle.name}.tar.gz"
                _drop(archive_of(bundle), inbox, name)
                _wait(lambda: (inbox / "rejected" / f"{name}.reason.txt").exists(), f"{name} rejected")
                marks[bundle.name] = (inbox / "rejected" / f"{name}.reason.txt").read_text()
            marks["before_update"] = ins.summary.frames
            marks["settings_before"] = ins.settings
            _drop(archive_of(kit["v2"]), inbox, "1.0.1.tar.gz")
            _wait(lambda: ins.summary.swaps == 1, "the swap")
            at_swap = ins.summary.frames
            _wait(lambda: ins.summary.frames > at_swap + 20, "frames after the swap")
        finally:
            ins.stop()

    t = threading.Thread(target=operator)
    t.start()
    summary = ins.run()
    t.join(10)
    assert summary.swaps == 1
    assert "missing field 'settings'" in marks["1.0.5"]
    assert "'drift.window' must be a whole number, got 'big'" in marks["1.0.6"]
    assert "'report' lacks spool_max_mb" in marks["1.0.7"]
    lines = _lines(tmp_path / "out")
    old = [r for r in lines if r["bundle_version"] == "1.0.0"]
    new = [r for r in lines if r["bundle_version"] == "1.0.1"]
    assert len(old) >= marks["before_update"] and {r["verdict"] for r in old} == {"NG"}  # kept running, line settings
    assert new and {r["verdict"] for r in new} == {"OK"}  # the new bundle's settings (default thresholds)
    assert marks["settings_before"].runtime.class_thresholds == {"short": 0.3, "open": 0.95}
    assert ins.settings.runtime.class_thresholds == {} and ins.settings.drift.window == 200
    assert ins.settings.report.interval_s == 3600.0  # the same overrides on top of the new bundle
    shown = json.loads((opts.state_dir / EFFECTIVE_SETTINGS).read_text())
    assert shown["bundle_version"] == "1.0.1" and shown["sources"]["report.interval_s"] == "command line"
    assert shown["sources"]["runtime.class_thresholds"] == "bundle test-line 1.0.1"


def test_csv_summary_report_and_metrics_count_the_same_frames_and_p95(kit, tmp_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, [100, 40, 230, 60, 250, 30, 90, 200, 45, 120])
    (imgs / "corrupt.png").write_bytes(b"\x00\x17 not an image " * 20)
    ins = Inspector(RunOptions(bundle=kit["v1"], public_key=kit["keys"].public, source=str(imgs), device_id="box-1",
                               out_dir=tmp_path / "out", metrics_port=0, overrides={"report": {"interval_s": 3600.0}}))
    scraped = {}

    def scrape(_stages):  # after the last frame was handed to every consumer, while the server runs
        if ins.summary.frames == 11:
            scraped["metrics"] = _get(f"http://127.0.0.1:{ins._server.port}/metrics")

    ins.frame_hooks.append(scrape)
    summary = ins.run()
    assert (summary.frames, summary.errors) == (11, 1) and "metrics" in scraped
    (csv_path,) = (tmp_path / "out" / "summary").glob("*.csv")
    (row,) = list(csv.DictReader(csv_path.open()))
    with sqlite3.connect(str(tmp_path / "out" / "state" / "spool.db")) as conn:
        (payload,) = conn.execute("SELECT payload FROM items WHERE kind = 'report'").fetchone()
    report = json.loads(payload)
    m = scraped["metrics"]
    from_csv = (int(row["frames"]), int(row["ok"]), int(row["ng"]), int(row["errors"]))
    from_report = tuple(report["counts"][k] for k in ("frames", "ok", "ng", "errors"))
    from_metrics = (sum(int(_metric(m, f'defectkit_frames_total{{verdict="{v}"}}')) for v in ("OK", "NG", "error")),
                    *(int(_metric(m, f'defectkit_frames_total{{verdict="{v}"}}')) for v in ("OK", "NG", "error")))
    assert from_csv == from_report == from_metrics == (11, summary.ok, summary.ng, 1)
    assert summary.ng == 6  # reds 100, 230, 250, 90, 200, 120 pass the line's 0.3 for "short"
    for q in ("p50", "p95"):
        values = (float(row[f"latency_ms_{q}"]), report["health"][f"latency_ms_{q}"],
                  _metric(m, f"defectkit_frame_latency_ms_{q}"))
        assert values[0] > 0 and values[0] == values[1] == values[2], (q, values)
    # the p95 is the JSON lines' own latency totals, interpolated between closest ranks
    totals = sorted(r["latency_ms"]["total"] for r in _lines(tmp_path / "out") if "verdict" in r)
    pos = (len(totals) - 1) * 0.95
    lo = int(pos)
    assert float(row["latency_ms_p95"]) == pytest.approx(totals[lo] + (totals[lo + 1] - totals[lo]) * (pos - lo), abs=2e-3)


def test_the_self_test_fails_when_the_shipped_model_differs_from_the_golden_set(kit, tmp_path):
    """The golden set comes from paddle.inference, not from the shipped model: a model that scores 20 % lower
    (a broken conversion) is caught before it inspects anything."""
    src = tmp_path / "weaker"
    build_raw_model(src / "model.onnx", BOXES, BASE_SCORES * 0.8, channel=0)
    write_deploy(src, "model.onnx", CLASSES, nms="host")
    keys = make_keys(tmp_path)
    bundle = make_bundle(tmp_path, keys, models=[ModelFile(src / "model.onnx", "onnx", "any", "fp32", "host", None)])
    from edge_runtime.selftest import self_test

    report = self_test(verify_bundle(bundle, keys.public))
    assert not report.ok and report.failures() and "onnxruntime" in report.line()
    good = self_test(verify_bundle(kit["v1"], kit["keys"].public))
    assert good.ok and all(r.expected > 0 for r in good.results)  # real detections compared, not two empty sets
