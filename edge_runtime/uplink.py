"""Send spooled items to the collector; delete each only when the collector acknowledged it.

Standard library only (``http.client``): the edge box has no ``requests``. Delivery rules:

* 2xx with a JSON body whose ``id`` is the item's key -> acknowledged, deleted from the spool;
  409 (or ``"duplicate": true``) means the collector already has it -> also deleted.
* 400/413/422 only -> the item itself is bad ("poison"): moved to the spool's dead-letter table and
  counted, never retried forever.
* 404/405/410 -> the URL is wrong, not the item (a misrouted proxy must not dead-letter everything): kept,
  retried with backoff, logged as "collector URL or proxy misrouted?".
* 401/403 -> the token is wrong, not the item: kept, retried with backoff, the error says what to fix.
* every 5xx, 408, 429, any other status, a garbage body, refused or timed-out connections -> kept; the
  uplink backs off (exponential, full jitter, ``next_attempt_at``) so a collector that is down is not hammered.

Every request has a TOTAL deadline, not only a per-read timeout (a server trickling one byte every 0.5 s
never trips a 5 s read timeout): a timer shuts the socket down when ``min(flush deadline, start +
request_deadline_s)`` passes, the request fails with "deadline", the item stays in the spool.

:meth:`Uplink.flush` never raises: it is called from the inspection loop or from :class:`UplinkThread`.
"""
from __future__ import annotations

import base64
import http.client
import json
import logging
import random
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple
from urllib.parse import urlsplit

from .errors import UserInputError
from .spool import Spool, SpoolItem

log = logging.getLogger("defectkit.uplink")

ENDPOINTS = {"report": "/api/v1/reports", "hard_example": "/api/v1/hard-examples"}
POISON_STATUSES = (400, 413, 422)  # the item itself is refused: dead-lettered
MISROUTED_STATUSES = (404, 405, 410)  # the URL (or a proxy in front of the collector) is wrong: retried


class DeadlineExceeded(TimeoutError):
    """A request's total deadline passed (connect, send and the whole answer together)."""


@dataclass
class FlushResult:
    sent: int = 0
    duplicates: int = 0
    dead: int = 0
    failed: bool = False
    skipped: bool = False
    error: Optional[str] = None


@dataclass
class UplinkState:
    """What the health section reports about the link; also the backoff memory."""

    failures: int = 0
    next_attempt_at: float = 0.0
    last_error: Optional[str] = None
    last_success_at: Optional[float] = None
    sent_total: int = 0
    duplicates_total: int = 0
    dead_total: int = 0
    history: List[Tuple[float, str]] = field(default_factory=list)


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1): traffic that never leaves this machine."""
    import ipaddress

    host = (host or "").strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def collector_tls(base_url: str, *, insecure_http: bool = False, ca_file=None, what: str = "collector URL"):
    """Check a collector / target URL the way the box accepts it and return the TLS context to use (None for http).

    ``http://`` only to loopback unless ``insecure_http`` (a sniffed device token would impersonate the box);
    ``https://`` is verified against the system CAs, or only against ``ca_file`` when given (like requests'
    ``verify=``), with the host name checked."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserInputError(f"{what} {base_url!r} is not usable: give http://HOST:PORT or https://HOST")
    if parts.scheme == "http":
        if not insecure_http and not is_loopback_host(parts.hostname):
            raise UserInputError(f"{what} {base_url!r} is plain HTTP to {parts.hostname}, not loopback: the device "
                                 "token and the reports would travel in clear; use https:// (the collector's "
                                 "--tls-cert/--tls-key), or pass --insecure-http to accept it on a trusted network")
        if ca_file is not None:
            raise UserInputError(f"--ca-file is for an https:// {what}; {base_url!r} is plain HTTP")
        return None
    if ca_file is not None and not Path(ca_file).is_file():
        raise UserInputError(f"--ca-file {ca_file} does not exist or is not a file (the PEM of the CA that signed "
                             "the collector's certificate)")
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise UserInputError(f"--ca-file {ca_file} cannot be loaded as PEM certificates ({exc})") from None


class _Conn(http.client.HTTPConnection):
    """HTTP connection with a connect timeout separate from the read timeout, and a total deadline.

    :meth:`set_deadline` (a ``time.monotonic()`` value) arms a timer that shuts the socket down when it passes:
    whatever the request is blocked in (connect, TLS handshake, send, a trickled answer) ends at once, and
    ``deadline_hit`` says why. The timer thread lives only while a request is in flight."""

    def __init__(self, host: str, port: Optional[int], connect_timeout: float, read_timeout: float) -> None:
        super().__init__(host, port, timeout=read_timeout)
        self._connect_timeout = connect_timeout
        self.deadline: Optional[float] = None
        self.deadline_hit = False
        self._timer: Optional[threading.Timer] = None
        self._timer_lock = threading.Lock()

    def set_deadline(self, deadline: Optional[float]) -> None:
        with self._timer_lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.deadline, self.deadline_hit = deadline, False
            if deadline is None:
                return
            self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._abort)
            self._timer.daemon = True
            self._timer.name = "defectkit-http-deadline"
            self._timer.start()

    def _abort(self) -> None:
        self.deadline_hit = True
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _left(self) -> float:
        if self.deadline is None:
            return float("inf")
        left = self.deadline - time.monotonic()
        if left <= 0 or self.deadline_hit:
            self.deadline_hit = True
            raise DeadlineExceeded("the request's total deadline passed before it could connect")
        return left

    def connect(self) -> None:
        self.sock = socket.create_connection((self.host, self.port), min(self._connect_timeout, self._left()))
        self.sock.settimeout(self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.deadline_hit:  # the timer fired while connecting (before self.sock was set)
            self._abort()

    def close(self) -> None:
        with self._timer_lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        super().close()


class _TLSConn(_Conn):
    def __init__(self, host: str, port: Optional[int], connect_timeout: float, read_timeout: float,
                 context: ssl.SSLContext) -> None:
        super().__init__(host, port or 443, connect_timeout, read_timeout)
        self._context = context

    def connect(self) -> None:
        super().connect()
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)


class Uplink:
    """``Uplink(base_url, device_id, token, spool)``: delivers the spool's items oldest first."""

    def __init__(self, base_url: str, device_id: str, token: str, spool: Spool, *, connect_timeout: float = 3.0,
                 read_timeout: float = 10.0, request_deadline_s: Optional[float] = None,
                 backoff_base: float = 1.0, backoff_cap: float = 300.0,
                 ca_file: Optional[str] = None, insecure_http: bool = False,
                 clock: Callable[[], float] = time.monotonic, rng: Optional[random.Random] = None) -> None:
        context = collector_tls(base_url, insecure_http=insecure_http, ca_file=ca_file)
        parts = urlsplit(base_url)
        token = (token or "").strip()
        if not token or any(ch.isspace() for ch in token):
            raise UserInputError(f"the token for device {device_id!r} is empty or contains spaces: check the token file")
        self.base_url = base_url.rstrip("/")
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/")
        self.device_id, self._token, self.spool = device_id, token, spool
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        # one request (connect + send + the whole answer) never takes longer than this, however the bytes trickle
        self.request_deadline_s = request_deadline_s if request_deadline_s is not None else connect_timeout + read_timeout
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self._ssl = context
        self._clock = clock
        # jitter: seeded per device, so a run can be replayed and boxes restarted together still spread out
        self._rng = rng or random.Random(f"uplink:{device_id}")
        self.state = UplinkState()
        self._flush_lock = threading.Lock()
        # called (in the sending thread) with each item the collector acknowledged: the box clears the update
        # events that report carried (edge_runtime.run)
        self.on_ack: Optional[Callable[[SpoolItem], None]] = None

    # ------------------------------------------------------------------------------------------ sending
    def _connect(self, timeout: float) -> _Conn:
        if self._ssl is not None:
            return _TLSConn(self._host, self._port, min(self.connect_timeout, timeout), timeout, self._ssl)
        return _Conn(self._host, self._port, min(self.connect_timeout, timeout), timeout)

    def _body(self, item: SpoolItem) -> bytes:
        if item.kind == "report":
            return item.payload
        return json.dumps({"meta": item.meta, "image_b64": base64.b64encode(item.payload).decode("ascii")}).encode()

    def _send(self, conn: http.client.HTTPConnection, item: SpoolItem) -> Tuple[int, bytes, Optional[str]]:
        body = self._body(item)
        conn.request("POST", self._prefix + ENDPOINTS[item.kind], body=body, headers={
            "Authorization": f"Bearer {self._token}", "Content-Type": "application/json",
            "X-Device-Id": self.device_id, "Idempotency-Key": item.key, "Connection": "keep-alive",
        })
        resp = conn.getresponse()
        data = resp.read(1 << 20)
        return resp.status, data, resp.getheader("Retry-After")

    @staticmethod
    def classify(status: int, data: bytes, key: str) -> Tuple[str, str]:
        """Map a collector answer to ``ack`` | ``duplicate`` | ``poison`` | ``retry`` with a reason."""
        text = data[:300].decode("utf-8", "replace")
        try:
            body = json.loads(data.decode("utf-8")) if data else None
        except (UnicodeDecodeError, ValueError):
            body = None
        if 200 <= status < 300:
            if not isinstance(body, dict) or body.get("id") != key:
                return "retry", f"HTTP {status} without a JSON acknowledgement of id {key}: {text!r}"
            return ("duplicate" if body.get("duplicate") else "ack"), f"HTTP {status}"
        detail = body.get("detail") if isinstance(body, dict) else text
        if status == 409:
            return "duplicate", f"HTTP 409: {detail}"
        if status in (401, 403):
            return "retry", f"HTTP {status}: the collector refused the token ({detail}); fix the device's token file"
        if status in POISON_STATUSES:
            return "poison", f"HTTP {status}: {detail}"
        if status in MISROUTED_STATUSES:
            return "retry", f"HTTP {status}: collector URL or proxy misrouted? ({detail})"
        return "retry", f"HTTP {status}: {detail}"

    def _backoff(self, error: str, retry_after: Optional[str]) -> None:
        st = self.state
        st.failures += 1
        delay = self._rng.uniform(0.0, min(self.backoff_cap, self.backoff_base * 2 ** (st.failures - 1)))
        if retry_after:
            try:
                delay = max(delay, min(float(retry_after), self.backoff_cap))
            except ValueError:
                pass
        st.next_attempt_at = self._clock() + delay
        st.last_error = error
        st.history = (st.history + [(time.time(), error)])[-20:]
        log.warning("uplink to %s: %s; next attempt in %.1f s (failure %d)", self.base_url, error, delay, st.failures)

    def flush(self, max_items: int = 100, deadline: Optional[float] = None) -> FlushResult:
        """Send up to ``max_items`` pending items, oldest first, until ``deadline`` (a ``clock()`` value).

        Returns at once (``skipped``) while backing off after a failure. Never raises.
        """
        res = FlushResult()
        if not self._flush_lock.acquire(blocking=False):
            res.skipped = True  # another thread is flushing: do not send the same items twice at once
            return res
        try:
            self._flush(res, max_items, deadline)
        except Exception as exc:  # the inspection loop must never see an uplink error
            res.failed, res.error = True, f"{type(exc).__name__}: {exc}"
            self._backoff(res.error, None)
        finally:
            self._flush_lock.release()
        return res

    def _flush(self, res: FlushResult, max_items: int, deadline: Optional[float]) -> None:
        now = self._clock()
        if now < self.state.next_attempt_at:
            res.skipped = True
            return
        items = self.spool.pending(limit=max_items)
        conn: Optional[_Conn] = None
        try:
            for item in items:
                remaining = self.read_timeout if deadline is None else deadline - self._clock()
                if remaining <= 0:
                    return
                if conn is None:
                    conn = self._connect(min(self.read_timeout, remaining))
                budget = self.request_deadline_s if deadline is None else min(self.request_deadline_s, remaining)
                conn.set_deadline(time.monotonic() + budget)
                try:
                    status, data, retry_after = self._send(conn, item)
                except (OSError, http.client.HTTPException) as exc:
                    if conn.deadline_hit:
                        reason = (f"request aborted: its total deadline of {budget:.1f} s passed (the collector or a "
                                  f"proxy answers too slowly; {type(exc).__name__})")
                    else:
                        reason = f"cannot reach the collector ({type(exc).__name__}: {exc})"
                    outcome, retry_after = "retry", None
                    conn.close()
                    conn = None
                else:
                    conn.set_deadline(None)
                    if conn.deadline_hit:  # fired right as the answer completed: the socket is gone
                        conn.close()
                        conn = None
                    outcome, reason = self.classify(status, data, item.key)
                if outcome in ("ack", "duplicate"):
                    self.spool.ack(item.id)
                    if self.on_ack is not None:
                        try:
                            self.on_ack(item)
                        except Exception:  # bookkeeping of the box must not stop delivery
                            log.exception("uplink: the acknowledgement hook failed")
                    res.sent += outcome == "ack"
                    res.duplicates += outcome == "duplicate"
                    self.state.sent_total += outcome == "ack"
                    self.state.duplicates_total += outcome == "duplicate"
                    self.state.failures, self.state.last_success_at = 0, time.time()
                elif outcome == "poison":
                    self.spool.dead_letter(item.id, reason)
                    res.dead += 1
                    self.state.dead_total += 1
                    log.error("uplink: %s %s refused by the collector, moved to the dead-letter table: %s",
                              item.kind, item.key, reason)
                else:
                    self.spool.record_failure(item.id, reason)
                    res.failed, res.error = True, reason
                    self._backoff(reason, retry_after)
                    return
        finally:
            if conn is not None:
                conn.close()


class UplinkThread:
    """Runs :meth:`Uplink.flush` in a daemon thread every ``interval_s``; :meth:`wake` sends at once (alarms)."""

    def __init__(self, uplink: Uplink, *, interval_s: float = 5.0, max_items: int = 100) -> None:
        self.uplink, self.interval_s, self.max_items = uplink, interval_s, max_items
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="defectkit-uplink", daemon=True)

    def start(self) -> "UplinkThread":
        self._thread.start()
        return self

    def wake(self) -> None:
        """Flush now (an alarm report was spooled); a collector in backoff is still not hammered."""
        self._wake.set()

    def _run(self) -> None:
        clock = self.uplink._clock
        while not self._stop.is_set():
            self._wake.clear()
            res = self.uplink.flush(self.max_items, deadline=clock() + max(self.interval_s, 1.0))
            if self._stop.is_set():
                break
            more = not res.failed and not res.skipped and (res.sent + res.duplicates + res.dead) >= self.max_items
            if more:
                continue
            wait = self.interval_s
            if self.uplink.state.next_attempt_at > clock():
                wait = max(0.01, min(wait, self.uplink.state.next_attempt_at - clock()))
            self._wake.wait(wait)

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop after the current request (bounded by the uplink's timeouts); True if the thread ended."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()
