"""A run's one record of what it used: ``runs/<line>/<run>/settings.yaml``.

It holds the line (id, classes in contract order, input and model size, absolute data paths), every settings
section as resolved for the run (defaults < line spec < command line), the command-line overrides on their
own, the spec file it came from with its sha256, and the ppdet configuration built from it. Resume, export,
compress, prune, QAT, retrain and bundle read the line and its settings from here, never from the spec file
again: a ``--lr`` given to ``train`` reaches every later record of the run. A spec file given again to a later
stage is compared with the record and its differences reported, not mixed in.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from detect.linespec import DataPaths, LineSpec
from detect.settings import Settings
from edge_runtime.errors import ConfigError
from edge_runtime.fileio import atomic_write_text

SCHEMA = "defectkit.run-settings/1"
FILENAME = "settings.yaml"
LEGACY_FILES = ("config.yaml", "line.yaml")  # what a run recorded before settings.yaml


def settings_path(run_root: Path) -> Path:
    return Path(run_root) / FILENAME


def write_run_settings(run_root: Path, spec: LineSpec, **extra: Any) -> Path:
    """Record ``spec`` (settings and overrides included) as the run's settings.yaml, atomically.

    ``extra`` adds run facts next to it (the training device, the ppdet configuration)."""
    source = spec.source
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "line": spec.line,
        "classes": list(spec.classes),
        "image_size": spec.image_size,
        "model_size": spec.model_size,
        "paths": {k: str(getattr(spec.paths, k)) for k in ("root", "images", "train", "val")},
        "spec_file": str(source) if source else None,
        "spec_sha256": _sha256(source) if source and source.is_file() else None,
        "overrides": {k: dict(v) for k, v in spec.cli.items()},
        "settings": spec.settings.to_dict(),
        **extra,
    }
    path = settings_path(run_root)
    atomic_write_text(path, yaml.safe_dump(record, sort_keys=False))
    return path


def read_record(run_root: Path) -> dict[str, Any]:
    """The raw settings.yaml of a run; a clear error for a folder that is not a run, or one from before it."""
    run_root = Path(run_root)
    path = settings_path(run_root)
    if not path.is_file():
        if any((run_root / name).is_file() for name in LEGACY_FILES):
            raise ConfigError(f"run '{run_root}' was made before runs recorded settings.yaml (it has "
                              f"{' and '.join(n for n in LEGACY_FILES if (run_root / n).is_file())}). Migrate it once "
                              f"with `defectkit migrate-run {run_root}`.")
        raise ConfigError(f"'{run_root}' is not a training run (no {FILENAME}): give the folder runs/<line>/<run>.")
    try:
        record = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path} cannot be read: {exc}") from None
    if not isinstance(record, Mapping) or record.get("schema") != SCHEMA:
        got = record.get("schema") if isinstance(record, Mapping) else type(record).__name__
        raise ConfigError(f"{path}: schema {got!r} is not {SCHEMA!r}; this kit cannot read that run.")
    return dict(record)


def load_run_spec(run_root: Path) -> LineSpec:
    """The line spec a run used, its settings exactly as recorded (overrides included)."""
    path = settings_path(run_root)
    record = read_record(run_root)
    where = str(path)
    try:
        paths = DataPaths(**{k: Path(record["paths"][k]) for k in ("root", "images", "train", "val")})
        raw = {"line": record["line"], "classes": record["classes"], "image_size": record["image_size"],
               "model_size": record["model_size"], "paths": {"root": str(paths.root)}}
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{where}: field {exc} is missing or malformed.") from None
    spec = LineSpec.from_dict(raw, Path(run_root), where=where)
    settings = Settings.from_dict(record.get("settings") or {}, where)
    source = Path(record["spec_file"]) if record.get("spec_file") else None
    spec = replace(spec, paths=paths, settings=settings, source=source, cli=dict(record.get("overrides") or {}))
    spec.check_class_thresholds(where)
    return spec


def spec_differences(run_spec: LineSpec, spec_file: Path) -> list[str]:
    """What a spec file says today that the run did not use (line, classes, sizes, data, settings)."""
    now = LineSpec.load(spec_file).with_cli(run_spec.cli)
    out = []
    for key in ("line", "classes", "image_size", "model_size", "paths"):
        if getattr(run_spec, key) != getattr(now, key):
            out.append(f"{key}: {getattr(run_spec, key)!r} -> {getattr(now, key)!r}")
    return out + run_spec.settings.differences(now.settings)


def spec_for_run(run_root: Path, spec_file: Path | None = None,
                 warn: Callable[[str], None] = print) -> LineSpec:
    """The run's spec; a ``spec_file`` given as well is only compared with it (differences reported)."""
    spec = load_run_spec(run_root)
    if spec_file is not None:
        diffs = spec_differences(spec, Path(spec_file))
        if diffs:
            warn(f"note: {spec_file} differs from what run {run_root} used; the run's settings.yaml wins:\n  "
                 + "\n  ".join(diffs))
    return spec


def migrate_legacy_run(run_root: Path) -> Path:
    """Write settings.yaml for a run made before it, from its line.yaml and config.yaml (train section)."""
    run_root = Path(run_root)
    if settings_path(run_root).is_file():
        raise ConfigError(f"run '{run_root}' already has {FILENAME}; nothing to migrate.")
    line_file, config_file = run_root / "line.yaml", run_root / "config.yaml"
    if not line_file.is_file() or not config_file.is_file():
        raise ConfigError(f"'{run_root}' has no line.yaml and config.yaml to migrate from: is it a training run?")
    spec = LineSpec.load(line_file)
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    train = {k: v for k, v in (config.get("train") or {}).items() if k in spec.settings.to_dict()["train"]}
    recorded = spec.settings.to_dict()["train"]
    cli = {"train": {k: v for k, v in train.items() if recorded.get(k) != v}}
    spec = spec.with_cli(cli)
    return write_run_settings(run_root, replace(spec, source=None), device=config.get("device"),
                              ppdet=config.get("ppdet"), migrated_from=list(LEGACY_FILES))


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
