"""Local /healthz and /metrics: Prometheus text that a parser accepts, health codes, a busy port refused."""
from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from edge_runtime.decision import Verdict
from edge_runtime.errors import ConfigError
from edge_runtime.inspection import FrameRecord
from edge_runtime.metrics_server import MetricsServer, RuntimeMetrics
from edge_runtime.postprocess import Detections

pytestmark = pytest.mark.timeout(30)

# One sample line of the text exposition format 0.0.4: name{labels} value
_SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? '
                     r'(-?[0-9.e+-]+|NaN|\+Inf|-Inf)$')


def _parse(text: str) -> dict[str, float]:
    """Every sample line, checked against the format; HELP/TYPE lines come in pairs before their family."""
    samples, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge", "histogram"), line
            typed.add(name)
            continue
        assert _SAMPLE.match(line), f"not Prometheus text: {line!r}"
        name = line.split("{", 1)[0].split(" ", 1)[0]
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert family in typed or name in typed, f"{name} has no TYPE line"
        samples[line.rsplit(" ", 1)[0]] = float(line.rsplit(" ", 1)[1])
    return samples


def _rec(verdict, stages_ms):
    """A frame record as the loop makes it: OK / NG with no detections, or None = not inspected."""
    empty = Detections.build(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    decision = None if verdict is None else Verdict(verdict, empty, "", np.zeros(0, bool))
    return FrameRecord(index=0, source="x", time="2026-11-22T10:00:00.000Z", bundle_version="1.0.0",
                       detections=empty, decision=decision, stages_ms=stages_ms)


def test_metrics_text_counts_frames_latency_ng_rate_and_drift():
    m = RuntimeMetrics(ng_window=4)
    m.set_bundle("pcb-1", "1.0.0", "onnxruntime")
    for verdict, ms in (("OK", 8.0), ("NG", 30.0), ("NG", 700.0), ("OK", 3.0), ("NG", 12.0)):
        m.frame(_rec(verdict, {"decode": ms / 2, "infer": ms / 2}))
    m.frame(_rec(None, {}))
    m.set_drift("warn", {"brightness": "warn", "sharpness": "none", 'we"ird\nname': "alarm"})
    m.set(spool_pending=3)
    s = _parse(m.prometheus())
    assert s['defectkit_frames_total{verdict="OK"}'] == 2 and s['defectkit_frames_total{verdict="NG"}'] == 3
    assert s['defectkit_frames_total{verdict="error"}'] == 1
    assert s['defectkit_frame_latency_seconds_bucket{le="0.005"}'] == 1  # 3 ms
    assert s['defectkit_frame_latency_seconds_bucket{le="0.01"}'] == 2  # + 8 ms
    assert s['defectkit_frame_latency_seconds_bucket{le="0.05"}'] == 4  # + 30 ms, 12 ms (cumulative)
    assert s['defectkit_frame_latency_seconds_bucket{le="1.0"}'] == 5 == s["defectkit_frame_latency_seconds_count"]
    assert s["defectkit_frame_latency_seconds_sum"] == pytest.approx(0.753)
    assert s['defectkit_stage_seconds_total{stage="infer"}'] == pytest.approx(0.3765)
    assert s["defectkit_ng_rate"] == 0.75  # the last 4 inspected frames: NG NG OK NG
    assert s["defectkit_drift_state"] == 1 and s['defectkit_drift_feature_state{feature="brightness"}'] == 1
    assert s['defectkit_drift_feature_state{feature="we\\"ird\\nname"}'] == 2  # label values escaped
    assert s["defectkit_spool_pending"] == 3
    assert s["defectkit_frame_latency_ms_p50"] == 12.0 and s["defectkit_frame_latency_ms_p95"] == pytest.approx(566.0)
    assert s['defectkit_bundle_info{backend="onnxruntime",line="pcb-1",version="1.0.0"}'] == 1
    assert s["defectkit_up"] == 0  # still "starting"


def test_health_codes_follow_the_loop_state_and_a_hung_frame():
    m = RuntimeMetrics(stall_s=0.05)
    assert m.health()[0] == 503 and m.health()[1]["status"] == "starting"
    m.state = "running"
    m.flag(spool_full=True)
    code, body = m.health()
    assert code == 200 and body["status"] == "ok" and body["spool_full"] is True  # degraded but inspecting
    m.begin_frame()
    time.sleep(0.1)
    assert m.health() == (503, {**m.health()[1], "status": "stalled"})  # one frame stuck in the backend
    m.frame(_rec("OK", {"infer": 1.0}))
    assert m.health()[0] == 200 and m.health()[1]["last_frame_age_s"] is not None


def test_server_serves_both_endpoints_and_refuses_a_busy_port():
    m = RuntimeMetrics()
    m.state = "running"
    server = MetricsServer(m, "127.0.0.1", 0).start()
    try:
        with urllib.request.urlopen(server.url + "/metrics", timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            _parse(resp.read().decode())
        with urllib.request.urlopen(server.url + "/healthz", timeout=5) as resp:
            assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server.url + "/nope", timeout=5)
        assert err.value.code == 404
        m.state = "stopping"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server.url + "/healthz", timeout=5)
        assert err.value.code == 503 and json.loads(err.value.read())["status"] == "stopping"
        with pytest.raises(ConfigError, match=rf"cannot serve /metrics on 127.0.0.1:{server.port} .*--metrics-port -1"):
            MetricsServer(m, "127.0.0.1", server.port)
    finally:
        server.stop()


def _wait_for(cond, what: str, tries: int = 400) -> None:
    """Poll a condition (bounded: tries x 25 ms), fail with ``what`` if it never holds."""
    for _ in range(tries):
        if cond():
            return
        time.sleep(0.025)
    raise AssertionError(f"never happened: {what}")


def test_80_half_open_requests_hold_no_threads_and_healthz_still_answers():
    """The unit's TasksMax is 64: idle clients must cost a socket for a few seconds, never a thread."""
    import socket
    import threading

    m = RuntimeMetrics()
    m.state = "running"
    before = threading.active_count()
    server = MetricsServer(m, "127.0.0.1", 0, handler_timeout_s=60.0, max_connections=64).start()
    assert threading.active_count() == before + server.threads == before + 3
    stalled = []
    try:
        for _ in range(80):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall(b"GET /healthz HT")  # half a request line, then nothing
            stalled.append(s)
        _wait_for(lambda: server.evicted == 16, "the 16 oldest of 80 stalled connections evicted (cap 64)")
        assert threading.active_count() <= before + server.threads  # 80 stalled clients: still 3 threads
        with urllib.request.urlopen(server.url + "/healthz", timeout=10) as resp:
            assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as resp:
            assert "defectkit_up 1" in resp.read().decode()
        assert threading.active_count() <= before + server.threads
        # the evicted ones were closed by the server: EOF or a reset (their unread half request), not their own timeout
        try:
            assert stalled[0].recv(100) == b""
        except ConnectionResetError:
            pass
        # a stalled client that finishes its request later gets its answer
        stalled[-1].sendall(b"TP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while True:
            chunk = stalled[-1].recv(65536)
            if not chunk:
                break
            answer += chunk
        assert answer.startswith(b"HTTP/1.0 200 OK") and b'"status": "ok"' in answer
        assert server.timeouts == 0
    finally:
        for s in stalled:
            s.close()
        server.stop()
    _wait_for(lambda: threading.active_count() <= before, "the server's threads ended after stop()")


def test_a_request_head_not_sent_within_the_handler_timeout_is_closed():
    import socket

    m = RuntimeMetrics()
    server = MetricsServer(m, "127.0.0.1", 0, handler_timeout_s=0.3).start()
    try:
        s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        s.sendall(b"GET /metr")
        try:  # the server hung up (well before this client's own 30 s timeout)
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
        assert server.timeouts == 1
        s.close()
        # a slowloris that keeps trickling bytes is cut at the same deadline: it is a total one, not per read
        s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        closed = False
        for ch in b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 400:
            try:
                s.sendall(bytes([ch]))
            except OSError:
                closed = True
                break
            time.sleep(0.02)
            if server.timeouts == 2:
                closed = True
                break
        assert closed and server.timeouts == 2
        s.close()
        with pytest.raises(urllib.error.HTTPError) as err:  # a bad method is answered, not served
            urllib.request.urlopen(urllib.request.Request(server.url + "/metrics", method="DELETE"), timeout=5)
        assert err.value.code == 405
    finally:
        server.stop()
