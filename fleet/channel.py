"""The update channel: which version a device should run, as signed target metadata (``edge_runtime.targets``).

A device gets the canary version while a rollout of its line runs with it in the canary group, else the
line's active version. ``rollback`` is set when the line has already served a greater version, so a box may
have it and must be allowed to go back. The document expires ``expiry_s`` after it was issued.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Optional

from edge_runtime.errors import UserInputError
from edge_runtime.targets import TargetMetadata, sign_target, utc_text
from fleet import devices, registry, rollout
from fleet.db import Conn


class NoArtifact(UserInputError):
    """The chosen version has no model for the device's hardware target."""


@dataclass(frozen=True)
class Target:
    meta: TargetMetadata
    path: str  # the archive on the server


def target_for(conn: Conn, *, device_id: str, now: datetime, expiry_s: float) -> Optional[Target]:
    """The target of ``device_id`` (None: its line has no active version)."""
    dev = devices.get(conn, device_id=device_id, active=True)
    version = registry.active_version(conn, line=dev.line)
    r = rollout.running(conn, line=dev.line)
    if r is not None and device_id in r["canary"]:
        version = registry.get_version(conn, line=dev.line, version=r["version"])
    if version is None:
        return None
    if dev.hardware_target not in version["hardware_targets"]:
        raise NoArtifact(f"{dev.line} {version['version']} has no model for device {device_id}'s hardware target "
                         f"{dev.hardware_target!r} (it has: {', '.join(version['hardware_targets']) or 'none'})")
    meta = TargetMetadata(
        device=device_id, line=dev.line, version=version["version"], sha256=version["sha256"],
        length=int(version["length"]), issued=utc_text(now), expires=utc_text(now + timedelta(seconds=expiry_s)),
        hardware_target=dev.hardware_target,
        rollback=registry.served_above(conn, line=dev.line, version=version["version"]),
        url=f"/api/v1/bundles/{version['sha256']}")
    return Target(meta=meta, path=version["path"])


def load_targets_key(path):
    """The Ed25519 private key (PEM, as 'defectkit keys init' writes it) that signs target metadata.

    (``compress.keys`` has the same loader; fleet may import only ``edge_runtime``, hence this small copy.)"""
    from pathlib import Path

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edge_runtime.errors import ConfigError

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"cannot read the targets key {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"targets key {path} is not an unencrypted PEM private key ({exc}); make one with "
                          f"'defectkit keys init --dir DIR'") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"targets key {path} holds a {type(key).__name__}, not an Ed25519 key ('defectkit keys init')")
    return key


def signed_target(conn: Conn, *, device_id: str, private_key, now: Optional[datetime] = None,
                  expiry_s: float = 86400.0) -> Optional[dict]:
    now = now or datetime.now(timezone.utc)
    t = target_for(conn, device_id=device_id, now=now, expiry_s=expiry_s)
    if t is None:
        return None
    devices.note_target(conn, device_id=device_id, version=t.meta.version, now=now.timestamp())
    return sign_target(t.meta, private_key)


__all__ = ["NoArtifact", "Target", "target_for", "signed_target", "load_targets_key"]
