"""The pipelined inspection loop on a real signed bundle (the small red-channel ONNX test detector, ONNX Runtime):
a slow disk drops NG images and never verdicts, a fast camera drops frames at the source with memory flat,
SIGTERM drains, and a bundle whose thresholds empty the pre-NMS filter works.

Stand-ins, because the real thing cannot be had here: the slow disk is a sink wrapped around the real LocalLog
whose first write waits for the test (a deliberately slow writer, injected); the cameras are fake cameras
(tests.runkit.FakeCapture: no camera on this machine). The model, the bundle, the backend, the files, the
SIGTERM and the process are real. No assertion depends on wall-clock time: waits are for events and
conditions (with generous deadlines only so that a bug fails instead of hanging).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_runtime.predict import Detector
from edge_runtime.run import Inspector, decision_floor
from edge_runtime.runconfig import RunOptions
from edge_runtime.settings import BoxSettings, ReportSettings, RuntimeSettings
from tests.runkit import FakeCameraFactory, FakeCapture, make_bundle, make_keys, onnx_source, red_image, write_images

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipeline")
    keys = make_keys(base)
    return {"base": base, "keys": keys, "bundle": make_bundle(base, keys)}


def _opts(kit, tmp_path, source, **kw) -> RunOptions:
    kw.setdefault("metrics_port", -1)
    return RunOptions(bundle=kit["bundle"], public_key=kit["keys"].public, source=str(source), device_id="box-1",
                      out_dir=tmp_path / "out", **kw)


def _lines(out: Path) -> list[dict]:
    (path,) = sorted((out / "predictions").glob("*.jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines()]


def _reports(state_dir: Path) -> list[dict]:
    import sqlite3

    with sqlite3.connect(str(state_dir / "spool.db")) as conn:
        rows = conn.execute("SELECT payload FROM items WHERE kind = 'report' ORDER BY id").fetchall()
    return [json.loads(r[0]) for r in rows]


def _gauge(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"defectkit_{name} "):
            return float(line.split()[1])
    raise AssertionError(f"defectkit_{name} not in /metrics:\n{text[:2000]}")


class SlowDisk:
    """A deliberately slow writer (injected sink): the real LocalLog behind a gate; the first write waits until
    the test opens it, so the disk is 'behind' for as long as the test wants."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.first_write = threading.Event()

    def record(self, *args, **kwargs) -> None:
        self.first_write.set()
        self.gate.wait()
        self.inner.record(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_slow_disk_never_blocks_inference_and_drops_ng_images_first_never_verdicts(kit, tmp_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, [250] * 20)  # red boards: every one NG on this detector
    disks = []

    def wrap(log):
        disks.append(SlowDisk(log))
        return disks[0]

    ins = Inspector(_opts(kit, tmp_path, imgs, metrics_port=0), sink_wrapper=wrap)
    seen = {}

    def at_frame(_stages):
        if ins.summary.frames == 20:  # every frame inspected while the disk has written nothing
            assert disks[0].first_write.wait(60)
            seen["lines_written"] = disks[0].inner.lines
            seen["backlog"] = ins.writer.backlog
            seen["metrics"] = ins.metrics.prometheus()
            disks[0].gate.set()

    ins.frame_hooks.append(at_frame)
    summary = ins.run()
    assert summary.frames == 20 and summary.ng == 20
    assert seen["lines_written"] == 0 and seen["backlog"] == 20  # inference ran 20 frames ahead of the disk
    lines = _lines(tmp_path / "out")
    assert [r["index"] for r in lines] == list(range(20))  # every verdict written, in frame order
    assert all(r["verdict"] == "NG" for r in lines)
    # frame 0 is in the writer's hands, frames 1-7 wait with their images (8 at most), frames 8-19 lose theirs
    max_images = Inspector.MAX_PENDING_IMAGES
    assert [r["index"] for r in lines if r.get("ng_image")] == list(range(max_images))
    assert [r["index"] for r in lines if r.get("ng_image_dropped")] == list(range(max_images, 20))
    assert len(list((tmp_path / "out" / "ng").rglob("*.jpg"))) == max_images
    assert ins.writer.images_dropped == 20 - max_images
    # counted where an operator looks: /metrics (while running) and the report's health
    assert _gauge(seen["metrics"], "ng_images_dropped") == 20 - max_images
    final = _reports(tmp_path / "out" / "state")[-1]
    assert final["health"]["ng_images_dropped"] == 20 - max_images
    assert sum(r["counts"]["frames"] for r in _reports(tmp_path / "out" / "state")) == 20


def test_a_slow_disk_pins_at_most_the_ng_image_cap_with_ok_frames_in_the_backlog(kit, tmp_path):
    # 10 OK frames, then 20 NG frames, inspected while the (deliberately slow) disk writes nothing. Only NG images
    # are ever written, so only they may wait in memory: at most MAX_PENDING_IMAGES, however many OK frames wait
    # beside them (an OK frame's image held in the queue, and counted out of the cap when written, let the cap
    # drift and the backlog pin a full frame per record).
    imgs = tmp_path / "imgs"
    write_images(imgs, [30] * 10 + [250] * 20)
    disks = []

    def wrap(log):
        disks.append(SlowDisk(log))
        return disks[0]

    ins = Inspector(_opts(kit, tmp_path, imgs), sink_wrapper=wrap)
    held = []

    def at_frame(_stages):
        held.append(ins.writer.images_waiting)
        if ins.summary.frames == 30:
            assert disks[0].first_write.wait(60)
            held.append(ins.writer.backlog)
            disks[0].gate.set()

    ins.frame_hooks.append(at_frame)
    summary = ins.run()
    max_images = Inspector.MAX_PENDING_IMAGES
    assert summary.frames == 30 and summary.ok == 10 and summary.ng == 20
    assert held[-1] == 30 and max(held[:-1]) == max_images  # the whole run queued behind the disk, 8 images held
    lines = _lines(tmp_path / "out")
    assert [r["index"] for r in lines] == list(range(30))
    assert [r["index"] for r in lines if r.get("ng_image")] == list(range(10, 10 + max_images))
    assert ins.writer.images_dropped == 20 - max_images and ins.writer.images_waiting == 0


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise AssertionError("no VmRSS")


def test_a_camera_faster_than_inference_drops_frames_at_the_source_and_memory_stays_flat(kit, tmp_path):
    # A fake camera (no camera here) that delivers a new 1080 x 1440 frame (4.7 MB) on every read, at once. The
    # loop's frame hook makes inference wait after each frame until the camera has delivered 6 more frames:
    # the camera is faster than inference by construction, with no clock involved.
    rng = np.random.default_rng(5)
    board = rng.integers(0, 255, size=(1080, 1440, 3), dtype=np.uint8)
    cond = threading.Condition()
    reads = [0]

    def grab():
        with cond:
            reads[0] += 1
            cond.notify_all()
        return board.copy()  # a fresh frame buffer per read, as a camera driver hands out

    camera = FakeCameraFactory([FakeCapture(generator=grab)])
    ins = Inspector(_opts(kit, tmp_path, "0", capture_factory=camera, max_frames=60, metrics_port=0))
    rss = {}

    def slow_inference(_stages):
        n = ins.summary.frames
        if n == 10:
            rss["start"] = _rss_mb()
        if n == 55:
            rss["end"] = _rss_mb()
            rss["metrics"] = ins.metrics.prometheus()
        if n >= 55:  # the last frames are already taken (max_frames): the camera is no longer read
            return
        with cond:
            target = reads[0] + 6
            assert cond.wait_for(lambda: reads[0] >= target, timeout=60)

    ins.frame_hooks.append(slow_inference)
    summary = ins.run()
    assert summary.frames == 60 and summary.errors == 0
    dropped = ins.reader.dropped
    assert dropped >= 54 * 4  # 6 reads per inspected frame, at most 2 wait in the read-ahead queue
    assert ins.reader.high_water <= Inspector.READ_AHEAD
    # flat: > 1 GB of frames went by between frames 10 and 55, the process grew by less than 60 MB
    assert dropped * board.nbytes / 2**20 > 1000
    assert rss["end"] - rss["start"] < 60, rss
    lines = _lines(tmp_path / "out")
    idx = [r["index"] for r in lines]
    assert len(idx) == 60 and idx == sorted(idx) and len(set(idx)) == 60  # order kept, gaps where dropped
    assert _gauge(rss["metrics"], "frames_dropped_at_source") >= 54 * 4
    assert _reports(tmp_path / "out" / "state")[-1]["health"]["frames_dropped_at_source"] == dropped


def test_a_scripted_camera_replayed_without_drops_loses_no_frame(kit, tmp_path):
    # the same fast fake camera with drop_late_frames=False (a recording replayed frame by frame): back-pressure
    script = [red_image(40 if i % 3 else 240, seed=i) for i in range(50)]
    camera = FakeCameraFactory([FakeCapture(script=list(script))])
    ins = Inspector(_opts(kit, tmp_path, "0", capture_factory=camera, max_frames=50), drop_late_frames=False)
    summary = ins.run()
    assert summary.frames == 50 and ins.reader.dropped == 0
    lines = _lines(tmp_path / "out")
    assert [r["index"] for r in lines] == list(range(50))
    assert [r["verdict"] for r in lines] == ["NG" if i % 3 == 0 else "OK" for i in range(50)]


def test_sigterm_drains_every_frame_taken_from_a_watched_folder(kit, tmp_path):
    watched = tmp_path / "in"
    watched.mkdir()
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "edge_runtime", "run", "--bundle", str(kit["bundle"]), "--public-key",
           str(kit["keys"].public), "--source", str(watched), "--watch", "--watch-after", "move", "--settle-ms", "0",
           "--device-id", "box-1", "--out", str(out), "--metrics-port", "-1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop_writing = threading.Event()
    written = []

    def camera_writes():  # a line camera dropping images into the folder (renamed into place) until told to stop
        i = 0
        while not stop_writing.is_set() and i < 2000:
            tmp = watched / f".part-{i}.png"
            cv2.imwrite(str(tmp), red_image(250 if i % 2 else 40, seed=i))
            os.replace(tmp, watched / f"part-{i:04d}.png")
            written.append(i)
            i += 1
            stop_writing.wait(0.002)

    writer = threading.Thread(target=camera_writes, daemon=True)
    writer.start()
    try:
        pred = out / "predictions"
        deadline = time.monotonic() + 120  # a guard against a hang, not a measured window
        while time.monotonic() < deadline:
            files = list(pred.glob("*.jsonl")) if pred.is_dir() else []
            if files and len(files[0].read_text().splitlines()) >= 30:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        else:
            raise AssertionError("the box did not inspect 30 frames")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        stop_writing.set()
        writer.join(10)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped by signal" in stdout
    lines = _lines(out)
    taken = sorted(p.name for p in (watched / "done").iterdir())  # moved = taken from the source
    recorded = [Path(r["source"]).name for r in lines]
    assert sorted(recorded) == taken and len(taken) >= 30  # every frame taken is recorded, none twice
    assert [r["index"] for r in lines] == list(range(len(lines)))  # in the order taken
    assert all(r["verdict"] == ("NG" if int(n[5:9]) % 2 else "OK") for r, n in zip(lines, recorded))
    left = {p.name for p in watched.glob("part-*.png")}
    assert not left & set(taken)  # what was not taken is still there, for the next start
    assert sum(r["counts"]["frames"] for r in _reports(out / "state")) == len(lines)
    summary_rows = list((out / "summary").glob("*.csv"))
    import csv

    with open(summary_rows[0]) as fh:
        assert sum(int(r["frames"]) for r in csv.DictReader(fh)) == len(lines)


def test_thresholds_that_empty_the_pre_nms_filter_on_every_frame_give_all_ok(kit, tmp_path):
    imgs = tmp_path / "imgs"
    reds = [30, 250, 140, 250, 90, 250]
    write_images(imgs, reds, seed=3)
    overrides = {"runtime": {"score_threshold": 1.0}, "report": {"hard_example_low": 0.99, "hard_example_high": 1.0}}
    ins = Inspector(_opts(kit, tmp_path, imgs, overrides=overrides))
    summary = ins.run()
    assert ins.min_score == pytest.approx(0.99)
    assert summary.frames == 6 and summary.ok == 6 and summary.ng == 0 and summary.errors == 0
    lines = _lines(tmp_path / "out")
    assert all(r["verdict"] == "OK" and r["detections"] == [] for r in lines)
    # the full NMS does find boxes on these frames (all below 0.99): the filter, not the model, emptied them
    det = Detector.from_model(onnx_source(kit["base"]), backend="onnxruntime", threads=1)
    full = [det.detect(cv2.imread(str(p)))[0] for p in sorted(imgs.iterdir())]
    assert all(len(d) > 0 and float(d.scores.max()) < 0.99 for d in full)


def test_decision_floor_is_the_lowest_threshold_or_the_hard_example_band():
    s = BoxSettings(runtime=RuntimeSettings(score_threshold=0.5, class_thresholds={"a": 0.4}),
                    report=ReportSettings(hard_example_low=0.3))
    assert decision_floor(s) == pytest.approx(0.3)
    s = BoxSettings(runtime=RuntimeSettings(score_threshold=0.5, class_thresholds={"a": 0.2}),
                    report=ReportSettings(hard_example_low=0.3))
    assert decision_floor(s) == pytest.approx(0.2)
    s = BoxSettings(runtime=RuntimeSettings(score_threshold=0.5), report=ReportSettings(hard_examples_per_hour=0))
    assert decision_floor(s) == pytest.approx(0.5)  # no hard examples sampled: the band does not matter
