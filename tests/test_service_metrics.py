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
