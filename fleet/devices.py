"""Enrolled devices: each bound to one line, with tags, a token printed once and stored as a salted scrypt hash.

The token is ``secrets.token_urlsafe(32)``. The store keeps a per-device random salt and
``scrypt(token, salt)``; to find the row without trying every device it also keeps ``token_lookup``, the first
16 hex digits of the token's SHA-256 (of a 256-bit random secret: it tells nothing about the token). The
collector reads the row on every request, so ``revoke`` and ``rotate`` take effect at once. A verified
(token, stored hash) pair is cached in memory so scrypt runs once per token, not once per request.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

from edge_runtime.errors import UserInputError
from edge_runtime.wire_report import NAME_RE
from edge_runtime.targets import HARDWARE_TARGETS
from fleet import store
from fleet.db import Conn, Record

_SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1, "dklen": 32}
DEFAULT_TARGET = "onnx"


@dataclass(frozen=True)
class Device:
    device_id: str
    line: str
    tags: Dict[str, str] = field(default_factory=dict)
    enrolled_at: float = 0.0
    revoked_at: Optional[float] = None
    rotated_at: Optional[float] = None
    last_target: Optional[str] = None

    @property
    def hardware_target(self) -> str:
        return self.tags.get("target", DEFAULT_TARGET)

    def public(self) -> dict:
        return {"device_id": self.device_id, "line": self.line, "tags": dict(self.tags),
                "hardware_target": self.hardware_target, "enrolled_at": self.enrolled_at,
                "rotated_at": self.rotated_at, "revoked_at": self.revoked_at, "last_target": self.last_target}


def _lookup(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:16]


def _hash(token: str, salt: bytes) -> str:
    return hashlib.scrypt(token.encode("utf-8"), salt=salt, **_SCRYPT).hex()


def parse_tags(items: Sequence[str]) -> Dict[str, str]:
    """``["site=a", "target=x86"]`` -> dict; refuses a malformed tag or an unknown hardware target."""
    tags: Dict[str, str] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not NAME_RE.match(key) or not NAME_RE.match(value):
            raise UserInputError(f"tag {item!r} must be KEY=VALUE (letters, digits, '.', '_', '-'), e.g. site=a")
        tags[key] = value
    target = tags.get("target", DEFAULT_TARGET)
    if target not in HARDWARE_TARGETS:
        raise UserInputError(f"tag target={target} is not a hardware target; use one of {', '.join(HARDWARE_TARGETS)} "
                             f"(x86 and arm get the Paddle Lite .nb, onnx the ONNX model)")
    return tags


def _row_device(r: Record) -> Device:
    return Device(device_id=r["device_id"], line=r["line"], tags=json.loads(r["tags"]), enrolled_at=r["enrolled_at"],
                  revoked_at=r["revoked_at"], rotated_at=r["rotated_at"], last_target=r["last_target"])


def _new_secret(conn: Conn) -> tuple:
    token = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    return token, _lookup(token), salt.hex(), _hash(token, salt)


def enroll(conn: Conn, *, line: str, device_id: str, tags: Mapping[str, str] = None,
           now: Optional[float] = None) -> str:
    """Bind ``device_id`` to ``line`` and return its token (shown once; only the salted hash is kept)."""
    from fleet import registry

    for what, value in (("device", device_id), ("line", line)):
        if not isinstance(value, str) or not NAME_RE.match(value):
            raise UserInputError(f"{what} id {value!r} must be 1-64 letters, digits, '.', '_' or '-'")
    tags = dict(tags or {})
    parse_tags([f"{k}={v}" for k, v in tags.items()])
    if not registry.list_versions(conn, line=line):
        known = ", ".join(registry.lines(conn)) or "none yet"
        raise UserInputError(f"cannot enrol {device_id} on line '{line}': the registry has no version of that line "
                             f"(lines in the registry: {known}). Push a bundle first: defectkit registry push BUNDLE.tar.gz")
    now = time.time() if now is None else now
    token, lookup, salt, digest = _new_secret(conn)
    with store.tx(conn):
        row = conn.execute("SELECT line, revoked_at FROM enrolments WHERE device_id = ?", (device_id,)).fetchone()
        if row is not None and row["revoked_at"] is None:
            raise UserInputError(f"device {device_id} is already enrolled on line '{row['line']}': use "
                                 f"'defectkit fleet rotate --device {device_id}' for a new token, or revoke it first")
        conn.execute("DELETE FROM enrolments WHERE device_id = ?", (device_id,))  # a revoked enrolment is replaced
        conn.execute("INSERT INTO enrolments(device_id, line, token_lookup, token_salt, token_hash, tags, "
                     "enrolled_at) VALUES (?,?,?,?,?,?,?)", (device_id, line, lookup, salt, digest,
                                                             json.dumps(tags, sort_keys=True), now))
    return token


def rotate(conn: Conn, *, device_id: str, now: Optional[float] = None) -> str:
    """A new token for an enrolled device; the old one stops working at once."""
    get(conn, device_id=device_id, active=True)
    token, lookup, salt, digest = _new_secret(conn)
    with store.tx(conn):
        conn.execute("UPDATE enrolments SET token_lookup = ?, token_salt = ?, token_hash = ?, rotated_at = ? "
                     "WHERE device_id = ?", (lookup, salt, digest, time.time() if now is None else now, device_id))
    return token


def revoke(conn: Conn, *, device_id: str, now: Optional[float] = None) -> Device:
    get(conn, device_id=device_id, active=True)
    with store.tx(conn):
        conn.execute("UPDATE enrolments SET revoked_at = ? WHERE device_id = ?",
                     (time.time() if now is None else now, device_id))
    return get(conn, device_id=device_id)


def get(conn: Conn, *, device_id: str, active: bool = False) -> Device:
    row = conn.execute("SELECT * FROM enrolments WHERE device_id = ?", (device_id,)).fetchone()
    if row is None:
        raise UserInputError(f"unknown device {device_id!r}: not enrolled (defectkit fleet enroll --line L --device "
                             f"{device_id})")
    dev = _row_device(row)
    if active and dev.revoked_at is not None:
        raise UserInputError(f"device {device_id} was revoked; enrol it again for a new token")
    return dev


def find(conn: Conn, *, device_id: str) -> Optional[Device]:
    row = conn.execute("SELECT * FROM enrolments WHERE device_id = ?", (device_id,)).fetchone()
    return None if row is None else _row_device(row)


def list_enrolled(conn: Conn, *, line: Optional[str] = None, active: bool = False) -> List[Device]:
    sql, args = "SELECT * FROM enrolments", []
    clauses = []
    if line:
        clauses.append("line = ?")
        args.append(line)
    if active:
        clauses.append("revoked_at IS NULL")
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    return [_row_device(r) for r in conn.execute(sql + " ORDER BY device_id", args).fetchall()]


def note_target(conn: Conn, *, device_id: str, version: str, now: float) -> None:
    with store.tx(conn):
        conn.execute("UPDATE enrolments SET last_target = ?, last_target_at = ? WHERE device_id = ?",
                     (version, now, device_id))


class Authenticator:
    """Token -> enrolled device, against the store on every call; scrypt results cached per (token, hash)."""

    def __init__(self, max_cache: int = 4096) -> None:
        self._ok: Dict[tuple, bool] = {}
        self._lock = threading.Lock()
        self._max = max_cache

    def identify(self, conn: Conn, token: str) -> tuple:
        """(Device, None) when the token is valid; (None, reason) for a revoked token; (None, None) if unknown."""
        rows = conn.execute("SELECT * FROM enrolments WHERE token_lookup = ?", (_lookup(token),)).fetchall()
        for row in rows:
            key = (hashlib.sha256(token.encode("utf-8")).hexdigest(), row["token_hash"])
            with self._lock:
                ok = self._ok.get(key)
            if ok is None:
                ok = hmac.compare_digest(_hash(token, bytes.fromhex(row["token_salt"])), row["token_hash"])
                with self._lock:
                    if len(self._ok) >= self._max:
                        self._ok.clear()
                    self._ok[key] = ok
            if not ok:
                continue
            dev = _row_device(row)
            if dev.revoked_at is not None:
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(dev.revoked_at))
                return None, (f"the token of device {dev.device_id!r} was revoked at {when}; enrol the device again "
                              f"(defectkit fleet enroll)")
            return dev, None
        return None, None


__all__ = ["Device", "Authenticator", "enroll", "rotate", "revoke", "get", "find", "list_enrolled", "parse_tags",
           "note_target", "DEFAULT_TARGET"]
