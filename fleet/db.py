"""The collector's database: one schema (SQLAlchemy Core), migrated by Alembic, on SQLite or PostgreSQL.

``--db fleet.db`` (a path) is SQLite in WAL mode, the embedded default; ``--db postgresql://user@host/name``
is PostgreSQL through psycopg 3, for several collector processes on one database. :func:`connect` gives a
:class:`Conn`: the statements of ``fleet/registry.py``, ``devices.py`` and ``rollout.py`` are portable SQL
with ``?`` placeholders, executed through SQLAlchemy ``text()``; the report and hard-example writes in
``fleet/store.py`` are Core expressions with the dialect's ``ON CONFLICT DO NOTHING``.

Transactions (:func:`tx`): on SQLite ``BEGIN IMMEDIATE`` (writers queue, readers go on); on PostgreSQL a
transaction-scoped advisory lock serialises the same read-then-write transactions across processes (registry,
enrolment, rollout decisions). Report and hard-example inserts do not take it: their primary key and
``ON CONFLICT`` make them exactly-once on their own.
"""
from __future__ import annotations

import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

from edge_runtime.errors import ConfigError, DefectkitError, require

DbLocation = Union[str, Path]


class StoreUnavailable(DefectkitError):
    """The database cannot be reached (down, refusing, unreachable). A request meeting it is answered 503 with
    Retry-After; a collector starting against it stops with this message instead of a driver traceback."""
_PG_LOCK_KEY = 0x64656b74  # "dekt": the one advisory lock of the collector's write transactions
HEAD = "0002"
PG_POOL = 16  # PostgreSQL connections per collector process (4 processes: 64, inside the server's default 100)


def is_url(db: DbLocation) -> bool:
    return isinstance(db, str) and bool(re.match(r"(postgres(ql)?(\+\w+)?|sqlite)://", db))


def is_postgres(db: DbLocation) -> bool:
    return isinstance(db, str) and db.startswith(("postgresql", "postgres:"))


def location(text: str) -> DbLocation:
    """``--db`` value: a ``postgresql://``/``sqlite://`` URL stays a string, anything else is a SQLite file path."""
    return text if is_url(text) else Path(text)


def exists(db: DbLocation) -> bool:
    """A SQLite file that exists, or any URL (the server is asked when connecting)."""
    return is_url(db) or Path(db).is_file()


def sqlalchemy_url(db: DbLocation) -> str:
    """A path -> ``sqlite:///<absolute path>``; ``postgresql://`` -> ``postgresql+psycopg://`` (psycopg 3)."""
    if is_url(db):
        db = str(db)
        if db.startswith("postgres://"):
            db = "postgresql://" + db[len("postgres://"):]
        if db.startswith("postgresql://"):
            db = "postgresql+psycopg://" + db[len("postgresql://"):]
        return db
    return f"sqlite:///{Path(db).resolve()}"


def describe(db: DbLocation) -> str:
    """The location without a password, for messages and logs."""
    return re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", str(db))


# --------------------------------------------------------------------------------------------------- schema
def _schema():
    sa = require("sqlalchemy", "fleet", "the collector store")
    from sqlalchemy import Column, Float, Index, Integer, MetaData, Table, Text

    md = MetaData()
    Table("reports", md,
          Column("id", Text, primary_key=True), Column("device_id", Text, nullable=False),
          Column("line", Text, nullable=False), Column("bundle_version", Text, nullable=False),
          Column("window_start", Text, nullable=False), Column("window_end", Text, nullable=False),
          Column("frames", Integer, nullable=False), Column("ng", Integer, nullable=False),
          Column("drift_state", Text, nullable=False), Column("alarm", Integer, nullable=False),
          Column("received_at", Float, nullable=False), Column("body", Text, nullable=False),
          Index("reports_line_device", "line", "device_id", "received_at"),
          Index("reports_received", "received_at"))
    Table("hard_examples", md,
          Column("id", Text, primary_key=True), Column("device_id", Text, nullable=False),
          Column("line", Text, nullable=False), Column("bundle_version", Text, nullable=False),
          Column("time", Text, nullable=False), Column("max_score", Float, nullable=False),
          Column("image_path", Text, nullable=False), Column("image_sha256", Text, nullable=False),
          Column("image_bytes", Integer, nullable=False), Column("received_at", Float, nullable=False),
          Column("meta", Text, nullable=False),
          Index("hard_examples_device", "device_id", "received_at"),
          Index("hard_examples_line", "line", "received_at"))
    Table("devices", md,
          Column("device_id", Text, primary_key=True), Column("token_sha256", Text), Column("line", Text),
          Column("first_seen", Float), Column("last_seen", Float),
          Column("reports", Integer, nullable=False, server_default="0"))
    Table("registry_versions", md,
          Column("line", Text, primary_key=True), Column("version", Text, primary_key=True),
          Column("seq", Integer, nullable=False), Column("sha256", Text, nullable=False),
          Column("length", Integer, nullable=False), Column("path", Text, nullable=False),
          Column("state", Text, nullable=False), Column("parent_version", Text), Column("created", Text),
          Column("pushed_at", Float, nullable=False), Column("gates_passed", Integer, nullable=False),
          Column("canary_at", Float), Column("activated_at", Float), Column("retired_at", Float),
          Column("hardware_targets", Text, nullable=False), Column("lineage", Text, nullable=False),
          Column("note", Text))
    Table("registry_events", md,
          Column("id", Integer, primary_key=True, autoincrement=True), Column("line", Text, nullable=False),
          Column("version", Text), Column("at", Float, nullable=False), Column("kind", Text, nullable=False),
          Column("detail", Text, nullable=False))
    Table("enrolments", md,
          Column("device_id", Text, primary_key=True), Column("line", Text, nullable=False),
          Column("token_lookup", Text, nullable=False), Column("token_salt", Text, nullable=False),
          Column("token_hash", Text, nullable=False), Column("tags", Text, nullable=False),
          Column("enrolled_at", Float, nullable=False), Column("rotated_at", Float), Column("revoked_at", Float),
          Column("last_target", Text), Column("last_target_at", Float),
          Index("enrolments_lookup", "token_lookup"))
    Table("rollouts", md,
          Column("id", Integer, primary_key=True, autoincrement=True), Column("line", Text, nullable=False),
          Column("version", Text, nullable=False), Column("from_version", Text, nullable=False),
          Column("canary", Text, nullable=False), Column("window_s", Float, nullable=False),
          Column("policy", Text, nullable=False), Column("started_at", Float, nullable=False),
          Column("state", Text, nullable=False), Column("ended_at", Float), Column("reason", Text))
    Table("rollout_decisions", md,
          Column("id", Integer, primary_key=True, autoincrement=True),
          Column("rollout_id", Integer, nullable=False), Column("at", Float, nullable=False),
          Column("action", Text, nullable=False), Column("reason", Text, nullable=False),
          Column("figures", Text, nullable=False))
    del sa
    return md


_METADATA = None


def metadata():
    global _METADATA
    if _METADATA is None:
        _METADATA = _schema()
    return _METADATA


def table(name: str):
    return metadata().tables[name]


# --------------------------------------------------------------------------------------------------- engines
_ENGINES: Dict[str, Any] = {}
_MIGRATED: set = set()
_LOCK = threading.Lock()
_MIGRATE_LOCK = threading.Lock()


def _sqlite_engine(url: str):
    from sqlalchemy import create_engine, event

    Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    # as many kept connections as the app has worker threads (40): an overflow connection is closed on return,
    # and opening one (file, WAL, pragmas) per request under load is wasted CPU
    eng = create_engine(url, connect_args={"timeout": 30.0, "check_same_thread": False}, pool_size=40,
                        max_overflow=24, pool_timeout=30)

    @event.listens_for(eng, "connect")
    def _on_connect(dbapi_conn, record):  # noqa: ANN001 - DB-API connection
        dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(eng, "begin")
    def _on_begin(conn):  # noqa: ANN001
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("immediate") else "BEGIN")

    return eng


def engine(db: DbLocation):
    """One pooled engine per database and process."""
    require("sqlalchemy", "fleet", "the collector store")
    url = sqlalchemy_url(db)
    with _LOCK:
        eng = _ENGINES.get(url)
        if eng is None:
            if url.startswith("sqlite"):
                eng = _sqlite_engine(url)
            else:
                require("psycopg", "fleet", "a PostgreSQL store")
                from sqlalchemy import create_engine

                # a fixed pool, no overflow: an overflow connection is closed when it is given back, so under
                # load every request paid a new PostgreSQL backend (fork, auth, catalog caches) and the server
                # spent more CPU per report than the collector; past PG_POOL busy connections a worker thread
                # waits for one (pool_timeout, then 503 + Retry-After)
                eng = create_engine(url, pool_size=PG_POOL, max_overflow=0, pool_pre_ping=True, pool_timeout=30,
                                    connect_args={"connect_timeout": 5})
            _ENGINES[url] = eng
    return eng


_AUTOCOMMIT: Dict[int, Any] = {}


def _autocommit(eng):
    """The engine's autocommit view (same pool), made once: ``execution_options()`` copies the engine's event
    dispatch, about 1 ms of CPU, too much to pay per request."""
    held = _AUTOCOMMIT.get(id(eng))
    if held is None or held[0] is not eng:
        with _LOCK:
            held = _AUTOCOMMIT[id(eng)] = (eng, eng.execution_options(isolation_level="AUTOCOMMIT"))
    return held[1]


def dispose_all() -> None:
    """Close every pooled connection of this process (tests stop their PostgreSQL server after this)."""
    with _LOCK:
        for eng in _ENGINES.values():
            eng.dispose()
        _ENGINES.clear()
        _MIGRATED.clear()
        _AUTOCOMMIT.clear()


# --------------------------------------------------------------------------------------------------- rows
class Record:
    """A row read by name (``r["line"]``), by position (``r[0]``) or as ``dict(r)``, like ``sqlite3.Row``."""

    __slots__ = ("_keys", "_values")

    def __init__(self, keys: Sequence[str], values: Sequence[Any]) -> None:
        self._keys, self._values = tuple(keys), tuple(values)

    def __getitem__(self, key: Union[int, str]) -> Any:
        if isinstance(key, str):
            try:
                return self._values[self._keys.index(key)]
            except ValueError:
                raise IndexError(f"no column {key!r}") from None
        return self._values[key]

    def keys(self) -> List[str]:
        return list(self._keys)

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Record({dict(zip(self._keys, self._values))!r})"


class Cursor:
    """The buffered result of one statement."""

    def __init__(self, rows: List[Record], rowcount: int) -> None:
        self._rows, self.rowcount, self._i = rows, rowcount, 0

    def fetchone(self) -> Optional[Record]:
        if self._i >= len(self._rows):
            return None
        self._i += 1
        return self._rows[self._i - 1]

    def fetchall(self) -> List[Record]:
        rest, self._i = self._rows[self._i:], len(self._rows)
        return rest

    def __iter__(self):
        return iter(self.fetchall())


_TEXTS: Dict[str, Any] = {}


def _qmark(sql: str, params: Sequence[Any]):
    """``?`` placeholders -> SQLAlchemy ``text()`` with named binds (the statements hold no ``?`` or ``:`` literals).

    One ``text()`` per distinct statement, kept: re-parsing and re-compiling the same SQL on every call was a
    measurable share of a report's CPU (the statements are fixed strings; their number is bounded)."""
    from sqlalchemy import text

    n = sql.count("?")
    if n != len(params):
        raise ValueError(f"{n} placeholders but {len(params)} parameters in {sql!r}")
    stmt = _TEXTS.get(sql)
    if stmt is None:
        parts = sql.split("?")
        out = parts[0]
        for i, part in enumerate(parts[1:]):
            out += f":p{i}" + part
        stmt = text(out)
        if len(_TEXTS) < 4096:  # a bound in case a caller ever formats values into the SQL
            _TEXTS[sql] = stmt
    return stmt, {f"p{i}": v for i, v in enumerate(params)}


class Conn:
    """A handle on the store. It holds no database connection between statements: each statement outside
    :func:`tx` takes a pooled connection, runs in its own transaction (autocommit, like the ``sqlite3``
    connection this replaces) and gives the connection back; a :func:`tx` holds one for its duration. So a
    request that awaits its body or a worker thread never sits on a connection another request needs."""

    def __init__(self, db: DbLocation) -> None:
        self.db = db
        self.engine = engine(db)
        self.dialect = self.engine.dialect.name
        # PostgreSQL: a statement outside a tx runs in autocommit (the driver sends it alone: no BEGIN and COMMIT
        # round trips around it); the option is set on the connection when it is checked out and undone on return
        self._single = _autocommit(self.engine) if self.postgres else None
        self._c = None
        self._tx = None

    @property
    def postgres(self) -> bool:
        return self.dialect == "postgresql"

    @property
    def in_transaction(self) -> bool:
        return self._tx is not None

    def execute(self, sql: Any, params: Union[Sequence[Any], Dict[str, Any], None] = None) -> Cursor:
        if isinstance(sql, str):
            stmt, binds = _qmark(sql, tuple(params or ()))
        else:
            stmt, binds = sql, params
        if self._tx is not None:
            return self._run(self._c, stmt, binds)
        if self._single is not None:
            with self._single.connect() as c:
                return self._run(c, stmt, binds)
        with self.engine.connect() as c, c.begin():
            return self._run(c, stmt, binds)

    @staticmethod
    def _run(c: Any, stmt: Any, binds: Any) -> Cursor:
        res = c.execute(stmt, binds) if binds else c.execute(stmt)
        if res.returns_rows:
            keys = list(res.keys())
            return Cursor([Record(keys, r) for r in res.fetchall()], res.rowcount)
        return Cursor([], res.rowcount)

    def close(self) -> None:
        """Nothing to give back (connections return to the pool after each statement or transaction)."""


@contextmanager
def tx(conn: Conn, *, serialize: bool = True) -> Iterator[Conn]:
    """One write transaction on one pooled connection; a ``tx`` inside a ``tx`` joins the outer one."""
    if conn._tx is not None:
        yield conn
        return
    c = conn.engine.connect()
    try:
        if conn.dialect == "sqlite":
            c.info["immediate"] = True  # SQLite has one writer anyway; immediate avoids upgrade deadlocks
        t = c.begin()
        conn._c, conn._tx = c, t
        try:
            if conn.postgres and serialize:
                from sqlalchemy import text

                c.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
            yield conn
            t.commit()
        except BaseException:
            if t.is_active:
                t.rollback()
            raise
    finally:
        conn._c = conn._tx = None
        c.info.pop("immediate", None)
        c.close()


# --------------------------------------------------------------------------------------------------- migrations
def _alembic_config(connection: Any):
    require("alembic", "fleet", "the collector store's migrations")
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    cfg.attributes["connection"] = connection
    return cfg


def current_revision(db: DbLocation) -> Optional[str]:
    """The store's Alembic revision; ``"unversioned"`` for a store made before migrations; None when empty."""
    from sqlalchemy import inspect, text

    with engine(db).connect() as c:
        names = set(inspect(c).get_table_names())
        if "alembic_version" in names:
            return c.execute(text("SELECT version_num FROM alembic_version")).scalar()
        return "unversioned" if "reports" in names else None


def migrate(db: DbLocation, *, force: bool = False) -> str:
    """Bring the store to the current schema (idempotent, once per process); returns the revision.

    A store made before migrations (the raw-sqlite3 collector) is upgraded from the start: revision 0001 keeps
    the tables it has and creates the missing ones. A store whose revision this code does not know (made by a
    newer collector) is refused.
    """
    key = sqlalchemy_url(db)
    if key in _MIGRATED and not force:
        return HEAD
    from sqlalchemy.exc import OperationalError

    eng = engine(db)

    try:
        _upgrade(db, eng, key, force)
    except OperationalError as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0][:300]
        raise StoreUnavailable(f"cannot open the collector store {describe(db)}: {reason}; start the database "
                               f"server or correct --db (the schema is migrated when the store opens)") from None
    with _LOCK:
        _MIGRATED.add(key)
    return HEAD


def _upgrade(db: DbLocation, eng: Any, key: str, force: bool) -> None:
    from alembic import command
    from alembic.script import ScriptDirectory
    from sqlalchemy import inspect, text

    with _MIGRATE_LOCK, eng.connect() as c:
        if key in _MIGRATED and not force:  # another thread of this process just did it
            return
        c.info["immediate"] = True  # SQLite: take the write lock first (a read upgraded to a write is refused)
        with c.begin():
            if eng.dialect.name == "postgresql":  # one process migrates, the others wait and find it done
                c.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY + 1})
            cfg = _alembic_config(c)
            known = {s.revision for s in ScriptDirectory.from_config(cfg).walk_revisions()}
            names = set(inspect(c).get_table_names())
            rev = c.execute(text("SELECT version_num FROM alembic_version")).scalar() \
                if "alembic_version" in names else None
            if rev is not None and rev not in known:
                raise ConfigError(f"store {describe(db)} is at schema revision {rev}, which this collector does not "
                                  f"know (made by a newer defectkit?); upgrade defectkit, or use another --db")
            command.upgrade(cfg, "head")
        c.info.pop("immediate", None)


def connect(db: DbLocation, *, migrate_schema: bool = True) -> Conn:
    if migrate_schema:
        migrate(db)
    return Conn(db)
