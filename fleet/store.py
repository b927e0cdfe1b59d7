"""The collector's SQLite store: reports, hard examples and devices. Keyword-only functions.

Idempotency lives in the schema: a report's id is the PRIMARY KEY, so a retried report is stored
once however many times it arrives. Hard-example images are files under the data folder (written
atomically); the table holds their metadata and path.
"""
from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (
    id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    line TEXT NOT NULL,
    bundle_version TEXT NOT NULL,
    window_start TEXT NOT NULL,
    window_end TEXT NOT NULL,
    frames INTEGER NOT NULL,
    ng INTEGER NOT NULL,
    drift_state TEXT NOT NULL,
    alarm INTEGER NOT NULL,
    received_at REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS reports_line_device ON reports(line, device_id, received_at);
CREATE TABLE IF NOT EXISTS hard_examples (
    id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    line TEXT NOT NULL,
    bundle_version TEXT NOT NULL,
    time TEXT NOT NULL,
    max_score REAL NOT NULL,
    image_path TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    image_bytes INTEGER NOT NULL,
    received_at REAL NOT NULL,
    meta TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    token_sha256 TEXT,
    line TEXT,
    first_seen REAL,
    last_seen REAL,
    reports INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS registry_versions (
    line TEXT NOT NULL,
    version TEXT NOT NULL,
    seq INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    length INTEGER NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL,
    parent_version TEXT,
    created TEXT,
    pushed_at REAL NOT NULL,
    gates_passed INTEGER NOT NULL,
    canary_at REAL,
    activated_at REAL,
    retired_at REAL,
    hardware_targets TEXT NOT NULL,
    lineage TEXT NOT NULL,
    note TEXT,
    PRIMARY KEY (line, version)
);
CREATE TABLE IF NOT EXISTS registry_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    line TEXT NOT NULL,
    version TEXT,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS enrolments (
    device_id TEXT PRIMARY KEY,
    line TEXT NOT NULL,
    token_lookup TEXT NOT NULL,
    token_salt TEXT NOT NULL,
    token_hash TEXT NOT NULL,
    tags TEXT NOT NULL,
    enrolled_at REAL NOT NULL,
    rotated_at REAL,
    revoked_at REAL,
    last_target TEXT,
    last_target_at REAL
);
CREATE INDEX IF NOT EXISTS enrolments_lookup ON enrolments(token_lookup);
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    line TEXT NOT NULL,
    version TEXT NOT NULL,
    from_version TEXT NOT NULL,
    canary TEXT NOT NULL,
    window_s REAL NOT NULL,
    policy TEXT NOT NULL,
    started_at REAL NOT NULL,
    state TEXT NOT NULL,
    ended_at REAL,
    reason TEXT
);
CREATE TABLE IF NOT EXISTS rollout_decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout_id INTEGER NOT NULL,
    at REAL NOT NULL,
    action TEXT NOT NULL,
    reason TEXT NOT NULL,
    figures TEXT NOT NULL
);
"""


def connect(*, path: str | Path) -> sqlite3.Connection:
    """Open (and create) the store; WAL so the list endpoints read while devices write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=10.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(_SCHEMA)
    return conn


@contextmanager
def session(*, path: str | Path) -> Iterator[sqlite3.Connection]:
    conn = connect(path=path)
    try:
        yield conn
    finally:
        conn.close()


@contextmanager
def tx(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction (BEGIN IMMEDIATE: writers queue, readers go on)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def insert_report(conn: sqlite3.Connection, *, report: Mapping[str, Any], received_at: Optional[float] = None) -> str:
    """Store a validated report once. Returns ``inserted``, ``duplicate`` (same id, same device) or
    ``conflict`` (the id is taken by another device)."""
    now = time.time() if received_at is None else received_at
    with tx(conn):
        row = conn.execute("SELECT device_id FROM reports WHERE id = ?", (report["id"],)).fetchone()
        if row is not None:
            return "duplicate" if row["device_id"] == report["device_id"] else "conflict"
        conn.execute(
            "INSERT INTO reports VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (report["id"], report["device_id"], report["line"], report["bundle_version"], report["window"]["start"],
             report["window"]["end"], report["counts"]["frames"], report["counts"]["ng"], report["drift"]["state"],
             int(report["alarm"]), now, json.dumps(report, separators=(",", ":"))),
        )
        _touch(conn, device_id=report["device_id"], line=report["line"], at=now, reports=1)
    return "inserted"


def _touch(conn: sqlite3.Connection, *, device_id: str, line: str, at: float, reports: int) -> None:
    conn.execute(
        "INSERT INTO devices(device_id, line, first_seen, last_seen, reports) VALUES (?,?,?,?,?) "
        "ON CONFLICT(device_id) DO UPDATE SET line = excluded.line, last_seen = excluded.last_seen, "
        "reports = reports + excluded.reports, first_seen = COALESCE(first_seen, excluded.first_seen)",
        (device_id, line, at, at, reports),
    )


def _where(line: Optional[str], device: Optional[str]) -> tuple:
    clauses, args = [], []
    if line:
        clauses.append("line = ?")
        args.append(line)
    if device:
        clauses.append("device_id = ?")
        args.append(device)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def list_reports(conn: sqlite3.Connection, *, line: Optional[str] = None, device: Optional[str] = None,
                 limit: int = 100) -> List[Dict[str, Any]]:
    """Newest first: the full report bodies plus when they were received."""
    where, args = _where(line, device)
    rows = conn.execute(f"SELECT body, received_at FROM reports{where} ORDER BY received_at DESC, id LIMIT ?",
                        (*args, int(limit))).fetchall()
    return [{**json.loads(r["body"]), "received_at": r["received_at"]} for r in rows]


def count_reports(conn: sqlite3.Connection, *, line: Optional[str] = None, device: Optional[str] = None) -> int:
    where, args = _where(line, device)
    return int(conn.execute(f"SELECT COUNT(*) FROM reports{where}", args).fetchone()[0])


def report_ids(conn: sqlite3.Connection, *, line: Optional[str] = None, device: Optional[str] = None) -> List[str]:
    where, args = _where(line, device)
    return [r[0] for r in conn.execute(f"SELECT id FROM reports{where}", args).fetchall()]


def hard_example_exists(conn: sqlite3.Connection, *, hard_example_id: str) -> bool:
    return conn.execute("SELECT 1 FROM hard_examples WHERE id = ?", (hard_example_id,)).fetchone() is not None


def insert_hard_example(conn: sqlite3.Connection, *, meta: Mapping[str, Any], image_path: str, image_sha256: str,
                        image_bytes: int, received_at: Optional[float] = None) -> str:
    """Store hard-example metadata once (the image file is already written). ``inserted`` or ``duplicate``."""
    now = time.time() if received_at is None else received_at
    with tx(conn):
        cur = conn.execute(
            "INSERT OR IGNORE INTO hard_examples VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (meta["id"], meta["device_id"], meta["line"], meta["bundle_version"], meta["time"],
             float(meta["max_score"]), image_path, image_sha256, int(image_bytes), now, json.dumps(meta)),
        )
        if cur.rowcount:
            _touch(conn, device_id=meta["device_id"], line=meta["line"], at=now, reports=0)
    return "inserted" if cur.rowcount else "duplicate"


def list_hard_examples(conn: sqlite3.Connection, *, line: Optional[str] = None, device: Optional[str] = None,
                       limit: int = 100) -> List[Dict[str, Any]]:
    where, args = _where(line, device)
    rows = conn.execute(
        f"SELECT meta, image_path, image_sha256, image_bytes, received_at FROM hard_examples{where} "
        f"ORDER BY received_at DESC, id LIMIT ?", (*args, int(limit))).fetchall()
    return [{**json.loads(r["meta"]), "image_path": r["image_path"], "image_sha256": r["image_sha256"],
             "image_bytes": r["image_bytes"], "received_at": r["received_at"]} for r in rows]


def sync_devices(conn: sqlite3.Connection, *, token_hashes: Mapping[str, str]) -> None:
    """Make the devices table match the token file: known devices keep their history, others lose their token."""
    with tx(conn):
        conn.execute("UPDATE devices SET token_sha256 = NULL")
        for dev, h in token_hashes.items():
            conn.execute("INSERT INTO devices(device_id, token_sha256) VALUES (?, ?) "
                         "ON CONFLICT(device_id) DO UPDATE SET token_sha256 = excluded.token_sha256", (dev, h))


def list_devices(conn: sqlite3.Connection) -> List[Dict[str, Any]]:
    rows = conn.execute("SELECT device_id, line, first_seen, last_seen, reports, token_sha256 IS NOT NULL AS has_token "
                        "FROM devices ORDER BY device_id").fetchall()
    return [dict(r) for r in rows]
