"""The collector's store: reports, hard examples and devices. Keyword-only functions over :mod:`fleet.db`.

``path`` is the ``--db`` value: a SQLite file (WAL, the default) or a ``postgresql://`` URL; the schema is one
SQLAlchemy Core metadata migrated by Alembic (``fleet/migrations``). Idempotency lives in the schema: a report's
id is the PRIMARY KEY and the insert is ``ON CONFLICT DO NOTHING``, so a retried report is stored once however
many times, and through however many collector processes, it arrives. Hard-example images are files under the
data folder (written atomically); the table holds their metadata and path.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Union

from fleet import db as _db
from fleet.db import Conn, tx  # noqa: F401  (tx re-exported: registry, devices and rollout use store.tx)

def connect(*, path: Union[str, Path]) -> Conn:
    """Open (create and migrate) the store."""
    return _db.connect(path)


@contextmanager
def session(*, path: Union[str, Path]) -> Iterator[Conn]:
    conn = connect(path=path)
    try:
        yield conn
    finally:
        conn.close()


def _insert_ignore(conn: Conn, name: str, values: Dict[str, Any]):
    """``INSERT ... ON CONFLICT DO NOTHING RETURNING 1`` in the store's dialect."""
    if conn.postgres:
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    t = _db.table(name)
    return insert(t).values(**values).on_conflict_do_nothing().returning(t.c[list(t.primary_key.columns)[0].name])


_REPORT_COLS = ("id", "device_id", "line", "bundle_version", "window_start", "window_end", "frames", "ng",
                "drift_state", "alarm", "received_at", "body")
_INSERT_REPORT = (f"INSERT INTO reports ({', '.join(_REPORT_COLS)}) VALUES ({', '.join(':' + c for c in _REPORT_COLS)}) "
                  f"ON CONFLICT (id) DO NOTHING")
_UPSERT_DEVICE = ("ON CONFLICT (device_id) DO UPDATE SET line = excluded.line, last_seen = excluded.last_seen, "
                  "reports = devices.reports + excluded.reports, "
                  "first_seen = COALESCE(devices.first_seen, excluded.first_seen)")
_SQL = {
    # PostgreSQL: the report and its device's counters in one statement, one round trip; a row comes back only
    # when the report was new (the device upsert reads the rows the report insert returned).
    "report_pg": f"WITH ins AS ({_INSERT_REPORT} RETURNING device_id, line, received_at) "
                 f"INSERT INTO devices (device_id, line, first_seen, last_seen, reports) "
                 f"SELECT device_id, line, received_at, received_at, 1 FROM ins {_UPSERT_DEVICE} RETURNING device_id",
    # SQLite has no INSERT inside WITH: two statements in one BEGIN IMMEDIATE transaction
    "report_sqlite": f"{_INSERT_REPORT} RETURNING id",
    "touch": f"INSERT INTO devices (device_id, line, first_seen, last_seen, reports) "
             f"VALUES (:device_id, :line, :at, :at, :reports) {_UPSERT_DEVICE}",
    "owner": "SELECT device_id FROM reports WHERE id = :id",
}
_TEXT: Dict[str, Any] = {}


def _stmt(name: str):
    """The statement as one SQLAlchemy ``text()`` object made once per process: compiled once, cached by
    SQLAlchemy, and prepared by psycopg after a few uses (building Core insert constructs per report cost ~1 ms of
    CPU each)."""
    stmt = _TEXT.get(name)
    if stmt is None:
        from sqlalchemy import text

        stmt = _TEXT[name] = text(_SQL[name])
    return stmt


def insert_report(conn: Conn, *, report: Mapping[str, Any], received_at: Optional[float] = None) -> str:
    """Store a validated report once. Returns ``inserted``, ``duplicate`` (same id, same device) or
    ``conflict`` (the id is taken by another device)."""
    now = time.time() if received_at is None else received_at
    values = dict(id=report["id"], device_id=report["device_id"], line=report["line"],
                  bundle_version=report["bundle_version"], window_start=report["window"]["start"],
                  window_end=report["window"]["end"], frames=report["counts"]["frames"], ng=report["counts"]["ng"],
                  drift_state=report["drift"]["state"], alarm=int(report["alarm"]), received_at=now,
                  body=json.dumps(report, separators=(",", ":")))
    if conn.postgres:
        inserted = conn.execute(_stmt("report_pg"), values).fetchone() is not None
    else:
        with tx(conn, serialize=False):
            inserted = conn.execute(_stmt("report_sqlite"), values).fetchone() is not None
            if inserted:
                _touch(conn, device_id=report["device_id"], line=report["line"], at=now, reports=1)
    if inserted:
        return "inserted"
    row = conn.execute(_stmt("owner"), {"id": report["id"]}).fetchone()
    return "duplicate" if row is not None and row["device_id"] == report["device_id"] else "conflict"


def _touch(conn: Conn, *, device_id: str, line: str, at: float, reports: int) -> None:
    conn.execute(_stmt("touch"), {"device_id": device_id, "line": line, "at": at, "reports": reports})


def _where(line: Optional[str], device: Optional[str]) -> tuple:
    clauses, args = [], []
    if line:
        clauses.append("line = ?")
        args.append(line)
    if device:
        clauses.append("device_id = ?")
        args.append(device)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def list_reports(conn: Conn, *, line: Optional[str] = None, device: Optional[str] = None,
                 limit: int = 100) -> List[Dict[str, Any]]:
    """Newest first: the full report bodies plus when they were received."""
    where, args = _where(line, device)
    rows = conn.execute(f"SELECT body, received_at FROM reports{where} ORDER BY received_at DESC, id LIMIT ?",
                        (*args, int(limit))).fetchall()
    return [{**json.loads(r["body"]), "received_at": r["received_at"]} for r in rows]


def count_reports(conn: Conn, *, line: Optional[str] = None, device: Optional[str] = None) -> int:
    where, args = _where(line, device)
    return int(conn.execute(f"SELECT COUNT(*) FROM reports{where}", args).fetchone()[0])


def report_ids(conn: Conn, *, line: Optional[str] = None, device: Optional[str] = None) -> List[str]:
    where, args = _where(line, device)
    return [r[0] for r in conn.execute(f"SELECT id FROM reports{where}", args).fetchall()]


def hard_example_exists(conn: Conn, *, hard_example_id: str) -> bool:
    return hard_example_owner(conn, hard_example_id=hard_example_id) is not None


def hard_example_owner(conn: Conn, *, hard_example_id: str) -> Optional[str]:
    """The device that sent this hard-example id, None when it is new."""
    row = conn.execute("SELECT device_id FROM hard_examples WHERE id = ?", (hard_example_id,)).fetchone()
    return None if row is None else row["device_id"]


def insert_hard_example(conn: Conn, *, meta: Mapping[str, Any], image_path: str, image_sha256: str,
                        image_bytes: int, received_at: Optional[float] = None) -> str:
    """Store hard-example metadata once (the image file is already written): ``inserted``, ``duplicate`` (same id,
    same device) or ``conflict`` (the id is taken by another device)."""
    now = time.time() if received_at is None else received_at
    values = dict(id=meta["id"], device_id=meta["device_id"], line=meta["line"], bundle_version=meta["bundle_version"],
                  time=meta["time"], max_score=float(meta["max_score"]), image_path=image_path,
                  image_sha256=image_sha256, image_bytes=int(image_bytes), received_at=now,
                  meta=json.dumps(meta, separators=(",", ":")))
    with tx(conn, serialize=False):
        if conn.execute(_insert_ignore(conn, "hard_examples", values)).fetchone() is not None:
            _touch(conn, device_id=meta["device_id"], line=meta["line"], at=now, reports=0)
            return "inserted"
    return "duplicate" if hard_example_owner(conn, hard_example_id=meta["id"]) == meta["device_id"] else "conflict"


def hard_example_bytes(conn: Conn, *, device: str, since: float) -> tuple:
    """(bytes, oldest received_at) of the images a device sent since ``since``: its storage quota's use."""
    row = conn.execute("SELECT COALESCE(SUM(image_bytes), 0), MIN(received_at) FROM hard_examples "
                       "WHERE device_id = ? AND received_at >= ?", (device, since)).fetchone()
    return int(row[0]), row[1]


def list_hard_examples(conn: Conn, *, line: Optional[str] = None, device: Optional[str] = None,
                       limit: int = 100) -> List[Dict[str, Any]]:
    where, args = _where(line, device)
    rows = conn.execute(
        f"SELECT meta, image_path, image_sha256, image_bytes, received_at FROM hard_examples{where} "
        f"ORDER BY received_at DESC, id LIMIT ?", (*args, int(limit))).fetchall()
    return [{**json.loads(r["meta"]), "image_path": r["image_path"], "image_sha256": r["image_sha256"],
             "image_bytes": r["image_bytes"], "received_at": r["received_at"]} for r in rows]


def sync_devices(conn: Conn, *, token_hashes: Mapping[str, str]) -> None:
    """Make the devices table match the token file: known devices keep their history, others lose their token."""
    with tx(conn):
        conn.execute("UPDATE devices SET token_sha256 = NULL")
        for dev, h in token_hashes.items():
            conn.execute("INSERT INTO devices(device_id, token_sha256) VALUES (?, ?) "
                         "ON CONFLICT(device_id) DO UPDATE SET token_sha256 = excluded.token_sha256", (dev, h))


def list_devices(conn: Conn) -> List[Dict[str, Any]]:
    rows = conn.execute("SELECT device_id, line, first_seen, last_seen, reports, token_sha256 IS NOT NULL AS has_token "
                        "FROM devices ORDER BY device_id").fetchall()
    return [dict(r) for r in rows]
