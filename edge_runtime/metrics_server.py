"""The box's local ``/healthz`` and ``/metrics`` (Prometheus text format 0.0.4), standard library only.

:class:`RuntimeMetrics` is the one place the loop, the uplink and the updater write their numbers to
(thread-safe, constant memory); :class:`MetricsServer` serves them from a daemon thread with
``http.server`` so a factory's Prometheus (or a PLC's health probe) can scrape the box. It binds to
127.0.0.1 unless told otherwise: the numbers are not secret, but the box should not listen on the
plant network by accident.
"""
from __future__ import annotations

import collections
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Deque, Dict, Mapping, Optional

from edge_runtime.errors import ConfigError
from edge_runtime.inspection import FrameRecord, FrameStats

log = logging.getLogger("defectkit.metrics_server")

PREFIX = "defectkit"
STAGES = ("decode", "pre", "infer", "post", "drift", "report")
BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
DRIFT_LEVEL = {"none": 0, "warn": 1, "alarm": 2}


def _esc(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    if value != value:  # NaN
        return "NaN"
    return repr(float(value)) if isinstance(value, float) else str(value)


class RuntimeMetrics:
    """Counters and gauges of a running box. ``ng_window`` frames make the NG-rate gauge."""

    def __init__(self, ng_window: int = 1000, stall_s: float = 120.0) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.stall_s = stall_s
        self.state = "starting"  # starting | running | stopping | stopped
        self.stats = FrameStats()  # frames, verdicts and latency percentiles since start: the same count as CSV and report
        self.stage_seconds: Dict[str, float] = {s: 0.0 for s in STAGES}
        self.latency_buckets = [0] * (len(BUCKETS_S) + 1)
        self.latency_sum = 0.0
        self._ng: Deque[bool] = collections.deque(maxlen=ng_window)
        self.last_frame_at: Optional[float] = None
        self.busy_since: Optional[float] = None  # set while a frame is being inspected (stall detection)
        self.drift_state = "none"
        self.drift_features: Dict[str, str] = {}
        self.bundle: Dict[str, str] = {}
        self.source: Dict[str, Any] = {}
        self.gauges: Dict[str, float] = {}  # spool_pending, spool_dropped_total, uplink_failures, ...
        self.flags: Dict[str, Any] = {}  # health extras: last update result, spool full, ...
        self.settings: Dict[str, Any] = {}  # the effective line settings and where each value came from

    # -------------------------------------------------------------------------------------------- writers
    def begin_frame(self) -> None:
        self.busy_since = time.monotonic()

    def frame(self, rec: FrameRecord) -> None:
        """One frame done (inspected or not): its verdict and per-stage milliseconds."""
        self.stats.record(rec)
        total_s = rec.latency_ms / 1e3
        with self._lock:
            self.busy_since = None
            self.last_frame_at = time.time()
            if not rec.inspected:
                return
            self._ng.append(rec.is_ng)
            for stage, ms in rec.stages_ms.items():
                if stage in self.stage_seconds:
                    self.stage_seconds[stage] += ms / 1e3
            self.latency_sum += total_s
            for i, bound in enumerate(BUCKETS_S):
                if total_s <= bound:
                    self.latency_buckets[i] += 1
                    break
            else:
                self.latency_buckets[-1] += 1

    def set(self, **gauges: float) -> None:
        with self._lock:
            self.gauges.update({k: float(v) for k, v in gauges.items()})

    def flag(self, **flags: Any) -> None:
        with self._lock:
            self.flags.update(flags)

    def set_drift(self, state: str, features: Mapping[str, str]) -> None:
        with self._lock:
            self.drift_state = state
            self.drift_features = dict(features)

    def set_settings(self, effective: Mapping[str, Any]) -> None:
        """The settings the loop runs on now (values and their sources), shown in /healthz."""
        with self._lock:
            self.settings = dict(effective)

    def set_bundle(self, line: str, version: str, backend: str) -> None:
        with self._lock:
            self.bundle = {"line": line, "version": version, "backend": backend}

    # -------------------------------------------------------------------------------------------- readers
    def ng_rate(self) -> Optional[float]:
        with self._lock:
            return (sum(self._ng) / len(self._ng)) if self._ng else None

    def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body): 503 while starting or stopping, or when one frame has been in inspection
        longer than ``stall_s`` (a hung backend); 200 otherwise, with what is degraded listed."""
        counts = self.stats.counts()
        with self._lock:
            now = time.time()
            stalled = self.busy_since is not None and time.monotonic() - self.busy_since > self.stall_s
            status = "stalled" if stalled else ("ok" if self.state == "running" else self.state)
            body = {
                "status": status,
                "uptime_s": round(now - self.started, 1),
                "bundle": dict(self.bundle),
                "frames": counts.frames,
                "counts": {"ok": counts.ok, "ng": counts.ng, "errors": counts.errors,
                           "latency_ms_p50": counts.latency_ms_p50, "latency_ms_p95": counts.latency_ms_p95},
                "last_frame_age_s": None if self.last_frame_at is None else round(now - self.last_frame_at, 1),
                "drift_state": self.drift_state,
                "source": dict(self.source),
                **{k: v for k, v in self.flags.items()},
                **{k: v for k, v in self.gauges.items()},
                "settings": dict(self.settings),
            }
        return (200 if status == "ok" else 503), body

    def prometheus(self) -> str:
        """The text exposition format (one HELP and TYPE line per family)."""
        p = PREFIX
        out: list[str] = []

        def fam(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {p}_{name} {help_text}")
            out.append(f"# TYPE {p}_{name} {kind}")

        counts = self.stats.counts()
        with self._lock:
            fam("frames_total", "counter", "Frames inspected, by verdict (error = not decodable or not inspected).")
            for verdict, n in (("OK", counts.ok), ("NG", counts.ng), ("error", counts.errors)):
                out.append(f'{p}_frames_total{{verdict="{verdict}"}} {n}')
            for q, value in (("p50", counts.latency_ms_p50), ("p95", counts.latency_ms_p95)):
                fam(f"frame_latency_ms_{q}", "gauge", f"{q} of the time per inspected frame (ms), last "
                    f"{self.stats.max_samples} frames; the CSV summary and the report use the same formula.")
                out.append(f"{p}_frame_latency_ms_{q} {_num(float('nan') if value is None else float(value))}")
            fam("frame_latency_seconds", "histogram", "Time per inspected frame, decode to report.")
            cum = 0
            for bound, n in zip(BUCKETS_S, self.latency_buckets):
                cum += n
                out.append(f'{p}_frame_latency_seconds_bucket{{le="{bound}"}} {cum}')
            cum += self.latency_buckets[-1]
            out.append(f'{p}_frame_latency_seconds_bucket{{le="+Inf"}} {cum}')
            out.append(f"{p}_frame_latency_seconds_sum {_num(self.latency_sum)}")
            out.append(f"{p}_frame_latency_seconds_count {cum}")
            fam("stage_seconds_total", "counter", "Time spent per stage of the loop.")
            for stage, sec in self.stage_seconds.items():
                out.append(f'{p}_stage_seconds_total{{stage="{stage}"}} {_num(sec)}')
            fam("ng_rate", "gauge", f"Share of NG over the last {self._ng.maxlen} inspected frames.")
            rate = (sum(self._ng) / len(self._ng)) if self._ng else float("nan")
            out.append(f"{p}_ng_rate {_num(rate)}")
            fam("drift_state", "gauge", "Worst drift state: 0 none, 1 warn, 2 alarm.")
            out.append(f"{p}_drift_state {DRIFT_LEVEL.get(self.drift_state, 0)}")
            fam("drift_feature_state", "gauge", "Drift state per feature: 0 none, 1 warn, 2 alarm.")
            for name, state in sorted(self.drift_features.items()):
                out.append(f'{p}_drift_feature_state{{feature="{_esc(name)}"}} {DRIFT_LEVEL.get(state, 0)}')
            for name, value in sorted(self.gauges.items()):
                fam(name, "gauge", name.replace("_", " ") + ".")
                out.append(f"{p}_{name} {_num(value)}")
            fam("up", "gauge", "1 while the inspection loop runs.")
            out.append(f"{p}_up {1 if self.state == 'running' else 0}")
            fam("uptime_seconds", "gauge", "Seconds since the runtime started.")
            out.append(f"{p}_uptime_seconds {_num(time.time() - self.started)}")
            if self.bundle:
                fam("bundle_info", "gauge", "The bundle in use (labels).")
                labels = ",".join(f'{k}="{_esc(v)}"' for k, v in sorted(self.bundle.items()))
                out.append(f"{p}_bundle_info{{{labels}}} 1")
        return "\n".join(out) + "\n"


class _Handler(BaseHTTPRequestHandler):
    metrics: RuntimeMetrics  # set on the subclass made per server
    server_version = "defectkit-edge"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.metrics.prometheus().encode("utf-8"), "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/healthz":
            status, body = self.metrics.health()
            self._send(status, (json.dumps(body) + "\n").encode("utf-8"), "application/json")
        else:
            self._send(404, b'{"detail": "not found: try /healthz or /metrics"}\n', "application/json")

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: Any) -> None:  # scrapes every 15 s would flood the journal
        log.debug("%s " + fmt, self.address_string(), *args)


class MetricsServer:
    """``MetricsServer(metrics, host, port).start()`` serves in a daemon thread; ``port=0`` picks a free one."""

    def __init__(self, metrics: RuntimeMetrics, host: str = "127.0.0.1", port: int = 9108) -> None:
        handler = type("Handler", (_Handler,), {"metrics": metrics})
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise ConfigError(f"cannot serve /metrics on {host}:{port} ({exc.strerror}); pass another --metrics-port "
                              "or --metrics-port -1 to turn it off") from exc
        self._server.daemon_threads = True
        self.host, self.port = host, self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="defectkit-metrics", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "MetricsServer":
        self._thread.start()
        log.info("health and metrics on %s/healthz and %s/metrics", self.url, self.url)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
