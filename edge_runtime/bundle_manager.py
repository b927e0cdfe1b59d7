"""Model updates on the box: verify, load beside the running model, self-test, swap; revert a crash loop.

State lives in ``state_dir`` (survives restarts)::

    state.json            current / previous version, probation, crash count, last events
    bundles/<version>/    the installed, verified copies (only current and previous are kept)
    inbox/                drop a bundle (.tar.gz or directory) here, or let BundlePuller fetch one
    inbox/rejected/       bundles that failed, each with <name>.reason.txt

A new bundle is extracted into a staging folder, verified (signature, every checksum, no unlisted file),
loaded with the chosen backend *beside* the running model and passed through the golden self-test; only
then does the loop swap models between two frames. Any failure keeps the old model and is recorded as an
event that goes into the next report. After a swap the new bundle is on probation: if the process dies
``max_crashes`` times before the probation ends (systemd restarts it each time), the next start reverts to
the previous bundle and marks the new one bad.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence
from urllib.parse import urlsplit

from edge_runtime.bundle import MANIFEST, Manifest, load_public_key, verify_bundle
from edge_runtime.drift import DriftReference
from edge_runtime.errors import BundleError, ConfigError, DefectkitError, UserInputError
from edge_runtime.fileio import atomic_write_bytes, atomic_write_json
from edge_runtime.predict import Detector
from edge_runtime.settings import EffectiveSettings, SettingsLayer
from edge_runtime.selftest import SelfTestReport, Tolerance, bundle_detector, choose_model, self_test
from edge_runtime.sources import is_temp_name

log = logging.getLogger("defectkit.bundle_manager")

STATE_FILE = "state.json"


@dataclass
class UpdateState:
    """What survives a restart. ``last_exit`` is "running" while a process runs, "clean" after a clean stop."""

    current: Optional[str] = None
    previous: Optional[str] = None
    probation: bool = False
    crashes: int = 0
    last_exit: str = "clean"
    seed: Optional[str] = None  # fingerprint of the --bundle last installed from the command line
    preparing: Optional[str] = None  # inbox item being loaded: if the process dies meanwhile, it is rejected
    bad: list = field(default_factory=list)  # versions reverted after a crash loop: never installed again
    events: list = field(default_factory=list)  # the last 20: {"time", "kind", "version", "detail"}

    @classmethod
    def load(cls, path: Path) -> "UpdateState":
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return cls(**{k: raw[k] for k in asdict(cls()) if k in raw})
        except (OSError, ValueError, TypeError) as exc:
            raise UserInputError(f"update state {path} is damaged ({exc}); move it aside to start from --bundle") from None

    def save(self, path: Path) -> None:
        atomic_write_json(path, asdict(self))


@dataclass
class LoadedModel:
    """A verified bundle with its detector loaded and its golden self-test passed: ready to inspect."""

    manifest: Manifest
    detector: Detector
    backend: str
    reference: DriftReference
    selftest: SelfTestReport
    settings: EffectiveSettings  # the bundle's line settings with the box's override layers on top

    @property
    def version(self) -> str:
        return self.manifest.version


def fingerprint(path: Path) -> str:
    """sha256 of a bundle's manifest.json (directory) or of the archive bytes (.tar.gz)."""
    target = path / MANIFEST if path.is_dir() else path
    try:
        return hashlib.sha256(target.read_bytes()).hexdigest()
    except OSError as exc:
        raise BundleError(f"bundle {path} cannot be read ({exc.strerror}): pass a bundle directory or .tar.gz") from None


def check_archive(path: Path) -> None:
    """Read a .tar.gz to its end so gzip checks its CRC-32 and length: a flipped byte anywhere in the
    compressed stream is refused, even in tar padding that extraction never reads (the signature and the
    checksums already cover every byte of content)."""
    import gzip
    import zlib

    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 20):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        raise BundleError(f"{path}: not a readable bundle archive ({exc}): the file is damaged; bundle refused") from None


class BundleManager:
    """Installs, loads, self-tests and swaps bundles for one box (see the module docstring)."""

    def __init__(self, state_dir: str | Path, public_key: Any, *, backend: Optional[str] = None, threads: int = 2,
                 tolerance: Optional[Tolerance] = None, max_crashes: int = 3, selftest_all: bool = True,
                 settings_layers: Sequence[SettingsLayer] = ()) -> None:
        self.dir = Path(state_dir)
        self.bundles, self.inbox = self.dir / "bundles", self.dir / "inbox"
        for d in (self.bundles, self.inbox, self.inbox / "rejected"):
            d.mkdir(parents=True, exist_ok=True)
        self.key = load_public_key(public_key)
        self.backend, self.threads, self.tolerance = backend, threads, tolerance or Tolerance()
        self.max_crashes, self.selftest_all = max_crashes, selftest_all
        self.settings_layers = tuple(settings_layers)  # go on top of every bundle's settings, this one and the next
        self.state_path = self.dir / STATE_FILE
        self.state = UpdateState.load(self.state_path)
        self._lock = threading.Lock()
        self._worker: Optional[threading.Thread] = None
        self._ready: Optional[tuple[Path, LoadedModel]] = None

    # ------------------------------------------------------------------------------------------ events
    def event(self, kind: str, version: Optional[str], detail: str) -> dict:
        ev = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "kind": kind, "version": version,
              "detail": detail[:500]}
        with self._lock:
            self.state.events = (self.state.events + [ev])[-20:]
            self.state.save(self.state_path)
        (log.info if kind in ("installed", "swapped", "confirmed") else log.error)("update %s %s: %s", kind, version, detail)
        return ev

    def last_event(self) -> Optional[dict]:
        return self.state.events[-1] if self.state.events else None

    # ------------------------------------------------------------------------------------------ install + load
    def install(self, source: Path) -> Manifest:
        """Copy or extract ``source`` into bundles/<version> through a verified staging folder."""
        source = Path(source)
        stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.bundles))
        try:
            if source.is_dir():
                shutil.copytree(source, stage / "b", symlinks=True)
                manifest = verify_bundle(stage / "b", self.key)
            else:
                check_archive(source)
                manifest = verify_bundle(source, self.key, extract_to=stage / "b")
            if manifest.version in self.state.bad:
                raise BundleError(f"bundle {manifest.version} was reverted after a crash loop on this box: refused "
                                  "(build a new version)")
            final = self.bundles / manifest.version
            if final.exists():
                if (final / MANIFEST).read_bytes() != (stage / "b" / MANIFEST).read_bytes():
                    raise BundleError(f"version {manifest.version} is already installed with other content: bundles "
                                      "are immutable, build a new version")
                return verify_bundle(final, self.key)
            os.rename(stage / "b", final)
            return verify_bundle(final, self.key)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def load(self, version: str) -> LoadedModel:
        """Verify an installed bundle again, load its model beside whatever runs, run the golden self-test."""
        root = self.bundles / version
        if not root.is_dir():
            raise BundleError(f"bundle {version} is not installed in {self.bundles}")
        manifest = verify_bundle(root, self.key)  # a missing or malformed settings section is refused here, named
        settings = self.effective_settings(manifest)
        backend, model = choose_model(manifest, self.backend)
        detector = bundle_detector(manifest, model, backend, self.threads)
        reference = DriftReference.load(manifest.path(manifest.drift_reference.file))
        if len(reference.class_names) not in (0, len(manifest.classes)):
            raise BundleError(f"bundle {version}: drift_reference.json has {len(reference.class_names)} classes, the "
                              f"model {len(manifest.classes)}; rebuild the reference with this model")
        report = self_test(manifest, [detector], threads=1, tolerance=self.tolerance,
                           backends=None if self.selftest_all else [backend])
        if not report.ok:
            raise BundleError(report.line())
        return LoadedModel(manifest, detector, backend, reference, report, settings)

    def effective_settings(self, manifest: Manifest) -> EffectiveSettings:
        """The bundle's settings < the override file < the flags; refused (ConfigError: the overrides need a person)
        when the result does not fit this bundle (an override breaking a relation, class_thresholds naming classes
        it lacks). During an update that refuses the candidate and the running bundle stays."""
        base_where = f"bundle {manifest.line} {manifest.version}"
        try:
            eff = EffectiveSettings.resolve(manifest.settings, base_where, self.settings_layers)
        except ConfigError as exc:
            raise ConfigError(f"bundle {manifest.version}: the box's settings overrides do not fit it: {exc}") from None
        try:
            eff.settings.runtime.thresholds_for(manifest.classes)
        except ConfigError as exc:
            source = eff.sources["runtime.class_thresholds"]
            error = BundleError if source == base_where else ConfigError  # the bundle's own fault, or the box's
            raise error(f"bundle {manifest.version}: runtime.class_thresholds from {source}: {exc}") from None
        return eff

    def prepare(self, source: Path) -> LoadedModel:
        """install + load; on failure the installed copy is removed (unless it is current or previous)."""
        return self._load_new(self.install(source))

    def _load_new(self, manifest: Manifest) -> LoadedModel:
        try:
            return self.load(manifest.version)
        except BaseException:
            if manifest.version not in (self.state.current, self.state.previous):
                shutil.rmtree(self.bundles / manifest.version, ignore_errors=True)
            raise

    # ------------------------------------------------------------------------------------------ start
    def start(self, cli_bundle: Optional[Path]) -> LoadedModel:
        """The model to inspect with at process start (crash-loop revert, new --bundle, fallbacks)."""
        st = self.state
        if st.last_exit == "running" and st.probation:
            st.crashes += 1
            log.error("the previous run of bundle %s ended without a clean stop (%d/%d during probation)",
                      st.current, st.crashes, self.max_crashes)
            if st.crashes >= self.max_crashes and st.previous:
                bad = st.current
                st.bad = (st.bad + [bad])[-20:]
                st.current, st.previous, st.probation, st.crashes = st.previous, None, False, 0
                self.event("reverted", bad, f"crashed {self.max_crashes} times after the swap: back to {st.current}")
        if st.last_exit == "running" and st.preparing:
            culprit = self.inbox / st.preparing
            st.preparing = None
            if culprit.exists():
                self.reject(culprit, "the runtime died while loading this bundle beside the running one")
        st.last_exit = "running"
        st.save(self.state_path)
        loaded = None
        if cli_bundle is not None:
            loaded = self._start_from_cli(Path(cli_bundle))
        if loaded is None:
            loaded = self._load_current()
        self._prune()
        return loaded

    def _start_from_cli(self, path: Path) -> Optional[LoadedModel]:
        seed = fingerprint(path)
        if seed == self.state.seed and self.state.current:
            return None  # the same --bundle as before: the installed current one (maybe an update) runs
        try:
            loaded = self.prepare(path)
        except DefectkitError as exc:
            self.event("refused", None, f"--bundle {path}: {exc}")
            if not self.state.current:
                raise
            return None
        with self._lock:
            self.state.seed = seed
        self.commit(loaded, probation=self.state.current is not None and self.state.current != loaded.version)
        return loaded

    def _load_current(self) -> LoadedModel:
        st = self.state
        if not st.current:
            raise UserInputError(f"no bundle installed in {self.dir} and no --bundle given: pass --bundle PATH")
        try:
            return self.load(st.current)
        except ConfigError:
            raise  # the box's own options (overrides, backend) do not fit: not the bundle's fault, no revert
        except DefectkitError as exc:
            failed = st.current
            self.event("failed", failed, f"installed bundle does not load or pass its self-test: {exc}")
            if not st.previous:
                raise
            st.bad = (st.bad + [failed])[-20:]
            st.current, st.previous, st.probation, st.crashes = st.previous, None, False, 0
            st.save(self.state_path)
            loaded = self.load(st.current)
            self.event("reverted", failed, f"back to {st.current}")
            return loaded

    def commit(self, loaded: LoadedModel, probation: bool = True) -> None:
        """Record a swap: the new version is current, the old one previous, probation starts."""
        with self._lock:
            st = self.state
            if st.current != loaded.version:
                st.previous, st.current = st.current, loaded.version
            st.probation, st.crashes = probation and st.previous is not None, 0
            st.save(self.state_path)
        self.event("installed" if not probation else "swapped", loaded.version,
                   f"{loaded.backend}; {loaded.selftest.line()}")

    def confirm(self) -> None:
        """The new bundle ran long enough: end its probation (a later crash no longer reverts it)."""
        if self.state.probation:
            with self._lock:
                self.state.probation, self.state.crashes = False, 0
                self.state.save(self.state_path)
            self.event("confirmed", self.state.current, "probation passed")

    def clean_exit(self) -> None:
        with self._lock:
            self.state.last_exit = "clean"
            self.state.save(self.state_path)

    def _prune(self) -> None:
        keep = {self.state.current, self.state.previous}
        for d in self.bundles.iterdir():
            if d.is_dir() and not d.name.startswith(".") and d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ inbox
    def inbox_items(self, settle_s: float = 1.0) -> list[Path]:
        """Complete bundles waiting in the inbox (no temporary names, unchanged for settle_s), oldest first."""
        now, out = time.time(), []
        for p in self.inbox.iterdir():
            if is_temp_name(p.name) or p.name == "rejected":
                continue
            if p.is_dir() and not (p / MANIFEST).is_file():
                continue
            if p.is_file() and not p.name.endswith((".tar.gz", ".tgz")):
                continue
            try:
                if now - p.stat().st_mtime >= settle_s:
                    out.append((p.stat().st_mtime, p))
            except OSError:
                continue
        return [p for _, p in sorted(out)]

    def poll(self) -> None:
        """Start preparing the next inbox bundle in a background thread (inspection goes on meanwhile)."""
        if (self._worker is not None and self._worker.is_alive()) or self._ready is not None:
            return
        items = self.inbox_items()
        if items:
            self._worker = threading.Thread(target=self._prepare_inbox, args=(items[0],), name="defectkit-update",
                                            daemon=True)
            self._worker.start()

    def _prepare_inbox(self, path: Path) -> None:
        with self._lock:
            self.state.preparing = path.name
            self.state.save(self.state_path)
        try:
            manifest = self.install(path)
            if manifest.version == self.state.current:
                log.info("inbox bundle %s is version %s, which already runs: removed", path.name, manifest.version)
                _remove(path)
                return
            loaded = self._load_new(manifest)
        except Exception as exc:  # anything that goes wrong with a candidate keeps the old model running
            self.reject(path, f"{type(exc).__name__}: {exc}" if not isinstance(exc, DefectkitError) else str(exc))
            return
        finally:
            with self._lock:
                self.state.preparing = None
                self.state.save(self.state_path)
        with self._lock:
            self._ready = (path, loaded)

    def take_ready(self) -> Optional[LoadedModel]:
        """The candidate that passed, if any (the loop swaps to it between two frames, then calls commit)."""
        with self._lock:
            ready, self._ready = self._ready, None
        if ready is None:
            return None
        path, loaded = ready
        _remove(path)
        return loaded

    def wait_idle(self, timeout: float = 60.0) -> None:
        if self._worker is not None:
            self._worker.join(timeout)

    def reject(self, path: Path, reason: str) -> None:
        dest = self.inbox / "rejected" / path.name
        try:
            if dest.exists():
                _remove(dest)
            os.replace(path, dest)
            atomic_write_bytes(dest.parent / f"{path.name}.reason.txt", (reason + "\n").encode("utf-8"))
        except OSError as exc:
            log.error("cannot move rejected bundle %s aside (%s); deleting it", path, exc)
            _remove(path)
        self.event("refused", None, f"{path.name}: {reason}")


def _remove(path: Path) -> None:
    try:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    except OSError as exc:
        log.warning("cannot remove %s (%s)", path, exc)


class BundlePuller:
    """Fetches a bundle archive from a URL (the collector or a registry) into the inbox when it changed.

    GET with the device's bearer token and ``If-None-Match``: 304 or 404 mean nothing new; a 200 body is
    saved under a temporary name, then renamed into the inbox, where the manager verifies it like any other.
    Never raises: a failure is logged and retried at the next poll."""

    def __init__(self, url: str, token: str, inbox: Path, timeout: float = 30.0, max_bytes: int = 1 << 30) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserInputError(f"update URL {url!r} is not usable: give http(s)://HOST[:PORT]/path/to/bundle.tar.gz")
        self.url, self.token, self.inbox, self.timeout, self.max_bytes = url, token, Path(inbox), timeout, max_bytes
        self._parts = parts
        self.etag: Optional[str] = None
        self.last_digest: Optional[str] = None
        self.last_error: Optional[str] = None

    def pull(self) -> Optional[Path]:
        p = self._parts
        cls = http.client.HTTPSConnection if p.scheme == "https" else http.client.HTTPConnection
        conn = cls(p.hostname, p.port, timeout=self.timeout)
        headers = {"Authorization": f"Bearer {self.token}"}
        if self.etag:
            headers["If-None-Match"] = self.etag
        tmp = None
        try:
            conn.request("GET", (p.path or "/") + (f"?{p.query}" if p.query else ""), headers=headers)
            resp = conn.getresponse()
            if resp.status in (304, 404):
                resp.read()
                return None
            if resp.status != 200:
                raise OSError(f"HTTP {resp.status}")
            fd, tmp = tempfile.mkstemp(prefix=".pull-", suffix=".tmp", dir=self.inbox)
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as fh:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise OSError(f"bundle larger than {self.max_bytes} bytes")
                    digest.update(chunk)
                    fh.write(chunk)
            self.etag = resp.getheader("ETag") or self.etag
            if digest.hexdigest() == self.last_digest:
                return None  # the same archive as last time (a server without ETag)
            self.last_digest = digest.hexdigest()
            dest = self.inbox / f"pulled-{digest.hexdigest()[:16]}.tar.gz"
            os.replace(tmp, dest)
            os.utime(dest, (time.time() - 5, time.time() - 5))  # complete: no need to wait for it to settle
            tmp = None
            self.last_error = None
            return dest
        except (OSError, http.client.HTTPException) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("pulling a bundle from %s failed (%s); retrying later", self.url, self.last_error)
            return None
        finally:
            conn.close()
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
