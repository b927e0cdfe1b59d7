"""The uplink against real HTTP servers: the collector itself, and small stdlib servers that misbehave
on purpose (500, garbage, wrong acknowledgements, hanging) -- the failures a factory network produces."""
from __future__ import annotations

import json
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from edge_runtime.errors import UserInputError
from edge_runtime.hard_examples import spool_hard_example
from edge_runtime.report_builder import ReportBuilder
from edge_runtime.spool import Spool
from edge_runtime.uplink import Uplink, UplinkThread
from fleet import store
from fleet.collector import CollectorThread
from fleet.settings import CollectorSettings

TOKEN = "press01-token-abcdefgh"


class Faulty:
    """A real HTTP server whose answer is chosen by ``mode``; counts the requests it got."""

    def __init__(self) -> None:
        self.mode, self.requests, self.delay, self.answered = "500", 0, 0.0, 0
        self.hold = False  # True: take each request, then wait for ``release`` before answering
        self.holding, self.release = threading.Event(), threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                owner.requests += 1
                time.sleep(owner.delay)
                if owner.hold:
                    owner.holding.set()
                    owner.release.wait(60)
                key = self.headers.get("Idempotency-Key")
                status, payload, headers = {
                    "500": (500, b'{"detail": "boom"}', {}),
                    "garbage": (200, b"<html>proxy login</html>", {}),
                    "wrong_id": (200, json.dumps({"id": "0" * 32}).encode(), {}),
                    "409": (409, b'{"detail": "duplicate"}', {}),
                    "429": (429, b'{"detail": "slow down"}', {"Retry-After": "0.6"}),
                    "ok": (201, json.dumps({"id": key, "duplicate": False}).encode(), {}),
                }[owner.mode]
                assert json.loads(body)  # the uplink always sends JSON
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    owner.answered += 1
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the uplink gave up waiting (read timeout): expected in the hanging test

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def faulty():
    f = Faulty()
    yield f
    f.close()


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    d = tmp_path_factory.mktemp("uplink-collector")
    (d / "tokens.json").write_text(json.dumps({"admin": "admin-token-0123456789", "devices": {"press-01": TOKEN}}))
    c = CollectorThread(CollectorSettings(db=d / "c.db", port=0, tokens_file=d / "tokens.json",
                                          max_report_bytes=32 * 1024)).start()
    yield c
    c.stop()


def put_reports(spool, n, device="press-01"):
    b = ReportBuilder(device_id=device, line="line-a", bundle_version="1")
    ids = []
    for _ in range(n):
        b.record_frame(ng=False, latency_ms=3.0)
        r = b.build().to_dict()
        spool.put("report", r, alarm=r["alarm"])
        ids.append(r["id"])
    return ids


class Upper(random.Random):
    """Full jitter draws uniform(0, bound); returning the bound makes the backoff schedule visible."""

    def uniform(self, a, b):
        return b


@pytest.mark.parametrize("status, body, outcome", [
    (201, b'{"id": "K", "duplicate": false}', "ack"),
    (200, b'{"id": "K", "duplicate": true}', "duplicate"),
    (409, b'{"detail": "dup"}', "duplicate"),
    (200, b'{"id": "other"}', "retry"),
    (200, b"not json", "retry"),
    (204, b"", "retry"),
    (400, b'{"detail": "bad json"}', "poison"),
    (413, b'{"detail": "too big"}', "poison"),
    (422, b'{"detail": "schema"}', "poison"),
    (401, b'{"detail": "unknown token"}', "retry"),
    (403, b'{"detail": "other device"}', "retry"),
    (408, b"", "retry"),
    (429, b"", "retry"),
    (500, b"", "retry"),
    (503, b"<html>", "retry"),
])
def test_classify(status, body, outcome):
    assert Uplink.classify(status, body, "K")[0] == outcome


def test_500_garbage_and_wrong_ack_keep_items_then_deliver(tmp_path, faulty):
    spool = Spool(tmp_path / "s.db")
    ids = put_reports(spool, 3)
    now = [100.0]  # the uplink's clock: a backoff lasts until the test moves it, however loaded the machine
    up = Uplink(faulty.url, "press-01", TOKEN, spool, backoff_base=0.05, backoff_cap=0.2, clock=lambda: now[0],
                rng=random.Random(7))
    for mode in ("500", "garbage", "wrong_id"):
        faulty.mode = mode
        now[0] = max(now[0], up.state.next_attempt_at)
        before = faulty.requests
        res = up.flush()
        assert res.failed and res.sent == 0 and faulty.requests == before + 1  # stops at the first failure
        assert [it.key for it in spool.pending()] == ids
        assert up.state.next_attempt_at > now[0]
        assert up.flush().skipped and faulty.requests == before + 1  # backing off: no request at all
    assert spool.pending()[0].attempts == 3 and spool.pending()[1].attempts == 0
    assert "HTTP 500: boom" in up.state.history[0][1] and "without a JSON acknowledgement" in up.state.last_error
    faulty.mode = "ok"
    now[0] = up.state.next_attempt_at
    res = up.flush()
    assert (res.sent, res.failed) == (3, False) and spool.stats().pending == 0 and up.state.failures == 0


def test_backoff_is_exponential_capped_and_honours_retry_after(tmp_path, faulty):
    spool = Spool(tmp_path / "s.db")
    put_reports(spool, 1)
    now = [100.0]
    up = Uplink(faulty.url, "press-01", TOKEN, spool, backoff_base=0.1, backoff_cap=1.0, clock=lambda: now[0],
                rng=Upper())
    delays = []
    for _ in range(6):
        up.flush()
        delays.append(round(up.state.next_attempt_at - now[0], 6))
        now[0] = up.state.next_attempt_at
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0] and faulty.requests == 6
    up2 = Uplink(faulty.url, "press-01", TOKEN, spool, backoff_base=0.1, backoff_cap=1.0, rng=random.Random(0))
    jitter = []
    for _ in range(200):
        up2.state.failures = 9  # bound = cap
        up2._backoff("x", None)
        jitter.append(up2.state.next_attempt_at - time.monotonic())
    assert min(jitter) < 0.2 and max(jitter) > 0.8  # full jitter spreads devices over [0, bound]
    faulty.mode = "429"
    up3 = Uplink(faulty.url, "press-01", TOKEN, spool, backoff_base=0.01, backoff_cap=5.0)
    up3.flush()
    assert up3.state.next_attempt_at - time.monotonic() > 0.5  # Retry-After: 0.6
    assert spool.stats().pending == 1


def test_refused_connection_and_past_deadline_keep_items(tmp_path):
    spool = Spool(tmp_path / "s.db")
    ids = put_reports(spool, 2)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    up = Uplink(f"http://127.0.0.1:{port}", "press-01", TOKEN, spool, backoff_base=0.01, backoff_cap=0.05)
    res = up.flush()
    assert res.failed and "cannot reach the collector (ConnectionRefusedError" in res.error
    assert [it.key for it in spool.pending()] == ids
    time.sleep(0.06)
    assert up.flush(deadline=time.monotonic() - 1).sent == 0 and spool.stats().pending == 2
    with pytest.raises(UserInputError, match="collector URL 'ftp://x' is not usable"):
        Uplink("ftp://x", "press-01", TOKEN, spool)
    with pytest.raises(UserInputError, match="token for device 'press-01' is empty"):
        Uplink("http://127.0.0.1:1", "press-01", " ", spool)


def test_poison_goes_to_dead_letter_duplicates_are_acked(tmp_path, collector, faulty):
    spool = Spool(tmp_path / "s.db")
    good_before = put_reports(spool, 1)
    bad = json.loads(spool.pending()[0].payload)
    bad.update(id="f" * 32, counts={**bad["counts"], "ok": 99})  # breaks the schema: 422
    spool.put("report", json.dumps(bad).encode(), key=bad["id"])
    huge = put_reports(spool, 1)[0]
    item = [it for it in spool.pending() if it.key == huge][0]
    big = {**item.json(), "id": "e" * 32, "health": {**item.json()["health"], "pad": "x" * 40_000}}
    spool.ack(item.id)
    spool.put("report", big)  # 413 at this collector (32 KB limit)
    spool_hard_example(spool, image=np.zeros((16, 16, 3), np.uint8), detections=[], device_id="press-01",
                       line="line-a", bundle_version="1")
    good_after = put_reports(spool, 1)
    up = Uplink(collector.url, "press-01", TOKEN, spool)
    res = up.flush()
    assert (res.sent, res.dead, res.failed) == (3, 2, False)
    assert spool.stats().pending == 0 and spool.stats().dead_letter == 2
    reasons = {d["key"]: d["reason"] for d in spool.dead_letters()}
    assert "HTTP 422" in reasons["f" * 32] and "counts.frames" in reasons["f" * 32]
    assert "HTTP 413" in reasons["e" * 32]
    with store.session(path=collector.settings.db) as conn:
        assert set(good_before + good_after) <= set(store.report_ids(conn))
        assert len(store.list_hard_examples(conn)) == 1
    # a wrong token is the device's configuration, not the item: kept, with the fix in the error
    ids = put_reports(spool, 1)
    bad_up = Uplink(collector.url, "press-01", "not-the-token-000000", spool)
    res = bad_up.flush()
    assert res.failed and "HTTP 401" in res.error and "fix the device's token file" in res.error
    assert [it.key for it in spool.pending()] == ids
    faulty.mode = "409"
    res = Uplink(faulty.url, "press-01", TOKEN, spool).flush()
    assert res.duplicates == 1 and spool.stats().pending == 0


def test_put_never_blocked_by_a_hanging_collector(tmp_path, faulty):
    # the collector takes the request and does not answer until the test releases it: every put made meanwhile
    # must complete (were put() waiting on the uplink, it would hang here until the test's timeout)
    faulty.mode, faulty.hold = "ok", True
    spool = Spool(tmp_path / "s.db")
    up = Uplink(faulty.url, "press-01", TOKEN, spool, read_timeout=60.0)
    thread = UplinkThread(up, interval_s=30.0).start()
    b = ReportBuilder(device_id="press-01", line="line-a", bundle_version="1")
    try:
        spool.put("report", b.build().to_dict())
        thread.wake()
        assert faulty.holding.wait(30), "the uplink never reached the collector"
        for _ in range(20):
            spool.put("report", b.build().to_dict())
        assert faulty.answered == 0 and up._flush_lock.locked()  # the uplink is still inside its first request
        assert spool.stats().pending == 21
    finally:
        faulty.release.set()
    deadline = time.monotonic() + 30  # a bound for a broken uplink, not a speed limit
    while spool.stats().pending and time.monotonic() < deadline:
        thread.wake()
        time.sleep(0.02)
    assert spool.stats().pending == 0 and up.state.sent_total == 21
    assert thread.stop(timeout=5.0)


def test_a_timed_out_send_is_not_an_acknowledgement(tmp_path, faulty):
    faulty.mode, faulty.hold = "ok", True  # never answers within the read timeout
    spool = Spool(tmp_path / "s.db")
    ids = put_reports(spool, 2)
    up = Uplink(faulty.url, "press-01", TOKEN, spool, read_timeout=0.3)
    try:
        res = up.flush()
    finally:
        faulty.release.set()
    assert res.failed and res.sent == 0 and "timed out" in (up.state.last_error or "")
    assert [it.key for it in spool.pending()] == ids and faulty.requests == 1


def test_uplink_thread_delivers_and_wakes(tmp_path, collector):
    spool = Spool(tmp_path / "s.db")
    up = Uplink(collector.url, "press-01", TOKEN, spool)
    thread = UplinkThread(up, interval_s=30.0).start()  # would sleep 30 s without wake()
    try:
        time.sleep(0.2)
        ids = put_reports(spool, 2)
        thread.wake()
        deadline = time.monotonic() + 5
        while spool.stats().pending and time.monotonic() < deadline:
            time.sleep(0.02)
        assert spool.stats().pending == 0 and up.state.sent_total == 2
    finally:
        assert thread.stop()
    with store.session(path=collector.settings.db) as conn:
        assert set(ids) <= set(store.report_ids(conn))
