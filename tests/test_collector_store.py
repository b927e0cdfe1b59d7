"""The collector store on both databases: a SQLite file (WAL) and a real PostgreSQL server (tests/pgserver.py).

Exactly-once storage, hard-example owners, migrations from the pre-Alembic schema, several collector
processes on one PostgreSQL database, and a database server that goes away (503 + Retry-After, then stored).
"""
from __future__ import annotations

import json
import re
import socket
import sqlite3
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from edge_runtime.errors import ConfigError
from fleet import db, store
from fleet.collector import CollectorThread
from fleet.settings import CollectorSettings
from tests.pgserver import PgServer, pg_server  # noqa: F401  (fixture)
from tests.test_collector_api import ADMIN, TOK1, TOK2, call, hard_example, report, write_tokens


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path):
    if request.param == "sqlite":
        return tmp_path / "c.db"
    return request.getfixturevalue("pg_server").create_db("store")


def test_reports_are_stored_once_and_ids_belong_to_one_device(location):
    r = report()
    with store.session(path=location) as conn:
        assert db.current_revision(location) == db.HEAD
        assert store.insert_report(conn, report=r) == "inserted"
        assert store.insert_report(conn, report=r) == "duplicate"
        assert store.insert_report(conn, report={**r, "device_id": "press-02"}) == "conflict"
        assert store.report_ids(conn) == [r["id"]] and store.count_reports(conn, line="line-a") == 1
        (dev,) = store.list_devices(conn)
        assert (dev["device_id"], dev["reports"], dev["line"]) == ("press-01", 1, "line-a")
        he = hard_example()["meta"]
        assert store.insert_hard_example(conn, meta=he, image_path="/x.jpg", image_sha256="0" * 64,
                                         image_bytes=100, received_at=1000.0) == "inserted"
        assert store.insert_hard_example(conn, meta=he, image_path="/x.jpg", image_sha256="0" * 64,
                                         image_bytes=100) == "duplicate"
        assert store.insert_hard_example(conn, meta={**he, "device_id": "press-02"}, image_path="/y.jpg",
                                         image_sha256="0" * 64, image_bytes=100) == "conflict"
        assert store.hard_example_owner(conn, hard_example_id=he["id"]) == "press-01"
        assert store.hard_example_bytes(conn, device="press-01", since=999.0) == (100, 1000.0)
        assert store.hard_example_bytes(conn, device="press-01", since=1001.0)[0] == 0


def test_concurrent_inserts_of_the_same_reports_store_each_once(location):
    reports = [report() for _ in range(40)]

    def put(r):
        with store.session(path=location) as conn:
            return store.insert_report(conn, report=r)

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(put, reports * 4))
    assert outcomes.count("inserted") == 40 and outcomes.count("duplicate") == 120
    with store.session(path=location) as conn:
        assert sorted(store.report_ids(conn)) == sorted(r["id"] for r in reports)
        assert store.list_devices(conn)[0]["reports"] == 40


OLD_SCHEMA = """
CREATE TABLE reports (id TEXT PRIMARY KEY, device_id TEXT NOT NULL, line TEXT NOT NULL, bundle_version TEXT NOT NULL,
    window_start TEXT NOT NULL, window_end TEXT NOT NULL, frames INTEGER NOT NULL, ng INTEGER NOT NULL,
    drift_state TEXT NOT NULL, alarm INTEGER NOT NULL, received_at REAL NOT NULL, body TEXT NOT NULL);
CREATE INDEX reports_line_device ON reports(line, device_id, received_at);
CREATE TABLE hard_examples (id TEXT PRIMARY KEY, device_id TEXT NOT NULL, line TEXT NOT NULL,
    bundle_version TEXT NOT NULL, time TEXT NOT NULL, max_score REAL NOT NULL, image_path TEXT NOT NULL,
    image_sha256 TEXT NOT NULL, image_bytes INTEGER NOT NULL, received_at REAL NOT NULL, meta TEXT NOT NULL);
CREATE TABLE devices (device_id TEXT PRIMARY KEY, token_sha256 TEXT, line TEXT, first_seen REAL, last_seen REAL,
    reports INTEGER NOT NULL DEFAULT 0);
"""


def test_a_store_of_the_pre_migration_collector_is_migrated_with_its_data(tmp_path, capsys):
    """A store written by the raw-sqlite3 collector before the registry existed: data kept, tables added."""
    path = tmp_path / "old.db"
    r = report()
    with sqlite3.connect(str(path)) as conn:
        conn.executescript(OLD_SCHEMA)
        conn.execute("INSERT INTO reports VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                     (r["id"], "press-01", "line-a", "1.0.0", r["window"]["start"], r["window"]["end"], 1, 1, "none",
                      0, 5.0, json.dumps(r)))
    conn.close()
    assert db.current_revision(path) == "unversioned"
    from fleet.collector import main

    assert main(["migrate", "--db", str(path)]) == 0
    assert f"schema unversioned -> {db.HEAD}" in capsys.readouterr().out
    with store.session(path=path) as conn:
        assert store.report_ids(conn) == [r["id"]]
        assert store.insert_report(conn, report=r) == "duplicate"
        assert conn.execute("SELECT COUNT(*) FROM enrolments").fetchone()[0] == 0  # added by the migration
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_a_store_of_a_newer_schema_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "new.db"
    with sqlite3.connect(str(path)) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
        conn.execute("INSERT INTO alembic_version VALUES ('9999')")
    conn.close()
    with pytest.raises(ConfigError, match="schema revision 9999, which this collector does not know"):
        store.connect(path=path)


def _serve(url, tmp_path, name, stack="auto"):
    """A collector process on ``url``; its URL once it announced it, and the event loop + HTTP parser it named."""
    tokens = write_tokens(tmp_path / "tokens.json")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet.collector", "serve", "--db", url, "--port", "0", "--tokens", str(tokens),
         "--data-dir", str(tmp_path / "images"), "--registry-dir", str(tmp_path / "registry"),
         "--rate", "100000", "--burst", "100000", "--server-stack", stack],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # waits for the announcement (a condition), bounded by the process itself
        m = re.search(r"collector listening on (http://\S+)", line)
        if m:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining its log
            return proc, m.group(1), line.rstrip().rsplit("; ", 1)[-1].rstrip(")")
    raise AssertionError(f"collector {name} exited with {proc.wait()} before listening")


def test_two_collector_processes_on_one_postgresql_store_each_report_once(pg_server, tmp_path):
    url = pg_server.create_db("multi")
    (pa, ua, sa), (pb, ub, sb) = _serve(url, tmp_path, "a", "asyncio"), _serve(url, tmp_path, "b", "auto")
    try:
        # both stacks serve the same store side by side: the pure-Python pair, and the C pair the fleet extra installs
        assert (sa, sb) == ("asyncio + h11", "uvloop + httptools")
        reports = [report(device="press-01" if i % 2 else "press-02") for i in range(150)]
        hes = [hard_example() for _ in range(10)]

        def post_both(r):
            tok = TOK1 if r["device_id"] == "press-01" else TOK2
            with ThreadPoolExecutor(2) as two:  # the same report to both processes at the same moment
                fa = two.submit(call, ua, "POST", "/api/v1/reports", r, tok)
                fb = two.submit(call, ub, "POST", "/api/v1/reports", r, tok)
                return fa.result()[0], fb.result()[0]

        def post_he(he):
            with ThreadPoolExecutor(2) as two:
                fa = two.submit(call, ua, "POST", "/api/v1/hard-examples", he, TOK1)
                fb = two.submit(call, ub, "POST", "/api/v1/hard-examples", he, TOK1)
                return fa.result()[0], fb.result()[0]

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(post_both, reports))
            he_answers = list(pool.map(post_he, hes))
        assert all(sorted(a) == [200, 201] for a in answers), answers  # one stored it, the other saw a duplicate
        assert all(sorted(a) == [200, 201] for a in he_answers), he_answers
        st, body, _ = call(ub, "GET", "/api/v1/reports?limit=1000", token=ADMIN)
        assert st == 200 and body["count"] == 150
        assert sorted(x["id"] for x in body["reports"]) == sorted(r["id"] for r in reports)
        with store.session(path=url) as conn:
            devs = {d["device_id"]: d["reports"] for d in store.list_devices(conn)}
            assert devs["press-01"] == 75 and devs["press-02"] == 75
            assert len(store.list_hard_examples(conn, limit=100)) == 10
    finally:
        for p in (pa, pb):
            p.terminate()
            p.wait(timeout=30)


def test_postgresql_down_is_503_with_retry_after_then_stored(tmp_path):
    server = PgServer().start()
    try:
        url = server.create_db("outage")
        settings = CollectorSettings(db=url, port=0, tokens_file=write_tokens(tmp_path / "tokens.json"),
                                     data_dir=tmp_path / "images", registry_dir=tmp_path / "registry")
        c = CollectorThread(settings).start()
        try:
            r = report()
            server.stop()
            st, body, resp = call(c.url, "POST", "/api/v1/reports", r, TOK1)
            assert st == 503 and "collector store unavailable" in body["detail"] and resp.getheader("Retry-After")
            assert call(c.url, "GET", "/healthz")[0] == 503  # a load balancer sees the store is gone
            server.start_again()
            st, body, _ = call(c.url, "POST", "/api/v1/reports", r, TOK1)  # the box retries: stored, once
            assert (st, body) == (201, {"id": r["id"], "duplicate": False})
            with store.session(path=url) as conn:
                assert store.report_ids(conn) == [r["id"]]
        finally:
            c.stop()
    finally:
        db.dispose_all()
        server.cleanup()


def test_a_collector_started_on_a_database_that_refuses_says_so_without_a_traceback(tmp_path):
    """The store is opened (and migrated) before the collector listens: a refused connection stops it with one
    line naming the store and the fix, not a driver traceback (systemd restarts it; the boxes keep their items)."""
    with socket.socket() as s:  # a port nothing listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://collector:secret@127.0.0.1:{port}/fleet"
    res = subprocess.run([sys.executable, "-m", "fleet.collector", "serve", "--db", url, "--port", "0",
                          "--data-dir", str(tmp_path / "images"), "--registry-dir", str(tmp_path / "registry")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "collector: error: cannot open the collector store postgresql://collector:***@127.0.0.1" in res.stderr
    assert "refused" in res.stderr and "start the database server or correct --db" in res.stderr
    assert "Traceback" not in res.stderr and "secret" not in res.stderr
