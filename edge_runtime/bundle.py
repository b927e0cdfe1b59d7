"""The signed bundle an edge box accepts: manifest schema, signature and checksum verification.

A bundle is a directory (or a ``.tar.gz`` of one) holding ``manifest.json``, ``manifest.sig`` and the files the
manifest lists with their sha256: model files, golden images with expected outputs, ``drift_reference.json``.
The edge box trusts nothing in it until :func:`verify_bundle` has checked the Ed25519 signature over the exact
bytes of ``manifest.json``, then every listed file's sha256, and that nothing unlisted is present.

``manifest.sig`` is a small JSON object: the base64 signature plus the signer's key id, the manifest's sha256
and a checksum of those fields. Only the signature is security; the rest lets the error name the damaged file
(manifest.json or manifest.sig) and tell "signed by another key" apart from "tampered".
This module runs on the edge box (Python 3.9, no paddle): it imports only the standard library,
``cryptography`` and the rest of ``edge_runtime``.
"""
from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Union

from edge_runtime.errors import BundleError, ConfigError, require
from edge_runtime.modelspec import FORMATS, NMS_PLACES, PRECISIONS, TARGETS, InputSpec, PostprocessSpec
from edge_runtime.modelspec import file_sha256 as sha256_file
from edge_runtime.settings import BoxSettings

SCHEMA = "defectkit.bundle/2"  # /2: the line's runtime, drift and report settings travel in the manifest
SIGNATURE_SCHEMA = "defectkit.bundle-signature/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

PublicKeyLike = Union[str, Path, bytes, Any]


@dataclass(frozen=True)
class FileRef:
    """A file inside the bundle (POSIX path relative to its root) and its sha256."""

    file: str
    sha256: str


@dataclass(frozen=True)
class ModelEntry:
    """One model file; the same vocabulary as deploy.json's entries (:mod:`edge_runtime.modelspec`).

    ``runtime_version`` is the runtime the file needs (Paddle Lite ``2.13rc0`` for a ``.nb``: the runtime
    refuses another version); ``params`` is the weights file of a paddle inference model.

    ``variant`` (optional, e.g. ``fp32``, ``ort-int8``): the gated variant of the run the file belongs to. A bundle
    may carry several variants for one backend; the box times them on its own CPU and runs the fastest that passes
    its self-test (:mod:`edge_runtime.variant_choice`). Optional so that single-variant bundles stay byte-identical
    and a /2 reader that predates it (which ignores unknown keys of a model entry and runs the first runnable
    model, FP32 by the builder's order) still reads a multi-variant bundle."""

    file: str
    format: str
    target: str
    precision: str
    runtime_version: str | None
    sha256: str
    nms: str
    params: FileRef | None = None
    variant: str | None = None


@dataclass(frozen=True)
class GoldenImage:
    """A golden image and the detections the parent model gave on it (the self-test after every update)."""

    file: str
    sha256: str
    expected: FileRef


@dataclass(frozen=True)
class Manifest:
    """Everything the edge box needs to know about a bundle. ``root`` is where its files are (set by
    :func:`verify_bundle`; not part of the signed JSON)."""

    line: str
    version: str
    parent_version: str | None
    created: str
    classes: tuple[str, ...]
    input: InputSpec
    postprocess: PostprocessSpec
    models: tuple[ModelEntry, ...]
    metrics: dict[str, float]
    recipe: dict[str, Any]
    golden: tuple[GoldenImage, ...]
    drift_reference: FileRef
    settings: BoxSettings  # the line's runtime / drift / report sections: what the box runs on
    kit_version: str = "0"
    # the golden check's tolerance the gate judged with (compress.golden_*); the box's self-test uses the same
    golden_tolerance: Mapping[str, float] | None = None
    schema: str = SCHEMA
    root: Path | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "schema": self.schema,
            "line": self.line,
            "version": self.version,
            "parent_version": self.parent_version,
            "created": self.created,
            "kit_version": self.kit_version,
            "classes": list(self.classes),
            "input": self.input.to_dict(),
            "postprocess": self.postprocess.to_dict(),
            "models": [_drop_none(asdict(m)) for m in self.models],
            "metrics": dict(self.metrics),
            "recipe": dict(self.recipe),
            "golden": [asdict(g) for g in self.golden],
            "drift_reference": asdict(self.drift_reference),
            "settings": self.settings.to_dict(),
        }
        if self.golden_tolerance is not None:
            out["golden_tolerance"] = dict(self.golden_tolerance)
        return out

    def to_bytes(self) -> bytes:
        """The canonical bytes of ``manifest.json`` (what the signature covers)."""
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")

    def files(self) -> dict[str, str]:
        """Every file the manifest lists, path -> sha256 (manifest.json and manifest.sig excluded)."""
        out: dict[str, str] = {}
        for m in self.models:
            out[m.file] = m.sha256
            if m.params is not None:
                out[m.params.file] = m.params.sha256
        for g in self.golden:
            out[g.file] = g.sha256
            out[g.expected.file] = g.expected.sha256
        out[self.drift_reference.file] = self.drift_reference.sha256
        return out

    def path(self, rel: str) -> Path:
        """Absolute path of a bundle file (only after verification, when ``root`` is known)."""
        if self.root is None:
            raise BundleError(f"bundle {self.line} {self.version}: no root directory (load it with verify_bundle)")
        return self.root / rel

    def model(self, format: str, target: str | None = None, precision: str | None = None) -> ModelEntry:
        """The model entry for a backend; BundleError listing what the bundle has when there is none."""
        for m in self.models:
            if m.format == format and target in (None, m.target) and precision in (None, m.precision):
                return m
        have = ", ".join(f"{m.format}/{m.target}/{m.precision}" for m in self.models) or "none"
        raise BundleError(
            f"bundle {self.line} {self.version} has no {format} model"
            f"{' for ' + target if target else ''}{' ' + precision if precision else ''} (it has: {have})"
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = MANIFEST) -> "Manifest":
        """Parse and validate a manifest; BundleError naming the field on anything malformed."""
        if not isinstance(d, Mapping):
            raise BundleError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("schema") != SCHEMA:
            raise BundleError(
                f"{source}: schema {d.get('schema')!r} is not supported (this runtime reads {SCHEMA!r}); "
                "update the edge runtime or rebuild the bundle"
            )
        try:
            models = tuple(_model_from(m, f"{source}: models[{i}]") for i, m in enumerate(d["models"]))
            golden = tuple(
                GoldenImage(file=_rel(g["file"], source), sha256=_sha(g["sha256"], source),
                            expected=_ref(g["expected"], source))
                for g in d.get("golden", [])
            )
            man = cls(
                schema=d["schema"],
                line=_name(d["line"], "line", source),
                version=_name(d["version"], "version", source),
                parent_version=d.get("parent_version"),
                created=str(d["created"]),
                kit_version=str(d.get("kit_version", "0")),
                classes=tuple(str(c) for c in d["classes"]),
                input=InputSpec.from_dict(d["input"], source),
                postprocess=PostprocessSpec.from_dict(d.get("postprocess", {}), source),
                models=models,
                metrics={str(k): float(v) for k, v in d.get("metrics", {}).items()},
                recipe=dict(d.get("recipe", {})),
                golden=golden,
                drift_reference=_ref(d["drift_reference"], source),
                settings=BoxSettings.from_sections(d["settings"], f"{source}: settings", require_all=True),
                golden_tolerance=_tolerance(d.get("golden_tolerance"), source),
            )
        except KeyError as exc:
            raise BundleError(f"{source}: missing field {exc}") from None
        except ConfigError as exc:
            raise BundleError(str(exc)) from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"{source}: malformed field: {exc}") from None
        if not man.classes:
            raise BundleError(f"{source}: 'classes' is empty")
        if not man.models:
            raise BundleError(f"{source}: 'models' is empty")
        _check_variants(man.models, source)
        return man


GOLDEN_TOLERANCE_KEYS = ("score", "box_px", "box_rel", "min_score")


def _tolerance(raw: Any, source: str) -> dict[str, float] | None:
    """The optional ``golden_tolerance``: exactly score, box_px, box_rel, min_score, each a number >= 0."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or set(raw) != set(GOLDEN_TOLERANCE_KEYS):
        raise BundleError(f"{source}: 'golden_tolerance' must hold exactly {', '.join(GOLDEN_TOLERANCE_KEYS)}")
    out = {}
    for k in GOLDEN_TOLERANCE_KEYS:
        v = raw[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1e6:
            raise BundleError(f"{source}: golden_tolerance.{k} must be a number >= 0, got {v!r}")
        out[k] = float(v)
    return out


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _name(value: Any, what: str, source: str) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise BundleError(f"{source}: {what} {value!r} must match {NAME_RE.pattern} (letters, digits, . _ -)")
    return value


def _sha(value: Any, source: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise BundleError(f"{source}: {value!r} is not a sha256 hex digest")
    return value


def _rel(value: Any, source: str) -> str:
    """A bundle-relative POSIX path that cannot leave the bundle."""
    p = PurePosixPath(str(value))
    if not str(value) or p.is_absolute() or ".." in p.parts or str(p) != str(value) or str(value) in (
        MANIFEST, SIGNATURE
    ):
        raise BundleError(f"{source}: file path {value!r} is not a plain relative path inside the bundle")
    return str(value)


def _ref(d: Mapping[str, Any], source: str) -> FileRef:
    return FileRef(file=_rel(d["file"], source), sha256=_sha(d["sha256"], source))


def _model_from(d: Mapping[str, Any], source: str) -> ModelEntry:
    for key, allowed in (("format", FORMATS), ("target", TARGETS), ("precision", PRECISIONS), ("nms", NMS_PLACES)):
        if d.get(key) not in allowed:
            raise BundleError(f"{source}: {key} {d.get(key)!r} is not one of {allowed}")
    version = d.get("runtime_version")
    if d["format"] == "paddlelite" and not version:
        raise BundleError(f"{source}: a paddlelite model needs its 'runtime_version' (the opt version that made it)")
    params = _ref(d["params"], source) if d.get("params") else None
    variant = d.get("variant")
    if variant is not None:
        variant = _name(variant, "variant", source)
    return ModelEntry(file=_rel(d["file"], source), format=d["format"], target=d["target"],
                      precision=d["precision"], runtime_version=None if version is None else str(version),
                      sha256=_sha(d["sha256"], source), nms=d["nms"], params=params, variant=variant)


def _check_variants(models: tuple[ModelEntry, ...], source: str) -> None:
    """A variant has at most one model per format and target (else the box could not tell which one it timed)."""
    seen: dict[tuple[str, str, str], int] = {}
    for i, m in enumerate(models):
        if m.variant is None:
            continue
        key = (m.variant, m.format, m.target)
        if key in seen:
            raise BundleError(f"{source}: models[{i}] and models[{seen[key]}] are both variant {m.variant!r} for "
                              f"{m.format}/{m.target}: a variant ships one model per format and target; rebuild "
                              "the bundle")
        seen[key] = i


# ---------------------------------------------------------------------------------------------- keys, signature


def load_public_key(key: PublicKeyLike):
    """An Ed25519 public key from a PEM file path, PEM bytes or a key object."""
    require("cryptography", "edge", "Bundle verification")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if isinstance(key, Ed25519PublicKey):
        return key
    where = "public key"
    if isinstance(key, (str, Path)):
        where = str(key)
        try:
            key = Path(key).read_bytes()
        except OSError as exc:
            raise BundleError(f"cannot read the public key {where}: {exc.strerror}") from None
    try:
        loaded = serialization.load_pem_public_key(bytes(key))
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{where} is not a PEM public key ({exc}); use the .pub.pem from 'defectkit keys init'") from None
    if not isinstance(loaded, Ed25519PublicKey):
        raise BundleError(f"{where} is a {type(loaded).__name__}, not an Ed25519 public key")
    return loaded


def key_id(public_key) -> str:
    """A short fingerprint of a public key: sha256 of its raw 32 bytes, first 16 hex digits."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _sig_check(fields: Mapping[str, str]) -> str:
    text = "|".join(str(fields.get(k, "")) for k in ("schema", "algorithm", "key_id", "manifest_sha256", "signature"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def signature_document(manifest_bytes: bytes, signature: bytes, public_key) -> bytes:
    """The bytes of ``manifest.sig`` for a signature made by the builder."""
    doc = {
        "schema": SIGNATURE_SCHEMA,
        "algorithm": "Ed25519",
        "key_id": key_id(public_key),
        "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "signature": base64.b64encode(signature).decode("ascii"),
    }
    doc["check"] = _sig_check(doc)
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("ascii")


def _verify_signature(root: Path, manifest_bytes: bytes, public_key) -> None:
    sig_path = root / SIGNATURE
    if not sig_path.is_file():
        raise BundleError(
            f"unsigned bundle refused: {root} has no {SIGNATURE}; build and sign it with 'defectkit bundle build --key ...'"
        )
    _check_signature(sig_path.read_bytes(), manifest_bytes, public_key, sig_path)


def _check_signature(sig_bytes: bytes, manifest_bytes: bytes, public_key, where) -> None:
    from cryptography.exceptions import InvalidSignature

    try:
        doc = json.loads(sig_bytes.decode("utf-8"))
        if not isinstance(doc, dict) or doc.get("check") != _sig_check(doc) or doc.get("schema") != SIGNATURE_SCHEMA:
            raise ValueError("damaged")
        signature = base64.b64decode(doc["signature"], validate=True)
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, binascii.Error):
        raise BundleError(f"{SIGNATURE} is damaged or not a defectkit signature ({where}): bundle refused") from None
    if hashlib.sha256(manifest_bytes).hexdigest() != doc.get("manifest_sha256"):
        raise BundleError(f"{MANIFEST} was modified after signing (its sha256 differs from {SIGNATURE}): bundle refused")
    if doc.get("key_id") != key_id(public_key):
        raise BundleError(
            f"{SIGNATURE}: bundle signed by key {doc.get('key_id')}, but this box trusts key {key_id(public_key)}: "
            "bundle refused (install the signer's public key, or rebuild the bundle with the right key)"
        )
    try:
        public_key.verify(signature, manifest_bytes)
    except InvalidSignature:
        raise BundleError(f"{SIGNATURE}: the Ed25519 signature over {MANIFEST} does not verify: bundle refused") from None


# ------------------------------------------------------------------------------------------------ verification


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps on what a bundle archive may unpack to, checked on the tar headers while the archive is read (before
    anything is written) and again while writing. A real bundle holds a few models, golden images with their
    expectations and a drift reference: tens of files, its archive's size or a little more unpacked."""

    max_members: int = 4096
    max_unpacked_bytes: int = 2 << 30  # the sum of the members' sizes
    max_meta_bytes: int = 1 << 20  # manifest.json and manifest.sig are read into memory

    def stream_cap(self) -> int:
        """The most decompressed bytes a tar stream within these limits can have (headers, padding, end blocks)."""
        return self.max_unpacked_bytes + (self.max_members + 2) * 2048 + 20 * 512


class _CappedReader:
    """A read-only stream that raises BundleError once more than ``cap`` bytes were read (a gzip bomb)."""

    def __init__(self, raw, cap: int, where: Path) -> None:
        self.raw, self.cap, self.where, self.count = raw, cap, where, 0

    def read(self, n: int = -1) -> bytes:
        if n == 0:
            return b""
        room = self.cap + 1 - self.count  # >= 1: past the cap read() has raised already
        data = self.raw.read(min(room, 1 << 20) if n is None or n < 0 else min(n, room))
        self.count += len(data)
        if self.count > self.cap:
            raise BundleError(f"{self.where}: decompresses to more than {self.cap} bytes (a bundle within the limits "
                              "cannot): archive refused")
        return data


class _Members:
    """The checks every member gets, in both passes: a plain relative path, a file or directory, the count and
    size caps, no name twice."""

    def __init__(self, archive: Path, limits: ArchiveLimits) -> None:
        self.archive, self.limits = archive, limits
        self.count = self.total = 0
        self.names: set[str] = set()

    def check(self, m: tarfile.TarInfo) -> str:
        self.count += 1
        if self.count > self.limits.max_members:
            raise BundleError(f"{self.archive}: more than {self.limits.max_members} members: archive refused")
        p = PurePosixPath(m.name)
        if p.is_absolute() or ".." in p.parts or m.name.startswith(("/", "\\")):
            raise BundleError(f"{self.archive}: member {m.name!r} points outside the bundle: archive refused")
        if not (m.isfile() or m.isdir()) or m.issparse():
            raise BundleError(f"{self.archive}: member {m.name!r} is a link or device: archive refused")
        name = p.as_posix()
        if name in ("", "."):
            return "."
        if name in self.names:
            raise BundleError(f"{self.archive}: member {name} appears twice: archive refused")
        self.names.add(name)
        if m.isfile():
            self.total += max(0, m.size)
            if self.total > self.limits.max_unpacked_bytes:
                raise BundleError(f"{self.archive}: members add up to more than {self.limits.max_unpacked_bytes} "
                                  "bytes unpacked: archive refused")
        return name


def _open_stream(archive: Path, limits: ArchiveLimits):
    raw = gzip.open(archive, "rb")
    reader = _CappedReader(raw, limits.stream_cap(), archive)
    return raw, reader, tarfile.open(fileobj=reader, mode="r|")


def _drain(reader: _CappedReader) -> None:
    """Read the stream to its end: gzip checks its CRC-32 and length there (a flipped byte in tar padding)."""
    while reader.read(1 << 20):
        pass


def _scan(archive: Path, limits: ArchiveLimits) -> tuple[dict[str, int], dict[str, bytes]]:
    """Pass 1, nothing written: every header checked, the regular files' names and sizes, and the bytes of
    manifest.json and manifest.sig."""
    files: dict[str, int] = {}
    meta: dict[str, bytes] = {}
    members = _Members(archive, limits)
    raw, reader, tar = _open_stream(archive, limits)
    with raw, tar:
        for m in tar:
            name = members.check(m)
            if not m.isfile():
                continue
            files[name] = m.size
            if name in (MANIFEST, SIGNATURE):
                if m.size > limits.max_meta_bytes:
                    raise BundleError(f"{archive}: {name} is {m.size} bytes (at most {limits.max_meta_bytes}): "
                                      "archive refused")
                meta[name] = tar.extractfile(m).read()
        _drain(reader)
    return files, meta


def safe_extract(archive: str | Path, dest: str | Path, *, public_key: PublicKeyLike | None = None,
                 limits: ArchiveLimits | None = None, fsync: bool = False) -> Path:
    """Extract a bundle ``.tar.gz`` without trusting it.

    Pass 1 reads the archive to its end writing nothing: regular files and directories only (no links, devices,
    absolute paths or ``..``), at most ``limits.max_members`` members adding up to ``limits.max_unpacked_bytes``
    (declared sizes; the decompressed stream itself is capped too, so a gzip bomb stops at the cap), no name
    twice, a gzip stream that checks. With ``public_key`` the signature over manifest.json is verified next and
    every regular file must be listed in the signed manifest: an unsigned, tampered or padded archive is refused
    before a single byte is written. Pass 2 writes the files (``fsync``: each file and directory synced).
    The caller still runs :func:`verify_bundle` on the result (every checksum)."""
    archive, dest = Path(archive), Path(dest)
    limits = limits or ArchiveLimits()
    from edge_runtime.crashpoints import crashpoint

    try:
        files, meta = _scan(archive, limits)
        if public_key is not None:
            key = load_public_key(public_key)
            if MANIFEST not in meta:
                raise BundleError(f"{archive} has no {MANIFEST}: not a defectkit bundle")
            if SIGNATURE not in meta:
                raise BundleError(f"unsigned bundle refused: {archive} has no {SIGNATURE}; build and sign it with "
                                  "'defectkit bundle build --key ...'")
            _check_signature(meta[SIGNATURE], meta[MANIFEST], key, archive)
            try:
                listed = Manifest.from_dict(json.loads(meta[MANIFEST].decode("utf-8")),
                                            source=f"{MANIFEST} in {archive}").files()
            except (ValueError, UnicodeDecodeError) as exc:
                raise BundleError(f"{MANIFEST} in {archive} is signed but not valid JSON ({exc})") from None
            for name in sorted(set(files) - set(listed) - {MANIFEST, SIGNATURE}):
                raise BundleError(f"bundle {archive}: file {name} is not listed in {MANIFEST}: bundle refused")
        dest.mkdir(parents=True, exist_ok=True)
        members = _Members(archive, limits)
        raw, reader, tar = _open_stream(archive, limits)
        with raw, tar:
            for m in tar:
                name = members.check(m)
                if name not in files and not m.isdir():
                    raise BundleError(f"{archive}: member {name} was not there when the archive was checked: the "
                                      "file changed while it was read; archive refused")
                target = dest / name
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                if m.size != files[name]:
                    raise BundleError(f"{archive}: member {name} changed size while the archive was read: refused")
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                with src, open(target, "xb") as out:
                    first = True
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        out.write(chunk)
                        if first:
                            first = False
                            crashpoint(f"extract:{name}:partial")
                    if fsync:
                        out.flush()
                        os.fsync(out.fileno())
            _drain(reader)
        if fsync:
            from edge_runtime.fileio import fsync_tree

            fsync_tree(dest)
    except FileExistsError as exc:
        raise BundleError(f"{archive}: member {exc.filename} appears twice: archive refused") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise BundleError(f"{archive}: not a readable bundle archive ({exc}): the file is damaged; refused") from None
    except BundleError:
        raise
    except OSError as exc:
        raise BundleError(f"{archive}: not a readable bundle archive or cannot extract into {dest}: {exc}; "
                          "refused") from None
    return dest


def verify_bundle(path: str | Path, public_key: PublicKeyLike, extract_to: str | Path | None = None, *,
                  limits: ArchiveLimits | None = None, fsync: bool = False) -> Manifest:
    """Verify a bundle directory or ``.tar.gz`` and return its manifest (``root`` set to the directory).

    Order: signature over manifest.json (refused when missing), then the manifest schema, then every listed
    file's sha256, then that no unlisted file or link is present. A ``.tar.gz`` is first extracted safely
    into ``extract_to`` (default: a new temporary directory) by :func:`safe_extract` with the key: its signature
    and file list are checked before anything is written, with ``limits`` on members and unpacked size.
    """
    path = Path(path)
    key = load_public_key(public_key)
    if path.is_file():
        root = Path(extract_to) if extract_to else Path(tempfile.mkdtemp(prefix="defectkit-bundle-"))
        try:
            safe_extract(path, root, public_key=key, limits=limits, fsync=fsync)
        except BundleError:
            if extract_to is None:
                shutil.rmtree(root, ignore_errors=True)
            raise
    elif path.is_dir():
        root = path
    else:
        raise BundleError(f"bundle {path} does not exist (expected a bundle directory or its .tar.gz)")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path} has no {MANIFEST}: not a defectkit bundle")
    manifest_bytes = manifest_path.read_bytes()
    _verify_signature(root, manifest_bytes, key)
    try:
        data = json.loads(manifest_bytes.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # signed but unreadable: a builder bug, not tampering
        raise BundleError(f"{MANIFEST} in {path} is signed but not valid JSON ({exc})") from None
    manifest = Manifest.from_dict(data, source=f"{MANIFEST} in {path}")
    listed = manifest.files()
    for rel, digest in sorted(listed.items()):
        f = root / rel
        if f.is_symlink() or not f.is_file():
            raise BundleError(f"bundle {path}: file {rel} listed in {MANIFEST} is missing: bundle refused")
        if sha256_file(f) != digest:
            raise BundleError(f"bundle {path}: file {rel} does not match its sha256 in {MANIFEST} (tampered or damaged): bundle refused")
    allowed = set(listed) | {MANIFEST, SIGNATURE}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if full.is_symlink():
                raise BundleError(f"bundle {path}: {rel} is a symbolic link: bundle refused")
            if full.is_file() and rel not in allowed:
                raise BundleError(f"bundle {path}: file {rel} is not listed in {MANIFEST}: bundle refused")
    return replace(manifest, root=root)
