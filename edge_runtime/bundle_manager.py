"""Model updates on the box: verify, load beside the running model, self-test, swap; revert a crash loop.

State lives in ``state_dir`` (survives restarts)::

    state.json            current / previous version, probation, crash count, events not yet acknowledged
    bundles/<version>/    the installed, verified copies (only current and previous are kept)
    bundles/.staging-*    an install in progress (removed at start: a process that died mid-install left it)
    inbox/                drop a bundle (.tar.gz or directory) here by hand
    inbox/rejected/       bundles that failed, each with <name>.reason.txt
    downloads/            archives fetched by the update channel (edge_runtime.update_channel), sha256-checked

A new bundle is checked before anything of it is written (archive caps, signature, its file list: see
:func:`edge_runtime.bundle.safe_extract`), extracted into a staging folder, verified (every checksum), held to
the box's rules (its line; a version greater than the running one unless the fleet registry signed a rollback;
never a version reverted here), fsynced, renamed into ``bundles/<version>`` and the directory fsynced; it is
then loaded with the chosen backend *beside* the running model and passed through the golden self-test; only
then does the loop swap models between two frames, and only then does ``state.json`` (written atomically:
temporary file, fsync, rename, directory fsync) point at it. A power cut or ``kill -9`` at any moment leaves
the box on a complete bundle, the old or the new. Any failure keeps the old model and is recorded as an
event that goes into the next report. After a swap the new bundle is on probation: if the process dies
``max_crashes`` times before the probation ends (systemd restarts it each time), the next start reverts to
the previous bundle and marks the new one bad.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from edge_runtime.bundle import MANIFEST, ArchiveLimits, Manifest, load_public_key, verify_bundle
from edge_runtime.crashpoints import crashpoint
from edge_runtime.drift import DriftReference
from edge_runtime.errors import BundleError, ConfigError, DefectkitError, UserInputError
from edge_runtime.fileio import atomic_write_bytes, atomic_write_json, fsync_path, fsync_tree
from edge_runtime.predict import Detector
from edge_runtime.settings import EffectiveSettings, SettingsLayer
from edge_runtime.selftest import SelfTestReport, Tolerance, choose_model
from edge_runtime.variant_choice import VariantChoice, check_forced
from edge_runtime.variant_load import load_variants
from edge_runtime.sources import is_temp_name

if TYPE_CHECKING:
    from edge_runtime.targets import TargetMetadata

log = logging.getLogger("defectkit.bundle_manager")

STATE_FILE = "state.json"
EVENTS_KEPT = 100
FAILED_KINDS = ("failed", "refused", "reverted")  # what the fleet's rollout reads as a failed update (docs/fleet.md)


def version_key(version: str) -> tuple:
    """Order of versions (docs/fleet.md, the registry's): parts split on ``.``, ``-``, ``+``; numbers compared as
    numbers (``1.10.0`` > ``1.9.0``), a number before a word."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.+-]", version))


def is_newer(version: str, than: str) -> bool:
    return version_key(version) > version_key(than)


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
    events: list = field(default_factory=list)  # the last EVENTS_KEPT: {"seq", "time", "kind", "version", "detail"}
    event_seq: int = 0  # the seq of the newest event
    acked_seq: int = 0  # events up to this seq went out in a report the collector acknowledged
    refused_targets: list = field(default_factory=list)  # {"sha256", "version", "reason"}: not fetched again

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
    choice: Optional[VariantChoice] = None  # which variant runs and why (timed on this CPU: variant_choice)

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


class BundleManager:
    """Installs, loads, self-tests and swaps bundles for one box (see the module docstring)."""

    def __init__(self, state_dir: str | Path, public_key: Any, *, backend: Optional[str] = None, threads: int = 2,
                 tolerance: Optional[Tolerance] = None, max_crashes: int = 3, selftest_all: bool = True,
                 settings_layers: Sequence[SettingsLayer] = (), line: Optional[str] = None,
                 limits: Optional[ArchiveLimits] = None, variant: Optional[str] = None) -> None:
        self.dir = Path(state_dir)
        self.bundles, self.inbox = self.dir / "bundles", self.dir / "inbox"
        self.downloads = self.dir / "downloads"
        for d in (self.bundles, self.inbox, self.inbox / "rejected", self.downloads):
            d.mkdir(parents=True, exist_ok=True)
        self.line_option = line  # --line; else the line of the bundle the box runs
        self.limits = limits or ArchiveLimits()
        self._running_line: Optional[str] = None
        self.key = load_public_key(public_key)
        self.backend, self.threads = backend, threads
        self.variant = check_forced(variant)  # --variant: run this variant when it passes (else the timed choice)
        self.tolerance = tolerance  # None: the bundle's own golden_tolerance (what its gate judged with)
        self.max_crashes, self.selftest_all = max_crashes, selftest_all
        self.settings_layers = tuple(settings_layers)  # go on top of every bundle's settings, this one and the next
        self.state_path = self.dir / STATE_FILE
        self.state = UpdateState.load(self.state_path)
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()  # the main loop (inbox) and the update channel both start workers
        self._worker: Optional[threading.Thread] = None
        self._ready: Optional[tuple[Path, LoadedModel]] = None
        self._swapping = False  # between take_ready() and commit()

    @property
    def line(self) -> Optional[str]:
        """The box's line: ``--line``, else the line of the bundle it runs (None before the first one is loaded)."""
        return self.line_option or self._running_line

    # ------------------------------------------------------------------------------------------ events
    def event(self, kind: str, version: Optional[str], detail: str) -> dict:
        ev = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "kind": kind, "version": version,
              "detail": detail[:500]}
        with self._lock:
            self.state.event_seq += 1
            ev["seq"] = self.state.event_seq
            self.state.events = (self.state.events + [ev])[-EVENTS_KEPT:]
            self.state.save(self.state_path)
        (log.info if kind in ("installed", "swapped", "confirmed") else log.error)("update %s %s: %s", kind, version, detail)
        return ev

    def last_event(self) -> Optional[dict]:
        return self.state.events[-1] if self.state.events else None

    def pending_events(self) -> list:
        """Events not yet in a report the collector acknowledged, oldest first (they go into every report until
        one carrying them is acknowledged: a later event never hides an earlier failure)."""
        with self._lock:
            return [e for e in self.state.events if e.get("seq", 0) > self.state.acked_seq]

    def ack_events(self, upto_seq: int) -> None:
        """A report holding the events up to ``upto_seq`` was acknowledged by the collector."""
        with self._lock:
            if upto_seq > self.state.acked_seq:
                self.state.acked_seq = upto_seq
                self.state.save(self.state_path)

    # ------------------------------------------------------------------------------------------ install + load
    def install(self, source: Path, target: "Optional[TargetMetadata]" = None, *, operator: bool = False) -> Manifest:
        """Check, extract or copy ``source`` into bundles/<version> through a staging folder; durable on return.

        ``target``: the signed target metadata the archive was downloaded for (its sha256 already checked).
        ``operator``: the --bundle of the command line (the box's owner chose it: no version rule)."""
        source = Path(source)
        stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.bundles))
        crashpoint("install:staging")
        try:
            if source.is_dir():
                self._check_tree(source)
                verify_bundle(source, self.key)  # signature and checksums where it lies: nothing copied before
                shutil.copytree(source, stage / "b", symlinks=True)
                fsync_tree(stage / "b")
                manifest = verify_bundle(stage / "b", self.key)
            else:
                size = target.length if target is not None else source.stat().st_size
                manifest = verify_bundle(source, self.key, extract_to=stage / "b", limits=self._limits_for(size),
                                         fsync=True)
            crashpoint("install:verified")
            self.check_candidate(manifest, target, operator=operator)
            final = self.bundles / manifest.version
            if manifest.version in (self.state.current, self.state.previous) and final.is_dir():
                if (final / MANIFEST).read_bytes() != (stage / "b" / MANIFEST).read_bytes():
                    raise BundleError(f"version {manifest.version} is already installed with other content: bundles "
                                      "are immutable, build a new version")
                return verify_bundle(final, self.key)
            if final.exists():  # left by an install or a removal that did not finish: never current, replace it
                self._discard(final)
            os.rename(stage / "b", final)
            crashpoint("install:renamed")
            fsync_path(self.bundles)
            crashpoint("install:synced")
            return verify_bundle(final, self.key)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def _limits_for(self, archive_bytes: int) -> ArchiveLimits:
        """An archive may unpack to at most 16 times its size (the signed length of a download), at least 64 MiB,
        at most the box's cap: a 0.5 MB gzip bomb is refused on its first header, before anything is written."""
        cap = min(self.limits.max_unpacked_bytes, max(64 << 20, 16 * archive_bytes))
        return ArchiveLimits(self.limits.max_members, cap, self.limits.max_meta_bytes)

    def _check_tree(self, source: Path) -> None:
        """A bundle directory dropped into the inbox: the same caps as an archive, regular files only."""
        count = total = 0
        for dirpath, dirnames, filenames in os.walk(source):
            for name in dirnames + filenames:
                full = Path(dirpath) / name
                st = full.lstat()
                count += 1
                if count > self.limits.max_members:
                    raise BundleError(f"bundle {source}: more than {self.limits.max_members} entries: refused")
                import stat as _stat

                if not (_stat.S_ISREG(st.st_mode) or _stat.S_ISDIR(st.st_mode)):
                    raise BundleError(f"bundle {source}: {full.relative_to(source)} is a link or device: refused")
                total += st.st_size if _stat.S_ISREG(st.st_mode) else 0
                if total > self.limits.max_unpacked_bytes:
                    raise BundleError(f"bundle {source}: more than {self.limits.max_unpacked_bytes} bytes: refused")

    def check_candidate(self, manifest: Manifest, target: "Optional[TargetMetadata]" = None, *,
                        operator: bool = False) -> None:
        """The box's rules for a verified bundle: never a version reverted here, the box's line, the signed
        target's version and line, and a version greater than the running one unless the registry signed a
        rollback (or the operator gave it on the command line). The running version itself passes (no-op)."""
        st = self.state
        if manifest.version in st.bad:
            raise BundleError(f"bundle {manifest.version} was reverted after a crash loop on this box: refused "
                              "(build a new version)")
        line = self.line
        if line and manifest.line != line:
            raise BundleError(f"bundle {manifest.line} {manifest.version} is for line {manifest.line!r}, this box "
                              f"runs line {line!r}: refused")
        if target is not None and (manifest.line, manifest.version) != (target.line, target.version):
            raise BundleError(f"the archive holds {manifest.line} {manifest.version}, the signed target metadata "
                              f"names {target.line} {target.version}: refused")
        if operator or st.current is None or manifest.version == st.current:
            return
        if not is_newer(manifest.version, st.current) and not (target is not None and target.rollback):
            raise BundleError(f"bundle {manifest.version} is not newer than the running {st.current}: refused (a "
                              "downgrade or a replayed old bundle; only a rollback signed by the fleet registry may "
                              "go back)")

    def load(self, version: str) -> LoadedModel:
        """Verify an installed bundle again, load its model beside whatever runs, run the golden self-test."""
        root = self.bundles / version
        if not root.is_dir():
            raise BundleError(f"bundle {version} is not installed in {self.bundles}")
        manifest = verify_bundle(root, self.key)  # a missing or malformed settings section is refused here, named
        settings = self.effective_settings(manifest)
        backend, _ = choose_model(manifest, self.backend)
        reference = DriftReference.load(manifest.path(manifest.drift_reference.file))
        if len(reference.class_names) not in (0, len(manifest.classes)):
            raise BundleError(f"bundle {version}: drift_reference.json has {len(reference.class_names)} classes, the "
                              f"model {len(manifest.classes)}; rebuild the reference with this model")
        # every variant of the backend loaded with the box's threads, self-tested, timed; the fastest passing runs
        detector, report, choice = load_variants(
            manifest, backend, self.threads, state_dir=self.dir, tolerance=self.tolerance,
            selftest_backends=None if self.selftest_all else [backend], forced=self.variant,
            keep_versions=(self.state.current, self.state.previous))
        if not report.ok:
            raise BundleError(report.line())
        return LoadedModel(manifest, detector, backend, reference, report, settings, choice)

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

    def prepare(self, source: Path, *, operator: bool = False) -> LoadedModel:
        """install + load; on failure the installed copy is removed (unless it is current or previous)."""
        return self._load_new(self.install(source, operator=operator))

    def _load_new(self, manifest: Manifest) -> LoadedModel:
        try:
            loaded = self.load(manifest.version)
        except BaseException:
            if manifest.version not in (self.state.current, self.state.previous):
                self._discard(self.bundles / manifest.version)
            raise
        crashpoint("candidate:loaded")
        return loaded

    def _discard(self, path: Path) -> None:
        """Remove an installed folder: renamed aside first (atomic), so no torn copy stays under a version's name."""
        if not path.exists():
            return
        trash = path.parent / f".trash-{path.name}-{os.urandom(4).hex()}"
        try:
            os.rename(path, trash)
        except OSError as exc:
            log.warning("cannot move %s aside (%s)", path, exc)
            trash = path
        shutil.rmtree(trash, ignore_errors=True)

    def clean_stale(self) -> list[str]:
        """At start: staging and trash folders and downloads left by a process that died (never current)."""
        removed = []
        for d in list(self.bundles.iterdir()):
            if d.name.startswith((".staging-", ".trash-")):
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink()
                removed.append(d.name)
        for f in list(self.downloads.iterdir()):
            _remove(f)
            removed.append(f"downloads/{f.name}")
        if removed:
            log.warning("removed what an interrupted install left: %s", ", ".join(sorted(removed)))
            fsync_path(self.bundles)
        return removed

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
        self.clean_stale()
        if st.last_exit == "running" and st.preparing:
            label, st.preparing = st.preparing, None
            why = "the runtime died while loading this bundle beside the running one"
            if label.startswith("channel:"):
                _, version, sha = (label.split(":", 2) + ["", ""])[:3]
                self._remember_refused(sha, version, why)
                self.event("refused", version or None, f"target {version} ({sha[:12]}): {why}")
            elif (self.inbox / label).exists():
                self.reject(self.inbox / label, why)
        st.last_exit = "running"
        st.save(self.state_path)
        loaded = None
        if cli_bundle is not None:
            loaded = self._start_from_cli(Path(cli_bundle))
        if loaded is None:
            loaded = self._load_current()
        if self.line_option and loaded.manifest.line != self.line_option:
            raise ConfigError(f"this box runs line {self.line_option!r} (--line), but its bundle {loaded.version} is "
                              f"for line {loaded.manifest.line!r}: give the line's bundle with --bundle, or fix --line")
        self._running_line = loaded.manifest.line
        self._prune()
        return loaded

    def _start_from_cli(self, path: Path) -> Optional[LoadedModel]:
        seed = fingerprint(path)
        if seed == self.state.seed and self.state.current:
            return None  # the same --bundle as before: the installed current one (maybe an update) runs
        try:
            loaded = self.prepare(path, operator=True)
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
            self._running_line = loaded.manifest.line
            self.event("reverted", failed, f"back to {st.current}")
            return loaded

    def commit(self, loaded: LoadedModel, probation: bool = True) -> None:
        """Record a swap: the new version is current, the old one previous, probation starts. The bundle's files
        and its directory were fsynced when it was installed; the state file is replaced atomically."""
        crashpoint("commit:before-state")
        with self._lock:
            st = self.state
            if st.current != loaded.version:
                st.previous, st.current = st.current, loaded.version
            st.probation, st.crashes = probation and st.previous is not None, 0
            st.save(self.state_path)
            self._swapping = False
        self._running_line = loaded.manifest.line
        crashpoint("commit:after-state")
        self.event("installed" if not probation else "swapped", loaded.version,
                   f"{loaded.backend}; {loaded.choice.line() + '; ' if loaded.choice else ''}{loaded.selftest.line()}")

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
        for d in list(self.bundles.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and d.name not in keep:
                self._discard(d)

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

    def busy(self) -> bool:
        """A candidate is being prepared, is ready, or was taken by the loop and not committed yet: no other
        install may start (it could replace the folder of the version being swapped in)."""
        return (self._worker is not None and self._worker.is_alive()) or self._ready is not None or self._swapping

    def poll(self) -> None:
        """Start preparing the next inbox bundle in a background thread (inspection goes on meanwhile)."""
        with self._start_lock:
            if self.busy():
                return
            items = self.inbox_items()
            if items:
                self._start_worker(items[0], None)

    def submit(self, path: Path, target: "TargetMetadata") -> bool:
        """The update channel hands over a downloaded archive whose sha256 matched ``target``: prepare it in the
        background like an inbox bundle (False: busy with another candidate, try again later)."""
        with self._start_lock:
            if self.busy():
                return False
            self._start_worker(Path(path), target)
            return True

    def _start_worker(self, path: Path, target: "Optional[TargetMetadata]") -> None:
        self._worker = threading.Thread(target=self._prepare_item, args=(path, target), name="defectkit-update",
                                        daemon=True)
        self._worker.start()

    def is_refused_target(self, sha256: str) -> bool:
        return any(r.get("sha256") == sha256 for r in self.state.refused_targets)

    def _remember_refused(self, sha256: str, version: str, reason: str) -> None:
        with self._lock:
            self.state.refused_targets = (self.state.refused_targets +
                                          [{"sha256": sha256, "version": version, "reason": reason[:300]}])[-20:]
            self.state.save(self.state_path)

    def refuse_target(self, target: "TargetMetadata", reason: str, *, remember: bool = True) -> None:
        """A target the box will not run: an event for the next report; ``remember``: not fetched again."""
        if remember:
            self._remember_refused(target.sha256, target.version, reason)
        self.event("refused", target.version, f"target {target.line} {target.version} ({target.sha256[:12]}): {reason}")

    def _prepare_item(self, path: Path, target: "Optional[TargetMetadata]") -> None:
        label = path.name if target is None else f"channel:{target.version}:{target.sha256}"
        with self._lock:
            self.state.preparing = label
            self.state.save(self.state_path)
        try:
            manifest = self.install(path, target)
            if manifest.version == self.state.current:
                log.info("bundle %s is version %s, which already runs: removed", path.name, manifest.version)
                _remove(path)
                return
            loaded = self._load_new(manifest)
        except Exception as exc:  # anything that goes wrong with a candidate keeps the old model running
            reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, DefectkitError) else str(exc)
            if target is None:
                self.reject(path, reason)
            else:
                _remove(path)
                self.refuse_target(target, reason)
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
            self._swapping = ready is not None
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
