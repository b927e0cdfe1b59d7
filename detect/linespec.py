"""Line specs: the one contract every workflow takes (``lines/<line>.yaml``).

A line spec names the line, its classes (their order is the contract with the edge box), the network
input size, the model size, where the data is, and overrides of the defaults table
(``detect/defaults.yaml``). Settings resolve in one visible order: defaults, then the line spec, then
the command line (see :func:`resolve_settings`).
"""
from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from edge_runtime.errors import ConfigError

DEFAULTS_PATH = Path(__file__).with_name("defaults.yaml")
MODEL_SIZES = ("tiny", "s", "m", "l", "x")
SECTIONS = ("data", "train", "retrain", "export", "compress", "runtime", "drift")
_LINE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_TOP_KEYS = ("line", "classes", "image_size", "model_size", "paths") + SECTIONS


def load_defaults() -> dict[str, dict[str, Any]]:
    """The defaults table, a fresh copy each call (callers may mutate it)."""
    with open(DEFAULTS_PATH, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _did_you_mean(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    return f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(sorted(choices))}."


def _check_type(where: str, key: str, value: Any, default: Any) -> Any:
    """Accept a value only if it has the default's type (ints are fine where floats are expected)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}.")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}.")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: '{key}' must be a whole number, got {value!r}.")
        return value
    if isinstance(default, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. freeze: 2
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{key}' must be text, got {value!r}.")
        return value
    if isinstance(default, list) and not isinstance(value, list):
        raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}.")
    if isinstance(default, dict) and not isinstance(value, dict):
        raise ConfigError(f"{where}: '{key}' must be a mapping, got {value!r}.")
    return value


def merge_section(where: str, section: str, base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overlay ``overrides`` on ``base``, refusing unknown keys and wrong types."""
    merged = dict(base)
    for key, value in (overrides or {}).items():
        if key not in base:
            raise ConfigError(f"{where}: unknown key '{section}.{key}'.{_did_you_mean(key, list(base))}")
        merged[key] = _check_type(where, f"{section}.{key}", value, base[key])
    return merged


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
                raise ConfigError(f"{where}: unknown key 'paths.{key}'.{_did_you_mean(key, sorted(known))}")
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
            import os

            return os.path.relpath(p, start)

        return {
            "root": rel(self.root, base_dir),
            "images": rel(self.images, self.root),
            "train": rel(self.train, self.root),
            "val": rel(self.val, self.root),
        }


@dataclass
class LineSpec:
    """A production line: id, classes in contract order, input size, model size, data, settings."""

    line: str
    classes: list[str]
    image_size: int
    model_size: str
    paths: DataPaths
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    retrain: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    compress: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    drift: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], base_dir: Path, where: str = "line spec") -> "LineSpec":
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: expected a YAML mapping at the top level, got {type(raw).__name__}.")
        for key in raw:
            if key not in _TOP_KEYS:
                raise ConfigError(f"{where}: unknown key '{key}'.{_did_you_mean(str(key), list(_TOP_KEYS))}")
        for key in ("line", "classes", "paths"):
            if key not in raw:
                raise ConfigError(f"{where}: required key '{key}' is missing.")
        line = str(raw["line"])
        if not _LINE_ID.match(line):
            raise ConfigError(
                f"{where}: line id '{line}' must be lower-case letters, digits, '-' or '_' (at most 64)."
            )
        classes = raw["classes"]
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
            raise ConfigError(f"{where}: 'classes' must be a non-empty list of class names.")
        if len(set(classes)) != len(classes):
            dup = sorted({c for c in classes if classes.count(c) > 1})
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
        defaults = load_defaults()
        sections = {}
        for name in SECTIONS:
            over = raw.get(name) or {}
            if not isinstance(over, Mapping):
                raise ConfigError(f"{where}: '{name}' must be a mapping of settings.")
            sections[name] = merge_section(where, name, defaults[name], over)
        pretrained = sections["train"]["pretrained"]
        if pretrained and "://" not in pretrained and not Path(pretrained).is_absolute():
            sections["train"]["pretrained"] = str((base_dir / pretrained).resolve())  # relative to the spec file
        unknown_cls = set(sections["runtime"]["class_thresholds"]) - set(classes)
        if unknown_cls:
            raise ConfigError(
                f"{where}: runtime.class_thresholds names unknown classes: {', '.join(sorted(unknown_cls))}."
            )
        return cls(
            line=line,
            classes=list(classes),
            image_size=image_size,
            model_size=model_size,
            paths=DataPaths.from_yaml(where, raw["paths"], base_dir),
            **sections,
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
        spec.source = path.resolve()
        return spec

    def to_dict(self, base_dir: Path) -> dict[str, Any]:
        """The YAML form: only settings that differ from the defaults are written."""
        defaults = load_defaults()
        out: dict[str, Any] = {
            "line": self.line,
            "classes": list(self.classes),
            "image_size": self.image_size,
            "model_size": self.model_size,
            "paths": self.paths.to_yaml(base_dir),
        }
        for name in SECTIONS:
            diff = {k: v for k, v in getattr(self, name).items() if defaults[name].get(k) != v}
            if diff:
                out[name] = diff
        return out

    def save(self, path: str | Path) -> Path:
        """Write the spec atomically (relative data paths, so the folder can move)."""
        from edge_runtime.fileio import atomic_write_text

        path = Path(path)
        text = yaml.safe_dump(self.to_dict(path.parent.resolve()), sort_keys=False)
        atomic_write_text(path, text)
        self.source = path.resolve()
        return path

    def with_overrides(self, section: str, overrides: Mapping[str, Any]) -> "LineSpec":
        """A copy with CLI overrides applied on one section: defaults < line spec < CLI."""
        spec = copy.deepcopy(self)
        setattr(spec, section, merge_section("command line", section, getattr(self, section), overrides))
        return spec


def resolve_settings(spec: LineSpec, section: str, cli: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The override order in one line: defaults, then the line spec, then the command line."""
    return merge_section("command line", section, {**load_defaults()[section], **getattr(spec, section)}, cli or {})
