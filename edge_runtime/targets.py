"""Signed target metadata (TUF-style): which bundle a device should run, signed by the fleet registry.

The fleet server answers ``GET /api/v1/devices/{id}/target`` with::

    {"signed": {...TargetMetadata...}, "signature": "<base64 Ed25519>", "key_id": "<16 hex>"}

The signature covers :func:`canonical_bytes` of ``signed``. Before downloading anything the box calls
:func:`verify_target`: signature by the key it trusts, its own device and line, not expired (a frozen or
replaying server cannot keep a box on old metadata forever), a sane length (the download is capped at it).
Contract: docs/fleet.md. Leaf module: standard library and ``cryptography`` only, Python 3.9.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from typing import Any, Mapping, Optional

from edge_runtime.bundle import PublicKeyLike, key_id, load_public_key
from edge_runtime.errors import BundleError

SCHEMA = "defectkit.target/1"
HARDWARE_TARGETS = ("onnx", "x86", "arm")
DEFAULT_MAX_LENGTH = 1 << 30  # 1 GiB: the largest archive a box downloads (the puller's own cap)
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{3}|\.\d{6})?Z$")  # fromisoformat on 3.9


class TargetError(BundleError):
    """Target metadata that must not be acted on (signature, device, line, expiry, length, schema)."""


def utc_text(moment: datetime) -> str:
    """``2026-11-22T10:00:00Z`` (whole seconds, UTC)."""
    if moment.tzinfo is None:
        raise TargetError(f"time {moment!r} has no time zone: pass an aware UTC datetime")
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_utc(text: str, what: str = "time") -> datetime:
    if not isinstance(text, str) or not _TIME_RE.fullmatch(text):
        raise TargetError(f"target metadata: {what} {text!r} is not an ISO-8601 UTC time like 2026-11-22T10:00:00Z")
    return datetime.fromisoformat(text[:-1] + "+00:00")


@dataclass(frozen=True)
class TargetMetadata:
    """The signed part: this device, on this line, should run ``version`` (archive ``sha256``, ``length`` bytes)."""

    device: str
    line: str
    version: str
    sha256: str
    length: int
    expires: str
    issued: str
    hardware_target: str
    rollback: bool
    url: str
    schema: str = SCHEMA

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "TargetMetadata":
        """Parse ``signed``; TargetError naming every missing, unknown or ill-typed field."""
        if not isinstance(d, Mapping):
            raise TargetError(f"target metadata: 'signed' must be a JSON object, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        problems = []
        missing = [n for n in names if n not in d]
        if missing:
            problems.append(f"missing field(s) {', '.join(missing)}")
        unknown = sorted(set(d) - set(names))
        if unknown:
            problems.append(f"unknown field(s) {', '.join(unknown)}")
        for name in names:
            if name not in d:
                continue
            value = d[name]
            if name == "length":
                ok = isinstance(value, int) and not isinstance(value, bool)
                want = "an integer"
            elif name == "rollback":
                ok, want = isinstance(value, bool), "true or false"
            else:
                ok, want = isinstance(value, str) and value != "", "a non-empty string"
            if not ok:
                problems.append(f"field {name} must be {want}, got {value!r}")
        if problems:
            raise TargetError("target metadata refused: " + "; ".join(problems))
        if d["schema"] != SCHEMA:
            raise TargetError(f"target metadata schema {d['schema']!r} is not supported (this runtime reads {SCHEMA!r})")
        if not _SHA_RE.fullmatch(d["sha256"]):
            raise TargetError(f"target metadata: sha256 {d['sha256']!r} is not 64 lowercase hex digits")
        parse_utc(d["expires"], "expires")
        parse_utc(d["issued"], "issued")
        return cls(**{n: d[n] for n in names})


def canonical_bytes(signed: Mapping[str, Any]) -> bytes:
    """The exact bytes the signature covers."""
    return json.dumps(signed, sort_keys=True, separators=(",", ":")).encode()


def sign_target(meta: TargetMetadata, private_key) -> dict:
    """The document the server sends: ``{"signed", "signature", "key_id"}``."""
    signed = meta.to_dict()
    TargetMetadata.from_dict(signed)  # never sign what a box would refuse to read
    signature = private_key.sign(canonical_bytes(signed))
    return {"signed": signed, "signature": base64.b64encode(signature).decode("ascii"),
            "key_id": key_id(private_key.public_key())}


def verify_target(doc: Any, public_key: PublicKeyLike, *, device: str, line: str, now: Optional[datetime] = None,
                  max_length: int = DEFAULT_MAX_LENGTH) -> TargetMetadata:
    """Check a target document and return its metadata, or raise :class:`TargetError` saying why not.

    Order: shape, key id, signature (nothing unsigned is read further), fields, device, line, expiry, length."""
    from cryptography.exceptions import InvalidSignature

    key = load_public_key(public_key)
    if not isinstance(doc, Mapping) or not {"signed", "signature", "key_id"} <= set(doc):
        raise TargetError("target metadata refused: expected a JSON object with signed, signature and key_id "
                          "(unsigned metadata is never acted on)")
    if doc["key_id"] != key_id(key):
        raise TargetError(f"target metadata refused: signed by key {doc['key_id']!r}, but this box trusts key "
                          f"{key_id(key)} (install the fleet registry's targets public key)")
    try:
        signature = base64.b64decode(str(doc["signature"]), validate=True)
    except (binascii.Error, ValueError):
        raise TargetError("target metadata refused: the signature is not valid base64") from None
    signed = doc["signed"]
    if not isinstance(signed, Mapping):
        raise TargetError("target metadata refused: 'signed' is not a JSON object")
    try:
        key.verify(signature, canonical_bytes(signed))
    except InvalidSignature:
        raise TargetError("target metadata refused: the Ed25519 signature does not verify (tampered, or signed "
                          "by another key)") from None
    except (TypeError, ValueError) as exc:
        raise TargetError(f"target metadata refused: cannot check the signature ({exc})") from None
    meta = TargetMetadata.from_dict(signed)
    if meta.device != device:
        raise TargetError(f"target metadata refused: it is for device {meta.device!r}, this box is {device!r}")
    if meta.line != line:
        raise TargetError(f"target metadata refused: it is for line {meta.line!r}, this box runs line {line!r}")
    now = now or datetime.now(timezone.utc)
    if now.tzinfo is None:
        raise TargetError(f"verify_target: now {now!r} has no time zone (pass an aware UTC datetime)")
    if parse_utc(meta.expires, "expires") <= now:
        raise TargetError(f"target metadata refused: expired at {meta.expires} (now {utc_text(now)}); "
                          "the fleet server may be frozen or replaying old metadata")
    if meta.length <= 0 or meta.length > max_length:
        raise TargetError(f"target metadata refused: length {meta.length} bytes is outside 1..{max_length} "
                          "(the download is capped at the signed length)")
    return meta


__all__ = ["SCHEMA", "HARDWARE_TARGETS", "DEFAULT_MAX_LENGTH", "TargetError", "TargetMetadata", "canonical_bytes",
           "sign_target", "verify_target", "utc_text", "parse_utc"]
