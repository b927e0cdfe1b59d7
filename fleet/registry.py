"""The per-line model registry: signed bundles, content-addressed and immutable, with lineage and a state.

States: ``candidate`` (pushed) -> ``canary`` (a rollout runs it on a few boxes) -> ``active`` (every box of the
line) -> ``retired`` (replaced, or halted by a rollout). A push verifies the bundle with the edge box's own
code (:func:`edge_runtime.bundle.verify_bundle`) and refuses a manifest whose gate figures say it failed.
Archives live at ``<registry_dir>/bundles/sha256/<hex>.tar.gz`` (written atomically, read-only); pushing the
same archive again changes nothing. The registry trusts one bundle key, stored beside the archives on the
first push (``trusted_bundle_key.pub.pem``): a later push signed by another key is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from edge_runtime.bundle import Manifest, key_id, load_public_key, verify_bundle
from edge_runtime.errors import BundleError, UserInputError
from fleet import store
from fleet.db import Conn, Record

STATES = ("candidate", "canary", "active", "retired")
TRUSTED_KEY = "trusted_bundle_key.pub.pem"


def version_key(version: str) -> tuple:
    """Order of versions: dot/dash-separated parts, numbers compared as numbers (``1.10.0`` > ``1.9.0``)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.+-]", version))


@dataclass(frozen=True)
class PushResult:
    line: str
    version: str
    sha256: str
    length: int
    duplicate: bool


def _sha256_file(path: Path) -> tuple:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def bundle_path(registry_dir: Path, sha256: str) -> Path:
    return Path(registry_dir) / "bundles" / "sha256" / f"{sha256}.tar.gz"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _store_archive(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` atomically (temp file, fsync, rename, fsync dir); an existing file is kept."""
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as fh:
            shutil.copyfileobj(fh, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o444)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(dest.parent)


def trusted_key(registry_dir: Path, public_key: Optional[Path]):
    """The key pushes are verified with: the given one (stored on first use) or the stored one."""
    stored = Path(registry_dir) / TRUSTED_KEY
    if public_key is None:
        if not stored.is_file():
            raise UserInputError(f"the registry {registry_dir} has no trusted bundle key yet: give --public-key "
                                 f"bundle_signing_key.pub.pem (the key 'defectkit keys init' made) on the first push")
        return load_public_key(stored)
    key = load_public_key(public_key)
    if stored.is_file():
        have = load_public_key(stored)
        if key_id(have) != key_id(key):
            raise UserInputError(f"the registry trusts bundle key {key_id(have)} ({stored}), not {key_id(key)} "
                                 f"({public_key}); to change keys, replace {stored} yourself")
        return have
    from edge_runtime.fileio import atomic_write_bytes
    from cryptography.hazmat.primitives import serialization

    atomic_write_bytes(stored, key.public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    return key


def gate_refusals(manifest: Manifest) -> List[str]:
    """Why the manifest says the bundle must not ship (empty = its gates passed)."""
    out = [f"metrics.{k} = {v:g} (the gate refused this variant)" for k, v in sorted(manifest.metrics.items())
           if (k == "gate_passed" or k.endswith(".gate_passed")) and v < 1.0]
    retrain = manifest.recipe.get("retrain")
    if isinstance(retrain, dict) and retrain.get("status") not in (None, "passed"):
        out.append(f"recipe.retrain.status = {retrain.get('status')!r} (the forgetting gate did not pass)")
    return out


def hardware_targets(manifest: Manifest) -> List[str]:
    """Which device hardware targets (``onnx``, ``x86``, ``arm``) the bundle has a model for."""
    out = set()
    for m in manifest.models:
        if m.format == "onnx":
            out.add("onnx")
        elif m.format == "paddlelite":
            out.update({"x86", "arm"} if m.target == "any" else {m.target})
    return sorted(out)


def lineage(manifest: Manifest) -> Dict[str, Any]:
    recipe, metrics = manifest.recipe, manifest.metrics
    data_hash = next((recipe[k] for k in ("data_sha256", "data_hash", "dataset_sha256") if k in recipe), None)
    retrain = recipe.get("retrain") if isinstance(recipe.get("retrain"), dict) else None
    return {
        "parent_version": manifest.parent_version,
        "training_run": recipe.get("run"),
        "data_hash": data_hash,
        "gate": {k: v for k, v in metrics.items() if "map" in k or "gate" in k},
        "forgetting": ({"old_classes_map_drop_pts": metrics.get("old_classes_map_drop_pts"), **(retrain or {})}
                       if retrain or "old_classes_map_drop_pts" in metrics else None),
        "models": [f"{m.format}/{m.target}/{m.precision}" for m in manifest.models],
        "created": manifest.created,
        "kit_version": manifest.kit_version,
    }


def push(conn: Conn, *, archive: Path, registry_dir: Path, public_key: Optional[Path] = None,
         line: Optional[str] = None, now: Optional[float] = None) -> PushResult:
    """Verify, check the gates, store content-addressed, register as ``candidate`` (``line``: the line the
    caller expects, refused when the manifest names another)."""
    archive, registry_dir = Path(archive), Path(registry_dir)
    if not archive.is_file():
        raise UserInputError(f"bundle archive {archive} does not exist (push the .tar.gz that 'defectkit bundle' wrote)")
    key = trusted_key(registry_dir, public_key)
    sha, length = _sha256_file(archive)
    work = Path(tempfile.mkdtemp(prefix="push-", dir=_tmp_dir(registry_dir)))
    try:
        try:
            manifest = verify_bundle(archive, key, extract_to=work / "b")
        except BundleError as exc:
            raise BundleError(f"push of {archive.name} refused: {exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if line is not None and manifest.line != line:
        raise UserInputError(f"push refused: the bundle is for line '{manifest.line}', not '{line}'")
    refused = gate_refusals(manifest)
    if refused:
        raise UserInputError(f"push of {manifest.line} {manifest.version} refused: the bundle did not pass its "
                             f"gates: {'; '.join(refused)}")
    line, version = manifest.line, manifest.version
    old = conn.execute("SELECT sha256 FROM registry_versions WHERE line = ? AND version = ?", (line, version)).fetchone()
    if old is not None:
        if old["sha256"] != sha:
            raise UserInputError(f"{line} {version} is already in the registry with another archive (sha256 "
                                 f"{old['sha256'][:16]}…, this one {sha[:16]}…): versions are immutable, pick a new one")
        return PushResult(line, version, sha, length, duplicate=True)
    dest = bundle_path(registry_dir, sha)
    _store_archive(archive, dest)
    now = time.time() if now is None else now
    with store.tx(conn):
        seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM registry_versions WHERE line = ?", (line,)).fetchone()[0]
        conn.execute(
            "INSERT INTO registry_versions(line, version, seq, sha256, length, path, state, parent_version, created, "
            "pushed_at, gates_passed, hardware_targets, lineage) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (line, version, seq, sha, length, str(dest), "candidate", manifest.parent_version, manifest.created, now, 1,
             json.dumps(hardware_targets(manifest)), json.dumps(lineage(manifest), sort_keys=True)))
        event(conn, line=line, version=version, kind="push", detail=f"sha256 {sha} ({length} bytes)", now=now)
    return PushResult(line, version, sha, length, duplicate=False)


def _tmp_dir(registry_dir: Path) -> Path:
    d = Path(registry_dir) / "tmp"
    d.mkdir(parents=True, exist_ok=True)
    return d


def event(conn: Conn, *, line: str, version: Optional[str], kind: str, detail: str, now: float) -> None:
    """Log a registry event (inside the caller's transaction)."""
    conn.execute("INSERT INTO registry_events(line, version, at, kind, detail) VALUES (?,?,?,?,?)",
                 (line, version, now, kind, detail))


def _public(r: Record) -> Dict[str, Any]:
    d = dict(r)
    d["hardware_targets"] = json.loads(d["hardware_targets"])
    d["lineage"] = json.loads(d["lineage"])
    d["gates_passed"] = bool(d["gates_passed"])
    return d


def lines(conn: Conn) -> List[str]:
    return [r[0] for r in conn.execute("SELECT DISTINCT line FROM registry_versions ORDER BY line").fetchall()]


def list_versions(conn: Conn, *, line: str) -> List[Dict[str, Any]]:
    rows = conn.execute("SELECT * FROM registry_versions WHERE line = ? ORDER BY seq", (line,)).fetchall()
    return [_public(r) for r in rows]


def get_version(conn: Conn, *, line: str, version: str) -> Dict[str, Any]:
    row = conn.execute("SELECT * FROM registry_versions WHERE line = ? AND version = ?", (line, version)).fetchone()
    if row is None:
        have = ", ".join(v["version"] for v in list_versions(conn, line=line)) or "none"
        raise UserInputError(f"line '{line}' has no version {version} in the registry (it has: {have})")
    return _public(row)


def active_version(conn: Conn, *, line: str) -> Optional[Dict[str, Any]]:
    row = conn.execute("SELECT * FROM registry_versions WHERE line = ? AND state = 'active'", (line,)).fetchone()
    return None if row is None else _public(row)


def by_sha(conn: Conn, *, sha256: str) -> List[Dict[str, Any]]:
    return [_public(r) for r in conn.execute("SELECT * FROM registry_versions WHERE sha256 = ?", (sha256,)).fetchall()]


def events(conn: Conn, *, line: str) -> List[Dict[str, Any]]:
    return [dict(r) for r in conn.execute("SELECT * FROM registry_events WHERE line = ? ORDER BY id", (line,))]


def set_state(conn: Conn, *, line: str, version: str, state: str, now: float, note: str = "") -> None:
    """Change one version's state (inside the caller's transaction), stamping when it became canary/active."""
    if state not in STATES:
        raise ValueError(state)
    stamp = {"canary": "canary_at", "active": "activated_at", "retired": "retired_at"}.get(state)
    sql = f"UPDATE registry_versions SET state = ?{f', {stamp} = ?' if stamp else ''}, note = COALESCE(?, note) " \
          f"WHERE line = ? AND version = ?"
    args = [state] + ([now] if stamp else []) + [note or None, line, version]
    conn.execute(sql, args)
    event(conn, line=line, version=version, kind=state, detail=note or state, now=now)


def activate(conn: Conn, *, line: str, version: str, now: float, note: str) -> Optional[str]:
    """Make ``version`` the active one (the previous active is retired); returns the previous active version."""
    prev = active_version(conn, line=line)
    if prev is not None and prev["version"] != version:
        set_state(conn, line=line, version=prev["version"], state="retired", now=now, note=f"replaced by {version}")
    set_state(conn, line=line, version=version, state="active", now=now, note=note)
    return prev["version"] if prev else None


def promote(conn: Conn, *, line: str, version: str, now: Optional[float] = None) -> Optional[str]:
    """Make ``version`` active for the whole line now. A running rollout of another version must be stopped first."""
    from fleet import rollout

    now = time.time() if now is None else now
    v = get_version(conn, line=line, version=version)
    if v["state"] == "active":
        raise UserInputError(f"{line} {version} is already the active version")
    running = rollout.running(conn, line=line)
    if running is not None and running["version"] != version:
        raise UserInputError(f"a rollout of {line} {running['version']} is running: stop it first "
                             f"(defectkit rollout stop {line}) or let it decide")
    with store.tx(conn):
        prev = activate(conn, line=line, version=version, now=now, note="promoted by hand")
        if running is not None:
            rollout.finish(conn, rollout_id=running["id"], state="promoted", reason="promoted by hand", now=now,
                           figures={})
    return prev


def rollback(conn: Conn, *, line: str, to: Optional[str] = None, now: Optional[float] = None) -> str:
    """Back to ``to`` (default: the most recently active earlier version); it must have passed its gates and
    been active before. A running rollout of the line is stopped. Returns the version now active."""
    from fleet import rollout

    now = time.time() if now is None else now
    current = active_version(conn, line=line)
    versions = list_versions(conn, line=line)
    if not versions:
        raise UserInputError(f"line '{line}' has no version in the registry: nothing to roll back")
    if to is None:
        earlier = [v for v in versions if v["activated_at"] is not None and v["gates_passed"]
                   and (current is None or v["version"] != current["version"])]
        if not earlier:
            raise UserInputError(f"line '{line}' has no earlier version that passed its gates and was active: "
                                 f"nothing to roll back to")
        target = max(earlier, key=lambda v: v["activated_at"])
    else:
        target = get_version(conn, line=line, version=to)
        if not target["gates_passed"]:
            raise UserInputError(f"cannot roll back {line} to {to}: it never passed its gates")
        if target["activated_at"] is None:
            raise UserInputError(f"cannot roll back {line} to {to}: it was never active (state {target['state']}); "
                                 f"roll back only to a version that ran on the whole line")
        if current is not None and current["version"] == to:
            raise UserInputError(f"{line} {to} is already the active version")
    running = rollout.running(conn, line=line)
    with store.tx(conn):
        if running is not None:
            set_state(conn, line=line, version=running["version"], state="retired", now=now, note="registry rollback")
            rollout.finish(conn, rollout_id=running["id"], state="stopped", reason="registry rollback", now=now,
                           figures={})
        activate(conn, line=line, version=target["version"], now=now,
                 note=f"rollback from {current['version'] if current else 'none'}")
        event(conn, line=line, version=target["version"], kind="rollback",
              detail=f"from {current['version'] if current else 'none'}", now=now)
    return target["version"]


def served_above(conn: Conn, *, line: str, version: str) -> bool:
    """True when the line has served (canary or active) a version greater than ``version``: a box may run it,
    so sending ``version`` is a rollback the box must be told about."""
    rows = conn.execute("SELECT version FROM registry_versions WHERE line = ? AND (canary_at IS NOT NULL OR "
                        "activated_at IS NOT NULL)", (line,)).fetchall()
    return any(version_key(r[0]) > version_key(version) for r in rows)


__all__ = ["STATES", "PushResult", "push", "list_versions", "get_version", "active_version", "promote", "rollback",
           "served_above", "version_key", "bundle_path", "gate_refusals", "hardware_targets", "lines", "by_sha",
           "events", "set_state", "activate", "trusted_key"]
