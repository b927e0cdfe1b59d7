"""Hostile peers on the network: a collector (or proxy) that trickles its answer one byte every 0.2 s never trips a
per-read timeout; the uplink and the update channel abort at their TOTAL deadline, and the item stays spooled."""
from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from compress.keys import init_keys
from edge_runtime.bundle_manager import BundleManager
from edge_runtime.spool import Spool
from edge_runtime.update_channel import UpdateChannel
from edge_runtime.uplink import Uplink

pytestmark = pytest.mark.timeout(120)
TOKEN = "t0ken-for-tests"


class TricklingServer:
    """Loopback server: reads one request head (and its body by Content-Length), then writes a valid-looking
    HTTP answer one byte every ``interval_s`` until the client goes away (``client_gone`` is set) or the answer
    is complete (``completed`` is set)."""

    def __init__(self, interval_s: float = 0.2, answer_len: int = 400) -> None:
        body = b'{"id": "x", "pad": "' + b"p" * answer_len + b'"}'
        self.answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        self.interval_s = interval_s
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.client_gone, self.completed, self.stop = threading.Event(), threading.Event(), threading.Event()
        self.sent = 0
        self.requests = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    self.client_gone.set()
                    return
                buf += chunk
            head, rest = buf.split(b"\r\n\r\n", 1)
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            while len(rest) < length:
                rest += conn.recv(65536)
            self.requests += 1
            for i in range(len(self.answer)):
                if self.stop.wait(self.interval_s):
                    return
                try:
                    conn.sendall(self.answer[i:i + 1])
                except OSError:  # the client shut the connection: its deadline fired
                    self.client_gone.set()
                    return
                self.sent += 1
            self.completed.set()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self._thread.join(5)


@pytest.fixture
def trickle():
    server = TricklingServer()
    yield server
    server.close()


def test_a_trickling_collector_is_cut_at_the_flush_deadline_and_the_item_stays(tmp_path, trickle):
    spool = Spool(tmp_path / "s.db")
    spool.put("report", {"id": "a" * 32, "n": 1})
    # per-read timeout 5 s: a byte every 0.2 s never trips it; only the total deadline can end this request
    up = Uplink(trickle.url, "press-01", TOKEN, spool, connect_timeout=3.0, read_timeout=5.0)
    res = up.flush(deadline=up._clock() + 1.0)
    assert res.failed and res.sent == 0 and res.dead == 0
    assert "total deadline of 1.0 s passed" in res.error, res.error
    # the server saw the client go away (bounded wait on its event), long before its 460-byte answer was done
    assert trickle.client_gone.wait(10), "the client never disconnected"
    assert not trickle.completed.is_set() and 0 < trickle.sent < len(trickle.answer) // 4
    (item,) = spool.pending()
    assert item.attempts == 1  # kept for the next flush, the failure noted
    assert spool.stats().dead_letter == 0 and up.state.failures == 1


def test_without_a_flush_deadline_each_request_still_has_its_own_total_deadline(tmp_path, trickle):
    spool = Spool(tmp_path / "s.db")
    spool.put("report", {"id": "b" * 32})
    up = Uplink(trickle.url, "press-01", TOKEN, spool, connect_timeout=0.5, read_timeout=5.0, request_deadline_s=0.8)
    res = up.flush()  # no flush deadline given
    assert res.failed and "total deadline of 0.8 s passed" in res.error, res.error
    assert trickle.client_gone.wait(10) and not trickle.completed.is_set()
    assert spool.stats().pending == 1


def test_the_update_channel_metadata_request_is_cut_at_its_total_deadline(tmp_path, trickle):
    keys = init_keys(tmp_path / "keys")
    manager = BundleManager(tmp_path / "state", keys.public, line="press")
    channel = UpdateChannel(trickle.url, "press-01", TOKEN, keys.public, manager, timeout=1.0)
    res = channel.poll()
    assert res.outcome == "error" and "DeadlineExceeded" in res.detail and "total deadline passed" in res.detail, res.detail
    assert trickle.client_gone.wait(10) and not trickle.completed.is_set()
    assert trickle.sent < len(trickle.answer) // 4
