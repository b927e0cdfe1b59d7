"""Line specs: the one contract every workflow takes (``lines/<line>.yaml``).

A line spec names the line, its classes (their order is the contract with the edge box), the network
input size, the model size, where the data is, and overrides of the defaults table
(``detect/defaults.yaml``). ``LineSpec.settings`` is the resolved :class:`~detect.settings.Settings`:
defaults < the spec file; a command puts its command-line values on top once, with :meth:`LineSpec.with_cli`,
and hands the result to the stage functions. A run records the spec it used, settings and overrides included,
in ``settings.yaml`` (:mod:`detect.run_settings`); later stages read that, not the spec file.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from detect.settings import SECTIONS, Layer, Settings
from edge_runtime.errors import ConfigError
from edge_runtime.typedconf import did_you_mean

DEFAULTS_PATH = Path(__file__).with_name("defaults.yaml")
MODEL_SIZES = ("tiny", "s", "m", "l", "x")
_LINE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_TOP_KEYS = ("line", "classes", "image_size", "model_size", "paths") + SECTIONS


def load_table() -> dict[str, dict[str, Any]]:
    """The annotated defaults table as data (the documentation of every setting; tests compare it with the
    dataclasses of :mod:`detect.settings`)."""
    with open(DEFAULTS_PATH, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@dataclass(frozen=True)
class DataPaths:
    """Where a line's data lives; relative paths in the YAML are relative to the YAML file."""

    root: Path
    images: Path
    train: Path
    val: Path

    @classmethod
    def from_yaml(cls, where: str, raw: Mapping[str, Any], base_dir: Path) -> "DataPaths":
        known = {"root", "images", "train", "val"}
        for key in raw:
            if key not in known:
                raise ConfigError(f"{where}: unknown key 'paths.{key}'.{did_you_mean(key, sorted(known))}")
        if "root" not in raw:
            raise ConfigError(f"{where}: 'paths.root' is missing (the folder holding images/ and annotations/).")
        root = (base_dir / str(raw["root"])).resolve()
        return cls(
            root=root,
            images=(root / str(raw.get("images", "images"))).resolve(),
            train=(root / str(raw.get("train", "annotations/train.json"))).resolve(),
            val=(root / str(raw.get("val", "annotations/val.json"))).resolve(),
        )

    def to_yaml(self, base_dir: Path) -> dict[str, str]:
        def rel(p: Path, start: Path) -> str:
            return os.path.relpath(p, start)

        return {
            "root": rel(self.root, base_dir),
            "images": rel(self.images, self.root),
            "train": rel(self.train, self.root),
            "val": rel(self.val, self.root),
        }


@dataclass(frozen=True)
class LineSpec:
    """A production line: id, classes in contract order, input size, model size, data, resolved settings."""

    line: str
    classes: list
    image_size: int
    model_size: str
    paths: DataPaths
    settings: Settings = field(default_factory=Settings)
    source: Path | None = None
    cli: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # command-line overrides on top of the file

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], base_dir: Path, where: str = "line spec") -> "LineSpec":
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: expected a YAML mapping at the top level, got {type(raw).__name__}.")
        for key in raw:
            if key not in _TOP_KEYS:
                raise ConfigError(f"{where}: unknown key '{key}'.{did_you_mean(str(key), list(_TOP_KEYS))}")
        for key in ("line", "classes", "paths"):
            if key not in raw:
                raise ConfigError(f"{where}: required key '{key}' is missing.")
        line = str(raw["line"])
        if not _LINE_ID.match(line):
            raise ConfigError(
                f"{where}: line id '{line}' must be lower-case letters, digits, '-' or '_' (at most 64)."
            )
        classes = raw["classes"]
        if not isinstance(classes, (list, tuple)) or not classes or not all(isinstance(c, str) and c for c in classes):
            raise ConfigError(f"{where}: 'classes' must be a non-empty list of class names.")
        if len(set(classes)) != len(classes):
            dup = sorted({c for c in classes if list(classes).count(c) > 1})
            raise ConfigError(f"{where}: class names must be unique; repeated: {', '.join(dup)}.")
        image_size = raw.get("image_size", 320)
        if not isinstance(image_size, int) or image_size < 64 or image_size % 32:
            raise ConfigError(f"{where}: 'image_size' must be a multiple of 32 and at least 64, got {image_size!r}.")
        model_size = str(raw.get("model_size", "s"))
        if model_size not in MODEL_SIZES:
            raise ConfigError(
                f"{where}: 'model_size' must be one of {', '.join(MODEL_SIZES)}, got '{model_size}'."
            )
        if not isinstance(raw["paths"], Mapping):
            raise ConfigError(f"{where}: 'paths' must be a mapping with at least 'root'.")
        layer = {name: dict(raw[name] or {}) if isinstance(raw[name], Mapping) else raw[name]
                 for name in SECTIONS if name in raw}
        train = layer.get("train")
        if isinstance(train, dict) and isinstance(train.get("pretrained"), str):
            train["pretrained"] = absolute_weights(train["pretrained"], base_dir)  # relative to the spec file
        spec = cls(line=line, classes=list(classes), image_size=image_size, model_size=model_size,
                   paths=DataPaths.from_yaml(where, raw["paths"], base_dir),
                   settings=Settings.resolve((where, layer)))
        spec.check_class_thresholds(where)
        return spec

    def check_class_thresholds(self, where: str) -> None:
        unknown_cls = set(self.settings.runtime.class_thresholds) - set(self.classes)
        if unknown_cls:
            raise ConfigError(
                f"{where}: runtime.class_thresholds names unknown classes: {', '.join(sorted(unknown_cls))}."
            )

    @classmethod
    def load(cls, path: str | Path) -> "LineSpec":
        """Read and validate ``lines/<line>.yaml``; every fault names the file and the key."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"line spec '{path}' does not exist. Create it, e.g. with `defectkit synth`.")
        try:
            with open(path, encoding="utf-8") as fh:
                raw = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise ConfigError(f"line spec '{path}' is not valid YAML: {exc}") from exc
        spec = cls.from_dict(raw, path.parent.resolve(), where=f"line spec '{path}'")
        return replace(spec, source=path.resolve())

    def with_cli(self, cli: Layer | None) -> "LineSpec":
        """This spec with the command line on top: defaults < line spec < CLI. Called once per command."""
        if not cli or not any(cli.values()):
            return self
        spec = replace(self, settings=self.settings.overlay("command line", cli),
                       cli=merge_layers(self.cli, cli))
        spec.check_class_thresholds("command line")
        return spec

    def with_settings(self, settings: Settings) -> "LineSpec":
        """The same line with a stage's own settings (e.g. the QAT session's training section)."""
        return replace(self, settings=settings)

    def to_dict(self, base_dir: Path) -> dict[str, Any]:
        """The YAML form: only settings that differ from the defaults are written."""
        defaults = Settings().to_dict()
        out: dict[str, Any] = {
            "line": self.line,
            "classes": list(self.classes),
            "image_size": self.image_size,
            "model_size": self.model_size,
            "paths": self.paths.to_yaml(base_dir),
        }
        for name, values in self.settings.to_dict().items():
            diff = {k: v for k, v in values.items() if defaults[name].get(k) != v}
            if diff.get("pretrained"):  # relative to the spec file, as from_dict reads it (the two can move together)
                diff["pretrained"] = relative_weights(diff["pretrained"], base_dir)
            if diff:
                out[name] = diff
        return out

    def save(self, path: str | Path) -> Path:
        """Write the spec atomically (relative data paths, so the folder can move)."""
        from edge_runtime.fileio import atomic_write_text

        path = Path(path)
        text = yaml.safe_dump(self.to_dict(path.parent.resolve()), sort_keys=False)
        atomic_write_text(path, text)
        return path


def absolute_weights(pretrained: str, base_dir: Path) -> str:
    """A relative ``train.pretrained`` path is relative to the file that names it; URLs stay as they are."""
    if pretrained and "://" not in pretrained and not Path(pretrained).is_absolute():
        return str((base_dir / pretrained).resolve())
    return pretrained


def relative_weights(pretrained: str, base_dir: Path) -> str:
    """The inverse of :func:`absolute_weights` for writing a spec file: a local path relative to ``base_dir``."""
    if pretrained and "://" not in pretrained and Path(pretrained).is_absolute():
        return os.path.relpath(pretrained, Path(base_dir).resolve())
    return pretrained


def merge_layers(*layers: Layer) -> dict[str, dict[str, Any]]:
    """Section-wise union of override layers, later ones winning."""
    out: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for name, values in (layer or {}).items():
            out.setdefault(name, {}).update(values or {})
    return out
