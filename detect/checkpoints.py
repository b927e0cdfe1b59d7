"""Resumable checkpoints as directories that are either complete or absent.

One checkpoint = ``checkpoints/<line>-<run>-e<epoch>/`` holding tensor files (``paddle.save``), a
``state.json`` (epoch, iteration, best metric, early-stopping counters, RNG states, data-order seed...)
and a ``manifest.json`` with the sha256 of every file. It is written into a hidden temporary directory,
every file fsynced, then renamed into place (a crash leaves a ``.tmp-*`` directory, never a half
checkpoint). ``latest.json`` and ``best.json`` point at checkpoints and are written atomically.
A checkpoint whose files do not match its manifest (truncated, bit rot) is skipped with a warning and
the previous one is used. Retention keeps the last N, the best and the newest of each ISO week, and never
deletes the only checkpoint that verifies.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_runtime.errors import ConfigError
from edge_runtime.fileio import atomic_write_json

if TYPE_CHECKING:
    from detect.settings import TrainSettings

FORMAT = "defectkit.checkpoint/1"
MANIFEST = "manifest.json"
STATE = "state.json"
POINTERS = ("latest", "best")
_NAME = re.compile(r"^(?P<prefix>.+)-e(?P<epoch>\d{4,})$")


class CheckpointWarning(UserWarning):
    """A checkpoint that does not verify was skipped."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory on disk (not yet verified)."""

    path: Path
    epoch: int

    @property
    def name(self) -> str:
        return self.path.name

    def state(self) -> dict[str, Any]:
        return json.loads((self.path / STATE).read_text())

    def tensors(self, filename: str) -> Any:
        """Load one tensor file (``model.pdparams``, ``ema.pdparams``, ``optimizer.pdopt``) with ``paddle.load``."""
        from detect.heavy import paddle_stack

        return paddle_stack().paddle.load(str(self.path / filename))


@dataclass(frozen=True)
class Retention:
    """Which checkpoints survive: the last ``keep_last``, the best, the newest of each ISO week."""

    keep_last: int  # no defaults here: they live in the train section of detect/defaults.yaml
    keep_best: bool
    keep_weekly: bool

    @classmethod
    def from_settings(cls, train: "TrainSettings") -> "Retention":
        """The ``keep_*`` keys of the train section."""
        if train.keep_last < 1:
            raise ConfigError(f"train.keep_last must be at least 1 (resume needs a checkpoint), got {train.keep_last}.")
        return cls(train.keep_last, train.keep_best, train.keep_weekly)


def checkpoint_name(line: str, run: str, epoch: int) -> str:
    return f"{line}-{run}-e{epoch:04d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checkpoint(root: Path, name: str, tensors: dict[str, Any], state: dict[str, Any]) -> Checkpoint:
    """Write ``tensors`` (file name -> state dict for ``paddle.save``) and ``state`` as checkpoint ``name``."""
    from detect.heavy import paddle_stack

    paddle = paddle_stack().paddle
    match = _NAME.match(name)
    if not match:
        raise ValueError(f"checkpoint name '{name}' must end in -e<epoch>")
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files: dict[str, str] = {}
    for filename, value in tensors.items():
        path = tmp / filename
        paddle.save(value, str(path))
        _fsync_file(path)
        files[path.name] = file_sha256(path)
    state_path = tmp / STATE
    state_path.write_text(json.dumps({"format": FORMAT, **state}))
    _fsync_file(state_path)
    files[STATE] = file_sha256(state_path)
    manifest = tmp / MANIFEST
    manifest.write_text(json.dumps({"format": FORMAT, "epoch": int(match["epoch"]), "files": files,
                                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
                                   indent=1))
    _fsync_file(manifest)
    _fsync_dir(tmp)
    if final.exists():  # the same epoch written again (a resumed run redoing it): replace
        old = root / f".old-{name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    return Checkpoint(final, int(match["epoch"]))


def verify(ckpt: Checkpoint) -> list[str]:
    """Problems of ``ckpt`` (missing or unreadable manifest, missing file, checksum mismatch); [] if sound."""
    manifest_path = ckpt.path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{manifest_path}: unreadable manifest ({type(exc).__name__}: {exc})"]
    if manifest.get("format") != FORMAT:
        return [f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}"]
    problems = []
    for fname, digest in files.items():
        path = ckpt.path / fname
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif file_sha256(path) != digest:
            problems.append(f"{path}: sha256 does not match the manifest (truncated or corrupt)")
    return problems


def list_checkpoints(root: Path) -> list[Checkpoint]:
    """Checkpoint directories under ``root``, oldest epoch first (temporary directories excluded)."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if path.is_dir() and match and not path.name.startswith("."):
            found.append(Checkpoint(path, int(match["epoch"])))
    return sorted(found, key=lambda c: c.epoch)


def clean_temporary(root: Path) -> list[Path]:
    """Remove ``.tmp-*``/``.old-*`` directories a killed writer left behind."""
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and path.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def write_pointer(root: Path, which: str, ckpt: Checkpoint, **extra: Any) -> Path:
    if which not in POINTERS:
        raise ValueError(which)
    return atomic_write_json(root / f"{which}.json", {"checkpoint": ckpt.name, "epoch": ckpt.epoch, **extra})


def read_pointer(root: Path, which: str) -> Checkpoint | None:
    """The checkpoint a pointer names, or None if the pointer or its target is missing/unreadable."""
    try:
        data = json.loads((root / f"{which}.json").read_text())
        path = root / str(data["checkpoint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    match = _NAME.match(path.name)
    return Checkpoint(path, int(match["epoch"])) if match and path.is_dir() else None


def find_resumable(root: Path) -> Checkpoint:
    """The newest checkpoint that verifies; a corrupt newer one is skipped with a :class:`CheckpointWarning`."""
    # Newest first, whatever latest.json says: a checkpoint renamed into place is complete even if the
    # process died before moving the pointer.
    candidates = list(reversed(list_checkpoints(root)))
    for ckpt in candidates:
        problems = verify(ckpt)
        if not problems:
            return ckpt
        warnings.warn(f"checkpoint {ckpt.path} is not usable ({'; '.join(problems)}); falling back to the "
                      f"previous one", CheckpointWarning, stacklevel=2)
    if candidates:
        raise ConfigError(f"no checkpoint in '{root}' verifies ({len(candidates)} found, all corrupt): the run "
                          f"cannot be resumed. Start a new run (its best weights may still be usable).")
    raise ConfigError(f"'{root}' holds no checkpoint: nothing to resume. Start the run with `defectkit train`.")


def _week(ckpt: Checkpoint) -> tuple[int, int]:
    try:
        created = json.loads((ckpt.path / MANIFEST).read_text())["created"]
        year, week, _ = datetime.fromisoformat(created).isocalendar()
    except (OSError, ValueError, KeyError, TypeError):
        year, week, _ = datetime.fromtimestamp(ckpt.path.stat().st_mtime, timezone.utc).isocalendar()
    return year, week


def apply_retention(root: Path, policy: Retention) -> list[Path]:
    """Delete checkpoints the policy does not keep; returns the deleted paths.

    The just-written latest is always kept, and nothing is deleted unless a kept checkpoint verifies.
    """
    ckpts = list_checkpoints(root)
    if not ckpts:
        return []
    keep = {c.path for c in ckpts[-policy.keep_last:]}
    best = read_pointer(root, "best")
    if policy.keep_best and best is not None:
        keep.add(best.path)
    if policy.keep_weekly:
        newest_of_week: dict[tuple[int, int], Checkpoint] = {}
        for ckpt in ckpts:
            newest_of_week[_week(ckpt)] = ckpt  # ascending epochs: the last one of a week wins
        keep.update(c.path for c in newest_of_week.values())
    doomed = [c for c in ckpts if c.path not in keep]
    if not doomed:
        return []
    if not any(not verify(c) for c in reversed(ckpts) if c.path in keep):  # newest first: usually one hash
        warnings.warn(f"no kept checkpoint in {root} verifies: retention deletes nothing", CheckpointWarning,
                      stacklevel=2)
        return []
    for ckpt in doomed:
        shutil.rmtree(ckpt.path, ignore_errors=True)
    _fsync_dir(root)
    return [c.path for c in doomed]
