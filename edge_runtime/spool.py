"""A local SQLite spool: reports and hard examples wait here until the collector acknowledged them.

Why SQLite: one file, transactions that survive a killed process or a power cut (WAL journal,
``synchronous=FULL``), and it ships with Python on every edge box. An item leaves the spool only by
:meth:`Spool.ack` (the collector has it) or :meth:`Spool.dead_letter` (the collector refused it for
good); the size cap counts dead-lettered items too and drops the oldest dead letters first, then the
oldest non-alarm items, then alarm items, and counts them, so the next report can say how much was lost
(``health.spool_dropped`` and ``health.spool_dead_dropped``). A full disk raises :class:`SpoolFullError`; the caller logs it and keeps inspecting.
"""
from __future__ import annotations

import errno
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .errors import DefectkitError
from .settings import ReportSettings

KINDS = ("report", "hard_example")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    alarm INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
    meta TEXT,
    payload BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS items_alarm ON items(alarm, id);
CREATE TABLE IF NOT EXISTS dead_letter (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    alarm INTEGER NOT NULL,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
    meta TEXT,
    payload BLOB NOT NULL,
    reason TEXT NOT NULL,
    moved REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters VALUES ('dropped_total', 0), ('dropped_unreported', 0), ('dead_dropped_total', 0),
    ('dead_dropped_unreported', 0);
"""


class SpoolError(DefectkitError):
    """The spool cannot take or give an item (corrupt file, item larger than the cap)."""


class SpoolFullError(SpoolError):
    """The disk (or the database's page limit) is full: the item was NOT saved. Inspection goes on."""


@dataclass
class SpoolItem:
    id: int
    kind: str
    key: str
    alarm: bool
    created: float
    payload: bytes
    meta: Optional[Dict[str, Any]]
    attempts: int

    def json(self) -> Any:
        return json.loads(self.payload.decode("utf-8"))


@dataclass
class SpoolStats:
    pending: int
    pending_bytes: int
    dead_letter: int
    dropped_total: int
    dropped_unreported: int
    dead_dropped_total: int = 0
    dead_bytes: int = 0


def _is_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower()


class Spool:
    """``Spool(path, max_bytes)``: a durable FIFO of items with a soft size cap on their payloads.

    One connection guarded by a lock: the inspection loop (``put``) and the uplink thread
    (``pending``/``ack``) each hold it for one short transaction, never across network I/O.
    """

    def __init__(self, path: Union[str, Path], max_bytes: int = int(ReportSettings.spool_max_mb * 2**20), *, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        if max_bytes <= 0:
            raise SpoolError(f"spool {self.path}: max_bytes must be positive, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(self.path), timeout=busy_timeout_s, isolation_level=None,
                                         check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            # the WAL file shrinks back to 1 MB after each checkpoint (else it keeps its high-water mark on disk)
            self._conn.execute("PRAGMA journal_size_limit=1048576")
            self._conn.executescript(_SCHEMA)
        except (sqlite3.DatabaseError, OSError) as exc:
            if _is_full(exc):
                raise SpoolFullError(f"spool {self.path}: the disk is full, cannot open the spool ({exc}); "
                                     f"free space on {self.path.parent}") from exc
            raise SpoolError(f"spool {self.path} cannot be opened ({exc}); if the file is corrupt, move it "
                             f"aside and restart (its unsent items are lost)") from exc

    # ------------------------------------------------------------------------------------------ internals
    def _tx(self, fn, what: str):
        """Run ``fn(conn)`` in one IMMEDIATE transaction; map disk-full errors to SpoolFullError."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    out = fn(self._conn)
                    self._conn.execute("COMMIT")
                    return out
                finally:
                    if self._conn.in_transaction:  # fn or COMMIT failed (SQLite may have rolled back already)
                        try:
                            self._conn.execute("ROLLBACK")
                        except sqlite3.Error:
                            pass
            except (sqlite3.DatabaseError, OSError) as exc:
                if _is_full(exc):
                    raise SpoolFullError(
                        f"spool {self.path} is full, {what} was not saved ({exc}). Free disk space on "
                        f"{self.path.parent} or lower the spool cap; inspection continues without it."
                    ) from exc
                raise SpoolError(f"spool {self.path}: {what} failed ({exc})") from exc

    # ------------------------------------------------------------------------------------------ API
    def put(self, kind: str, payload: Union[bytes, dict, list], *, alarm: bool = False, key: Optional[str] = None,
            meta: Optional[Dict[str, Any]] = None) -> int:
        """Save one item durably and return its spool id; enforce the size cap afterwards.

        ``key`` is the idempotency key the collector echoes (the report id); for a dict payload it
        defaults to ``payload["id"]``. Raises SpoolFullError when the disk is full.
        """
        if kind not in KINDS:
            raise SpoolError(f"spool {self.path}: unknown item kind {kind!r}; use one of {', '.join(KINDS)}")
        if isinstance(payload, (dict, list)):
            if key is None and isinstance(payload, dict):
                key = payload.get("id")
            payload = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        if not isinstance(payload, (bytes, bytearray)):
            raise SpoolError(f"spool {self.path}: payload must be bytes or a JSON object, got {type(payload).__name__}")
        if not key:
            raise SpoolError(f"spool {self.path}: a {kind} needs a key (its id) so the collector can deduplicate it")
        size = len(payload) + (len(json.dumps(meta)) if meta else 0)
        if size > self.max_bytes:
            raise SpoolError(f"spool {self.path}: a {kind} of {size} bytes is larger than the whole spool cap "
                             f"({self.max_bytes} bytes); raise the cap or send smaller items")
        meta_text = json.dumps(meta) if meta is not None else None

        def insert(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT INTO items(kind, key, alarm, created, size, meta, payload) VALUES (?,?,?,?,?,?,?)",
                (kind, str(key), int(bool(alarm)), time.time(), size, meta_text, bytes(payload)),
            )
            self._enforce_cap(conn, keep_id=cur.lastrowid)
            return int(cur.lastrowid)

        return self._tx(insert, f"{kind} {key}")

    def _enforce_cap(self, conn: sqlite3.Connection, keep_id: int) -> None:
        """The cap holds pending AND dead-lettered items: drop the oldest dead letters first, then the oldest
        non-alarm items, then (only if still over) the oldest alarm items."""
        total = (conn.execute("SELECT COALESCE(SUM(size), 0) FROM items").fetchone()[0]
                 + conn.execute("SELECT COALESCE(SUM(size), 0) FROM dead_letter").fetchone()[0])
        if total <= self.max_bytes:
            return
        dead_dropped = 0
        for item_id, size in conn.execute("SELECT id, size FROM dead_letter ORDER BY moved, id").fetchall():
            if total <= self.max_bytes:
                break
            conn.execute("DELETE FROM dead_letter WHERE id = ?", (item_id,))
            total -= size
            dead_dropped += 1
        if dead_dropped:
            conn.execute("UPDATE counters SET value = value + ? WHERE name IN ('dead_dropped_total', "
                         "'dead_dropped_unreported')", (dead_dropped,))
        dropped = 0
        for alarm in (0, 1):
            rows = conn.execute("SELECT id, size FROM items WHERE alarm = ? AND id != ? ORDER BY id",
                                (alarm, keep_id)).fetchall()
            for item_id, size in rows:
                if total <= self.max_bytes:
                    break
                conn.execute("DELETE FROM items WHERE id = ?", (item_id,))
                total -= size
                dropped += 1
        conn.execute("UPDATE counters SET value = value + ? WHERE name IN ('dropped_total', 'dropped_unreported')",
                     (dropped,))

    def pending(self, limit: int = 100, kind: Optional[str] = None) -> List[SpoolItem]:
        """The oldest ``limit`` items still waiting for an acknowledgement (copies: safe to use unlocked)."""
        sql = "SELECT id, kind, key, alarm, created, payload, meta, attempts FROM items"
        args: tuple = ()
        if kind is not None:
            sql, args = sql + " WHERE kind = ?", (kind,)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY id LIMIT ?", args + (int(limit),)).fetchall()
        return [SpoolItem(id=r[0], kind=r[1], key=r[2], alarm=bool(r[3]), created=r[4], payload=bytes(r[5]),
                          meta=json.loads(r[6]) if r[6] else None, attempts=r[7]) for r in rows]

    def ack(self, item_id: int) -> bool:
        """The collector has the item: delete it. Returns False if it was already gone."""
        return self._tx(lambda c: c.execute("DELETE FROM items WHERE id = ?", (item_id,)).rowcount > 0,
                        f"ack of item {item_id}")

    def record_failure(self, item_id: int, error: str) -> None:
        """Count a failed delivery attempt (kept for diagnosis; the item stays)."""
        self._tx(lambda c: c.execute("UPDATE items SET attempts = attempts + 1, last_error = ? WHERE id = ?",
                                     (error[:500], item_id)), f"failure note of item {item_id}")

    def take_dead_dropped(self) -> int:
        """Dead letters dropped by the size cap since the previous call (the next report's health.spool_dead_dropped)."""
        def take(conn: sqlite3.Connection) -> int:
            n = conn.execute("SELECT value FROM counters WHERE name = 'dead_dropped_unreported'").fetchone()[0]
            conn.execute("UPDATE counters SET value = 0 WHERE name = 'dead_dropped_unreported'")
            return int(n)

        return self._tx(take, "reading the dead-letter dropped counter")

    def dead_letter(self, item_id: int, reason: str) -> bool:
        """Move an item the collector refused for good aside (kept for a person to look at, not retried)."""
        def move(conn: sqlite3.Connection) -> bool:
            n = conn.execute(
                "INSERT INTO dead_letter(id, kind, key, alarm, created, size, meta, payload, reason, moved) "
                "SELECT id, kind, key, alarm, created, size, meta, payload, ?, ? FROM items WHERE id = ?",
                (reason[:1000], time.time(), item_id),
            ).rowcount
            conn.execute("DELETE FROM items WHERE id = ?", (item_id,))
            return n > 0

        return self._tx(move, f"dead-lettering of item {item_id}")

    def dead_letters(self, limit: int = 100) -> List[Dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute("SELECT id, kind, key, reason, moved FROM dead_letter ORDER BY id LIMIT ?",
                                      (int(limit),)).fetchall()
        return [dict(zip(("id", "kind", "key", "reason", "moved"), r)) for r in rows]

    def take_dropped(self) -> int:
        """Items dropped by the size cap since the previous call (the next report's health.spool_dropped)."""
        def take(conn: sqlite3.Connection) -> int:
            n = conn.execute("SELECT value FROM counters WHERE name = 'dropped_unreported'").fetchone()[0]
            conn.execute("UPDATE counters SET value = 0 WHERE name = 'dropped_unreported'")
            return int(n)

        return self._tx(take, "reading the dropped counter")

    def stats(self) -> SpoolStats:
        with self._lock:
            c = self._conn
            pending, nbytes = c.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM items").fetchone()
            dead, dead_bytes = c.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM dead_letter").fetchone()
            counters = dict(c.execute("SELECT name, value FROM counters").fetchall())
        return SpoolStats(pending=pending, pending_bytes=nbytes, dead_letter=dead,
                          dropped_total=counters["dropped_total"], dropped_unreported=counters["dropped_unreported"],
                          dead_dropped_total=counters.get("dead_dropped_total", 0), dead_bytes=dead_bytes)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
