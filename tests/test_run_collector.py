"""The loop and the collector: reports arrive exactly once, a bad collector never blocks inspection, and
``python -m edge_runtime run`` stops cleanly on SIGTERM (current frame finished, outputs and spool flushed)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from edge_runtime.run import Inspector
from edge_runtime.runconfig import RunOptions
from fleet.collector import CollectorThread
from fleet.settings import CollectorSettings
from tests.runkit import FakeCameraFactory, FakeCapture, make_bundle, make_keys, red_image, write_images

pytestmark = pytest.mark.timeout(120)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADMIN, TOKEN = "admin-token-0123456789", "press01-token-abcdefgh"


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    base = tmp_path_factory.mktemp("runcollector")
    keys = make_keys(base)
    tokens = base / "tokens.json"
    tokens.write_text(json.dumps({"admin": ADMIN, "devices": {"press-01": TOKEN}}))
    (base / "token.txt").write_text(TOKEN + "\n")
    return {"base": base, "keys": keys, "bundle": make_bundle(base, keys), "tokens": tokens,
            "token_file": base / "token.txt"}


def _get(url, path):
    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {ADMIN}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


class _BadCollector(BaseHTTPRequestHandler):
    """A collector gone wrong: ``mode`` = "500", "garbage" (200 with no JSON ack) or "hang" (holds every request
    until ``release`` is set, then 500)."""

    mode = "500"
    hits = 0
    release = threading.Event()

    def do_POST(self):  # noqa: N802
        type(self).hits += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.mode == "hang":
            self.release.wait(60)
        body, status = (b"<html>proxy says hi</html>", 200) if self.mode == "garbage" else (b'{"detail":"boom"}', 500)
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the uplink gave up waiting (its timeout) and closed the connection
            pass

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("mode", ["500", "garbage", "hang"])
def test_a_bad_collector_never_blocks_inspection(kit, tmp_path, mode):
    handler = type("H", (_BadCollector,), {"mode": mode, "hits": 0, "release": threading.Event()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    frame = red_image(250, 1)
    camera = FakeCameraFactory([FakeCapture(generator=lambda: frame)])  # a fake camera: no camera here
    opts = RunOptions(bundle=kit["bundle"], public_key=kit["keys"].public, source="0", device_id="press-01",
                      out_dir=tmp_path / "out", collector=f"http://127.0.0.1:{server.server_port}", token=TOKEN,
                      metrics_port=-1, max_frames=400, capture_factory=camera, uplink_interval_s=0.05,
                      overrides={"report": {"interval_s": 0.02}})
    ins = Inspector(opts)
    seen = []
    ins.frame_hooks.append(lambda stages: seen.append((time.perf_counter(), sum(stages.values()))))
    try:
        # "hang" holds every request until the run is over: were the loop waiting on the network, it could not
        # finish its 400 frames (the test would time out) -- no wall-clock limit on a shared machine needed
        summary = ins.run()
    finally:
        handler.release.set()
        server.shutdown()
        server.server_close()
    assert summary.frames == 400 and summary.ng == 400 and len(seen) == 400
    assert handler.hits >= 1  # the collector was tried
    assert ins.uplink.state.failures >= 1 or mode == "hang"  # and failed (a held request has not failed yet)
    assert ins.spool.path.exists()
    with __import__("sqlite3").connect(str(ins.spool.path)) as conn:
        pending = conn.execute("SELECT COUNT(*) FROM items WHERE kind='report'").fetchone()[0]
    assert pending == summary.reports >= 5  # nothing acknowledged, nothing lost


def _until(pred, timeout=30.0) -> bool:
    """Wait for a condition (the timeout only ends a broken run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return bool(pred())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_watched_folder_reports_exactly_once_and_stops_cleanly_on_sigterm(kit, tmp_path):
    collector = CollectorThread(CollectorSettings(db=tmp_path / "c.db", port=0, tokens_file=kit["tokens"])).start()
    watched, out = tmp_path / "camera", tmp_path / "out"
    watched.mkdir()
    port = _free_port()
    cmd = [sys.executable, "-m", "edge_runtime", "run", "--bundle", str(kit["bundle"].parent / "1.0.0.tar.gz"),
           "--public-key", str(kit["keys"].public), "--source", str(watched), "--watch", "--settle-ms", "100",
           "--device-id", "press-01", "--collector", collector.url, "--token-file", str(kit["token_file"]),
           "--out", str(out), "--report-interval", "0.5", "--metrics-port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    def health_when(pred, timeout=30.0):
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                    last = json.loads(resp.read())
                if pred(last):
                    return last
            except OSError:  # not listening yet, or 503 while starting
                pass
            time.sleep(0.05)
        return last

    try:
        assert health_when(lambda h: h["status"] == "ok") is not None
        src = write_images(tmp_path / "staging", [30, 250] * 6)
        for i, path in enumerate(src):  # the camera writes under a temporary name, then renames into place
            tmp = watched / f".{path.name}.part"
            tmp.write_bytes(path.read_bytes())
            os.replace(tmp, watched / path.name)
            if i == 5:  # a report reaches the collector in the middle of the batch
                assert health_when(lambda h: h["frames"] >= 6)["frames"] == 6
                assert _until(lambda: _get(collector.url, "/api/v1/reports?device=press-01&limit=1000")["count"] >= 1)
        health = health_when(lambda h: h["frames"] >= 12)
        assert health is not None and health["frames"] == 12 and health["status"] == "ok", health
        assert health["source"]["kind"] == "watch" and health["bundle"]["version"] == "1.0.0"
        proc.send_signal(signal.SIGTERM)  # the last window is spooled and sent on the way out
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    try:
        assert proc.returncode == 0, stderr[-3000:]
        assert "12 frames: 6 NG, 6 OK, 0 skipped" in stdout and "stopped by signal" in stdout
        lines = [json.loads(x) for p in (out / "predictions").glob("*.jsonl") for x in p.read_text().splitlines()]
        assert len(lines) == 12 and not any(r["source"].endswith(".part") for r in lines)
        got = _get(collector.url, "/api/v1/reports?device=press-01&limit=1000")
        ids = [r["id"] for r in got["reports"]]
        assert len(ids) == len(set(ids)) == got["count"] >= 2
        assert sum(r["counts"]["frames"] for r in got["reports"]) == 12  # every frame reported exactly once
        with __import__("sqlite3").connect(str(out / "state" / "spool.db")) as conn:
            assert conn.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 0  # all acknowledged
        assert json.loads((out / "state" / "state.json").read_text())["last_exit"] == "clean"
    finally:
        collector.stop()
