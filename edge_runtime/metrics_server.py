"""The box's local ``/healthz`` and ``/metrics`` (Prometheus text format 0.0.4), standard library only.

:class:`RuntimeMetrics` is the one place the loop, the uplink and the updater write their numbers to
(thread-safe, constant memory); :class:`MetricsServer` serves them (a selector thread plus two workers:
bounded, whatever the clients do) so a factory's Prometheus (or a PLC's health probe) can scrape the box. It binds to
127.0.0.1 unless told otherwise: the numbers are not secret, but the box should not listen on the
plant network by accident.
"""
from __future__ import annotations

import collections
import json
import logging
import queue
import selectors
import socket
import threading
import time
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


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}
MAX_REQUEST_BYTES = 8192  # request line + headers; a scrape sends a few hundred


def _respond(metrics: RuntimeMetrics, request: bytes) -> tuple[int, bytes, str]:
    """(status, body, content type) for one complete request head (GET or HEAD only, no body expected)."""
    line = request.split(b"\n", 1)[0].strip().decode("latin-1")
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return 400, b'{"detail": "bad request line"}\n', "application/json"
    method, target = parts[0], parts[1]
    if method not in ("GET", "HEAD"):
        return 405, b'{"detail": "only GET: try /healthz or /metrics"}\n', "application/json"
    path = target.split("?", 1)[0]
    if path == "/metrics":
        return 200, metrics.prometheus().encode("utf-8"), "text/plain; version=0.0.4; charset=utf-8"
    if path == "/healthz":
        status, body = metrics.health()
        return status, (json.dumps(body) + "\n").encode("utf-8"), "application/json"
    return 404, b'{"detail": "not found: try /healthz or /metrics"}\n', "application/json"


class _Pending:
    __slots__ = ("sock", "buf", "deadline")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.buf, self.deadline = sock, b"", deadline


class MetricsServer:
    """``MetricsServer(metrics, host, port).start()`` serves in daemon threads; ``port=0`` picks a free one.

    Bounded by design (the unit's ``TasksMax=64``): one selector thread accepts connections and reads each request
    head without blocking, ``workers`` threads answer complete requests. A connection that has not sent its whole
    request head within ``handler_timeout_s`` is closed, and at most ``max_connections`` are held at once (the
    oldest is closed to admit a new one), so idle or half-open clients hold a socket for a few seconds, never a
    thread. Each answer is written with the same timeout and the connection closed (HTTP/1.0)."""

    def __init__(self, metrics: RuntimeMetrics, host: str = "127.0.0.1", port: int = 9108, *,
                 handler_timeout_s: float = 5.0, workers: int = 2, max_connections: int = 64) -> None:
        self.metrics = metrics
        self.handler_timeout_s, self.max_connections = handler_timeout_s, max_connections
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._sock = socket.create_server((host, port), family=family, backlog=128)
        except OSError as exc:
            raise ConfigError(f"cannot serve /metrics on {host}:{port} ({exc.strerror}); pass another --metrics-port "
                              "or --metrics-port -1 to turn it off") from exc
        self._sock.setblocking(False)
        self.host, self.port = host, self._sock.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._stopping = threading.Event()
        self._queue: "queue.Queue[Optional[tuple[socket.socket, bytes]]]" = queue.Queue(maxsize=max_connections)
        self.timeouts = 0  # connections closed because their request did not arrive within handler_timeout_s
        self.evicted = 0  # connections closed to admit a new one (more than max_connections at once)
        self.served = 0
        self._thread = threading.Thread(target=self._serve, name="defectkit-metrics", daemon=True)
        self._workers = [threading.Thread(target=self._work, name=f"defectkit-metrics-{i}", daemon=True)
                         for i in range(max(1, workers))]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def threads(self) -> int:
        """Threads this server runs (constant: 1 + workers)."""
        return 1 + len(self._workers)

    def start(self) -> "MetricsServer":
        self._thread.start()
        for w in self._workers:
            w.start()
        log.info("health and metrics on %s/healthz and %s/metrics", self.url, self.url)
        return self

    # ------------------------------------------------------------------------------------------ selector thread
    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        pending: Dict[socket.socket, _Pending] = {}

        def drop(p: _Pending) -> None:
            pending.pop(p.sock, None)
            try:
                sel.unregister(p.sock)
            except (KeyError, ValueError):
                pass
            p.sock.close()

        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                timeout = min([p.deadline for p in pending.values()], default=now + 1.0) - now
                for key, _ in sel.select(max(0.0, min(timeout, 1.0))):
                    if key.data == "wake":
                        try:
                            self._wake_r.recv(64)
                        except OSError:
                            pass
                    elif key.data == "accept":
                        self._accept(sel, pending, drop)
                    else:
                        self._read(key.data, pending, sel, drop)
                now = time.monotonic()
                for p in [p for p in pending.values() if p.deadline <= now]:
                    self.timeouts += 1
                    drop(p)
        finally:
            for p in list(pending.values()):
                drop(p)
            sel.close()

    def _accept(self, sel, pending: Dict[socket.socket, _Pending], drop) -> None:
        while True:
            try:
                conn, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: try again at the next event
                log.warning("metrics server: accept failed (%s)", exc)
                return
            conn.setblocking(False)
            if len(pending) >= self.max_connections:
                oldest = min(pending.values(), key=lambda p: p.deadline)
                self.evicted += 1
                drop(oldest)
            p = _Pending(conn, time.monotonic() + self.handler_timeout_s)
            pending[conn] = p
            sel.register(conn, selectors.EVENT_READ, p)

    def _read(self, p: _Pending, pending: Dict[socket.socket, _Pending], sel, drop) -> None:
        try:
            data = p.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            drop(p)
            return
        p.buf += data
        if b"\r\n\r\n" not in p.buf and b"\n\n" not in p.buf:
            if len(p.buf) > MAX_REQUEST_BYTES:
                drop(p)
            return
        pending.pop(p.sock, None)
        sel.unregister(p.sock)
        try:
            self._queue.put_nowait((p.sock, p.buf))
        except queue.Full:  # every worker busy and the queue full: shed the request
            p.sock.close()

    # ------------------------------------------------------------------------------------------ workers
    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            sock, request = job
            try:
                status, body, ctype = _respond(self.metrics, request)
                head_only = request.startswith(b"HEAD ")
                head = (f"HTTP/1.0 {status} {_REASONS.get(status, 'Error')}\r\nServer: defectkit-edge\r\n"
                        f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
                sock.settimeout(self.handler_timeout_s)
                sock.sendall(head.encode("latin-1") + (b"" if head_only else body))
                sock.shutdown(socket.SHUT_WR)
                sock.setblocking(False)
                try:  # unread bytes (a body we ignore) would turn the close into a reset the client may see first
                    sock.recv(65536)
                except OSError:
                    pass
                self.served += 1
                log.debug("metrics server: %s -> %d", request.split(b"\r\n", 1)[0][:100], status)
            except OSError:
                pass  # the client went away or did not read its answer in time
            except Exception:  # a bug in a figure must not kill the worker
                log.exception("metrics server: answering failed")
            finally:
                sock.close()

    def stop(self) -> None:
        self._stopping.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(5)
        for _ in self._workers:
            try:
                self._queue.put(None, timeout=1.0)
            except queue.Full:
                break
        for w in self._workers:
            w.join(5)
        self._sock.close()
        self._wake_r.close()
        self._wake_w.close()
