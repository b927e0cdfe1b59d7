"""The collector engineer's findings on the box: dead letters count in the spool cap (oldest dropped first, counted
and reported), a misrouting proxy (404/405/410) or any 5xx is retried with backoff, only 400/413/422 dead-letter,
and ids/names are matched whole (a trailing newline is not a valid id)."""
from __future__ import annotations

import json
import logging
import os
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from edge_runtime.report_builder import ReportBuilder
from edge_runtime.spool import Spool
from edge_runtime.uplink import Uplink
from edge_runtime.wire_report import NAME_RE, ReportSchemaError, validate_report

pytestmark = pytest.mark.timeout(60)
TOKEN = "press01-token-abcdefgh"
KB100 = 100 * 1024


def _blob(rng: random.Random, i: int) -> dict:
    return {"id": f"{i:032x}", "pad": "".join(rng.choice("abcdef") for _ in range(KB100 - 60))}


def _disk(path) -> int:
    return sum(os.path.getsize(f"{path}{sfx}") for sfx in ("", "-wal") if os.path.exists(f"{path}{sfx}"))


def test_dead_letters_count_in_the_cap_oldest_dropped_first_counted_and_reported(tmp_path):
    rng = random.Random(12)
    db = tmp_path / "s.db"
    spool = Spool(db, max_bytes=2**20)  # 1 MB
    for i in range(100):  # 100 items of 100 KB, each refused for good by the collector
        item_id = spool.put("report", _blob(rng, i))
        assert spool.dead_letter(item_id, "HTTP 422: schema")
    st = spool.stats()
    assert st.pending == 0 and st.dead_bytes <= 2**20 and st.dead_letter == 10
    assert st.dead_dropped_total == 90
    # the survivors are the newest dead letters
    assert [d["key"] for d in spool.dead_letters()] == [f"{i:032x}" for i in range(90, 100)]
    # was a 10.2 MB spool for a 1 MB cap; the WAL beside it is bounded by SQLite's checkpoints (journal_size_limit)
    assert os.path.getsize(db) < 2 * 2**20 and _disk(db) < 6 * 2**20, (os.path.getsize(db), _disk(db))
    # reported once in the next report's health, then zero
    builder = ReportBuilder(device_id="press-01", line="press", bundle_version="1.0.0")
    health = builder.build(spool=spool).to_dict()["health"]
    assert health["spool_dead_dropped"] == 90 and health["spool_dead_letter"] == 10
    assert builder.build(spool=spool).to_dict()["health"]["spool_dead_dropped"] == 0
    assert spool.stats().dead_dropped_total == 90


def test_cap_order_dead_letters_then_normal_items_then_alarms(tmp_path):
    rng = random.Random(5)
    spool = Spool(tmp_path / "s.db", max_bytes=5 * KB100)  # room for 5 items (sizes are a bit under 100 KB)
    dead = [spool.put("report", _blob(rng, i)) for i in range(2)]
    for item_id in dead:
        spool.dead_letter(item_id, "HTTP 400")
    spool.put("report", _blob(rng, 10), alarm=True)
    spool.put("report", _blob(rng, 11))
    spool.put("report", _blob(rng, 12))
    assert spool.stats().dead_letter == 2  # 5 items: at the cap, nothing dropped yet
    spool.put("report", _blob(rng, 13))  # one over: the oldest dead letter goes, pending items stay
    st = spool.stats()
    assert (st.dead_letter, st.pending, st.dead_dropped_total, st.dropped_total) == (1, 4, 1, 0)
    spool.put("report", _blob(rng, 14))
    spool.put("report", _blob(rng, 15))  # dead letters gone, then the oldest NON-alarm pending item
    st = spool.stats()
    assert (st.dead_letter, st.dead_dropped_total, st.dropped_total) == (0, 2, 1)
    keys = [it.key for it in spool.pending()]
    assert keys == [f"{i:032x}" for i in (10, 12, 13, 14, 15)]  # the alarm (10) kept, 11 dropped
    assert spool.take_dead_dropped() == 2 and spool.take_dead_dropped() == 0 and spool.take_dropped() == 1


class Collector:
    """A real HTTP server answering ``status`` (a misrouted proxy) until told to acknowledge."""

    def __init__(self) -> None:
        self.status, self.requests = 404, 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                owner.requests += 1
                if owner.status == 201:
                    body = json.dumps({"id": self.headers["Idempotency-Key"], "duplicate": False}).encode()
                else:
                    body = b"<html>nginx: no such location</html>"
                self.send_response(owner.status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("status", [404, 405, 410, 500, 502, 503, 504, 418])
def test_a_misrouting_proxy_or_any_5xx_is_retried_never_dead_lettered(tmp_path, status, caplog):
    collector = Collector()
    collector.status = status
    spool = Spool(tmp_path / "s.db")
    for i in range(3):
        spool.put("report", {"id": f"{i:032x}"})
    up = Uplink(collector.url, "press-01", TOKEN, spool, backoff_base=0.01, rng=random.Random(1))
    try:
        with caplog.at_level(logging.WARNING, logger="defectkit.uplink"):
            res = up.flush()
        assert res.failed and res.dead == 0 and collector.requests == 1  # stops at the first failure, backs off
        assert spool.stats().pending == 3 and spool.stats().dead_letter == 0
        assert up.state.failures == 1 and up.state.next_attempt_at > 0
        if status in (404, 405, 410):
            assert "collector URL or proxy misrouted?" in res.error
            assert "collector URL or proxy misrouted?" in caplog.text
        collector.status = 201  # the proxy is fixed: everything is delivered
        up.state.next_attempt_at = 0.0
        res = up.flush()
        assert res.sent == 3 and spool.stats().pending == 0
    finally:
        collector.close()
        spool.close()


@pytest.mark.parametrize("status, outcome", [(400, "poison"), (413, "poison"), (422, "poison"), (404, "retry"),
                                             (405, "retry"), (410, "retry"), (415, "retry"), (501, "retry")])
def test_only_400_413_422_dead_letter(status, outcome):
    assert Uplink.classify(status, b'{"detail": "x"}', "K")[0] == outcome


def test_ids_and_names_must_match_whole_a_trailing_newline_is_refused(tmp_path):
    assert NAME_RE.fullmatch("press-01") and not NAME_RE.fullmatch("press-01\n")
    builder = ReportBuilder(device_id="press-01", line="press", bundle_version="1.0.0")
    good = builder.build().to_dict()
    validate_report(good)
    for key, value in (("id", good["id"] + "\n"), ("device_id", "press-01\n"), ("line", "press\n")):
        with pytest.raises(ReportSchemaError, match=key):
            validate_report({**good, key: value})
