"""The SQLite spool: FIFO with acks, size cap policy, full disk, and survival of a SIGKILLed writer."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from edge_runtime.spool import Spool, SpoolError, SpoolFullError

ROOT = Path(__file__).resolve().parents[1]


def test_fifo_ack_dead_letter_and_reopen(tmp_path):
    path = tmp_path / "spool.db"
    with Spool(path, max_bytes=1 << 20) as s:
        ids = [s.put("report", {"id": f"{i:032x}", "n": i}) for i in range(5)]
        s.put("hard_example", b"\xff\xd8jpeg", key="h" * 32, meta={"id": "h" * 32})
        items = s.pending(limit=3)
        assert [it.id for it in items] == ids[:3] and items[0].json() == {"id": "0" * 32, "n": 0}
        assert items[0].key == "0" * 32
        assert s.ack(ids[0]) is True and s.ack(ids[0]) is False
        s.record_failure(ids[1], "HTTP 500")
        assert s.dead_letter(ids[2], "HTTP 422: bad schema") is True
        assert s.pending(limit=10, kind="hard_example")[0].meta == {"id": "h" * 32}
    with Spool(path, max_bytes=1 << 20) as s:  # everything not acked is still there after reopening
        left = s.pending(limit=10)
        assert [it.id for it in left] == ids[1:2] + ids[3:] + [left[-1].id]
        assert left[0].attempts == 1
        assert s.stats().dead_letter == 1 and s.dead_letters()[0]["reason"] == "HTTP 422: bad schema"
        mode = s._conn.execute("PRAGMA journal_mode").fetchone()[0]
        sync = s._conn.execute("PRAGMA synchronous").fetchone()[0]
        assert (mode, sync) == ("wal", 2)  # 2 = FULL


def test_cap_drops_oldest_non_alarm_first_and_counts(tmp_path):
    s = Spool(tmp_path / "spool.db", max_bytes=1000)
    alarm_old = s.put("report", b"A" * 200, key="alarm-old", alarm=True)
    normal = [s.put("report", b"n" * 200, key=f"n{i}") for i in range(3)]  # 800 bytes: fits
    assert s.stats().dropped_total == 0
    s.put("report", b"N" * 200, key="n3")  # 1000: still fits
    newest = s.put("report", b"Z" * 300, key="n4")  # 1300 > 1000: the two oldest normal items go
    keys = [it.key for it in s.pending(100)]
    assert keys == ["alarm-old", "n2", "n3", "n4"]
    st = s.stats()
    assert st.dropped_total == 2 and st.dropped_unreported == 2 and st.pending_bytes == 900
    assert s.take_dropped() == 2 and s.take_dropped() == 0 and s.stats().dropped_total == 2
    # only alarms left besides the new one: an old alarm goes only when nothing else can
    s2 = Spool(tmp_path / "s2.db", max_bytes=500)
    a1 = s2.put("report", b"a" * 300, key="a1", alarm=True)
    s2.put("report", b"b" * 100, key="b1")
    s2.put("report", b"c" * 300, key="a2", alarm=True)
    assert [it.key for it in s2.pending()] == ["a2"] and s2.stats().dropped_total == 2
    assert alarm_old in [it.id for it in s.pending()] and newest == s.pending()[-1].id and a1 not in [
        it.id for it in s2.pending()]
    with pytest.raises(SpoolError, match=r"larger than the whole spool cap \(500 bytes\)"):
        s2.put("report", b"x" * 501, key="big")
    with pytest.raises(SpoolError, match="unknown item kind 'log'"):
        s2.put("log", b"x", key="k")
    with pytest.raises(SpoolError, match="needs a key"):
        s2.put("report", {"no": "id"})


def test_full_disk_raises_spool_full_error_and_spool_keeps_working(tmp_path):
    # No small tmpfs can be mounted here, so the full disk is simulated with SQLite's own page limit:
    # PRAGMA max_page_count makes SQLite fail with SQLITE_FULL, "database or disk is full" -- the very
    # error a full filesystem gives.
    s = Spool(tmp_path / "spool.db", max_bytes=1 << 30)
    s.put("report", b"x" * 100, key="first")
    pages = s._conn.execute("PRAGMA page_count").fetchone()[0]
    s._conn.execute(f"PRAGMA max_page_count = {pages + 4}")
    saved = 0
    with pytest.raises(SpoolFullError) as info:
        for i in range(100):
            s.put("report", b"y" * 3000, key=f"k{i}")
            saved += 1
    msg = str(info.value)
    assert "is full" in msg and "database or disk is full" in msg and "inspection continues" in msg
    assert str(tmp_path) in msg
    assert 0 < saved < 100 and s.stats().pending == saved + 1  # nothing half-written
    # after the collector acknowledged items (space freed) puts work again
    for it in s.pending(100):
        s.ack(it.id)
    s.put("report", b"z" * 3000, key="after")
    assert [it.key for it in s.pending()] == ["after"]


WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from edge_runtime.spool import Spool
    s = Spool({path!r}, max_bytes=1 << 30)
    i = 0
    while True:
        s.put("report", {{"id": "%032x" % i, "pad": "x" * 2000}}, alarm=(i % 7 == 0))
        print(i, flush=True)   # printed only after the transaction committed
        i += 1
""")


def test_survives_sigkill_of_a_writer(tmp_path):
    path = tmp_path / "spool.db"
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(ROOT), path=str(path))],
                            stdout=subprocess.PIPE, text=True)
    committed = []
    try:
        deadline = time.monotonic() + 20
        while len(committed) < 200 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            committed.append(int(line))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL and len(committed) >= 200
    with Spool(path, max_bytes=1 << 30) as s:
        assert s._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        keys = {int(it.key, 16) for it in s.pending(10_000)}
    assert set(committed) <= keys  # every acknowledged put survived the kill
    assert keys == set(range(len(keys)))  # and nothing partial or out of order appeared


def test_put_is_not_blocked_by_a_concurrent_reader(tmp_path):
    s = Spool(tmp_path / "spool.db")
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            for it in s.pending(50):
                s.ack(it.id)

    t = threading.Thread(target=reader)
    t.start()
    try:  # a put that waited on the reader would deadlock here (the test's timeout), not just be slow
        for i in range(100):
            s.put("report", {"id": f"{i:032x}"})
        assert t.is_alive()  # every put completed while the reader kept reading and acknowledging
    finally:
        stop.set()
        t.join()
    for it in s.pending(1000):
        s.ack(it.id)
    assert s.stats().pending == 0  # put and ack interleaved without losing or duplicating an item


def test_unopenable_spool_names_the_file(tmp_path):
    bad = tmp_path / "spool.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(SpoolError, match=r"spool .*spool.db cannot be opened .*move it aside"):
        Spool(bad)
    with pytest.raises(SpoolError, match="max_bytes must be positive"):
        Spool(tmp_path / "other.db", max_bytes=0)
    assert issubclass(SpoolFullError, SpoolError) and not issubclass(sqlite3.Error, SpoolError)
