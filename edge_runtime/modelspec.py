"""``deploy.json``: what a deployable model is, written by the exporter beside the model files.

The exporter and the edge box agree on this one description (schema ``defectkit.deploy/1``): the class
names in contract order, the input pre-processing, the post-processing thresholds and one entry per model
file. The edge side never guesses any of it. Every fault names the file, the key and what to do.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from edge_runtime.errors import BundleError, ConfigError, ModelError
from edge_runtime.fileio import atomic_write_json

SCHEMA = "defectkit.deploy/1"
FILENAME = "deploy.json"

COLORS = ("RGB", "BGR")
RESIZE_MODES = ("stretch",)  # letterbox would need a pad-aware scale_factor: not in schema /1
LAYOUTS = ("NCHW",)
# cv2 codes: ppdet's Resize takes the same integers (its `interp`), so the trainer reuses them.
INTERPOLATIONS = {"nearest": 0, "linear": 1, "cubic": 2, "area": 3}
FORMATS = ("onnx", "paddle", "paddlelite")
TARGETS = ("x86", "arm", "any")
PRECISIONS = ("fp32", "int8")
NMS_PLACES = ("in_model", "host")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _hint(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    return f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(sorted(choices))}."


def _check_keys(where: str, raw: Any, known: tuple[str, ...], required: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}.")
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{key}'.{_hint(str(key), list(known))}")
    missing = [k for k in required if k not in raw]
    if missing:
        raise ConfigError(f"{where}: required key(s) missing: {', '.join(missing)}.")
    return raw


def _choice(where: str, key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{where}: '{key}' must be one of {', '.join(choices)}, got {value!r}.")
    return str(value)


def _number(where: str, key: str, value: Any, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: '{key}' must be a finite number, got {value!r}.")
    if positive and value <= 0:
        raise ConfigError(f"{where}: '{key}' must be greater than 0, got {value!r}.")
    return float(value)


def _integer(where: str, key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: '{key}' must be a whole number >= {minimum}, got {value!r}.")
    return value


def _triple(where: str, key: str, value: Any, positive: bool = False) -> tuple[float, float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ConfigError(f"{where}: '{key}' must be a list of 3 numbers (one per channel), got {value!r}.")
    return tuple(_number(where, f"{key}[{i}]", v, positive) for i, v in enumerate(value))  # type: ignore


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes the network input (see :func:`edge_runtime.preprocess.preprocess`)."""

    size: tuple[int, int]  # (h, w) of the network input
    color: str = "RGB"
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    resize: str = "stretch"
    layout: str = "NCHW"
    feeds: tuple[str, ...] = ("image", "scale_factor")
    interp: str = "linear"  # optional in the JSON; cv2 interpolation of the resize

    @property
    def height(self) -> int:
        return self.size[0]

    @property
    def width(self) -> int:
        return self.size[1]

    @property
    def cv2_interp(self) -> int:
        """The cv2 interpolation code (also ppdet ``Resize.interp``)."""
        return INTERPOLATIONS[self.interp]

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> "InputSpec":
        where = f"{where} 'input'"
        known = ("size", "color", "scale", "mean", "std", "resize", "layout", "feeds", "interp")
        raw = _check_keys(where, raw, known, ("size",))
        size = raw["size"]
        if (
            not isinstance(size, (list, tuple))
            or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
        ):
            raise ConfigError(f"{where}: 'size' must be [height, width] in positive whole pixels, got {size!r}.")
        feeds = raw.get("feeds", list(cls.feeds))
        if not isinstance(feeds, (list, tuple)) or not feeds or not all(isinstance(f, str) and f for f in feeds):
            raise ConfigError(f"{where}: 'feeds' must be a non-empty list of input names, got {feeds!r}.")
        return cls(
            size=(int(size[0]), int(size[1])),
            color=_choice(where, "color", raw.get("color", cls.color), COLORS),
            scale=_number(where, "scale", raw.get("scale", cls.scale), positive=True),
            mean=_triple(where, "mean", raw.get("mean", list(cls.mean))),
            std=_triple(where, "std", raw.get("std", list(cls.std)), positive=True),
            resize=_choice(where, "resize", raw.get("resize", cls.resize), RESIZE_MODES),
            layout=_choice(where, "layout", raw.get("layout", cls.layout), LAYOUTS),
            feeds=tuple(feeds),
            interp=_choice(where, "interp", raw.get("interp", cls.interp), tuple(INTERPOLATIONS)),
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("size", "mean", "std", "feeds"):
            out[key] = list(out[key])
        return out


@dataclass(frozen=True)
class PostprocessSpec:
    """Thresholds of the multiclass NMS, in the model or on the host (same meaning as ppdet's)."""

    nms_iou: float = 0.6
    score_threshold: float = 0.01
    nms_top_k: int = 1000  # candidates per class before NMS; -1 = all
    keep_top_k: int = 100  # detections per image after NMS; -1 = all

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> "PostprocessSpec":
        where = f"{where} 'postprocess'"
        raw = _check_keys(where, raw, ("nms_iou", "score_threshold", "nms_top_k", "keep_top_k"), ())
        nms_iou = _number(where, "nms_iou", raw.get("nms_iou", cls.nms_iou))
        if not 0.0 < nms_iou <= 1.0:
            raise ConfigError(f"{where}: 'nms_iou' must be in (0, 1], got {nms_iou}.")
        score = _number(where, "score_threshold", raw.get("score_threshold", cls.score_threshold))
        if not 0.0 <= score < 1.0:
            raise ConfigError(f"{where}: 'score_threshold' must be in [0, 1), got {score}.")
        return cls(
            nms_iou=nms_iou,
            score_threshold=score,
            nms_top_k=_integer(where, "nms_top_k", raw.get("nms_top_k", cls.nms_top_k), -1),
            keep_top_k=_integer(where, "keep_top_k", raw.get("keep_top_k", cls.keep_top_k), -1),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelEntry:
    """One model file of the export: its format, target, precision and where NMS runs."""

    file: str
    format: str
    target: str = "any"
    precision: str = "fp32"
    nms: str = "in_model"
    runtime_version: str | None = None
    sha256: str = ""

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> "ModelEntry":
        known = ("file", "format", "target", "precision", "nms", "runtime_version", "sha256")
        raw = _check_keys(where, raw, known, ("file", "format", "nms", "sha256"))
        file = raw["file"]
        if not isinstance(file, str) or not file or Path(file).name != file:
            raise ConfigError(f"{where}: 'file' must be a bare file name beside {FILENAME}, got {file!r}.")
        sha = raw["sha256"]
        if not isinstance(sha, str) or not _SHA256.match(sha):
            raise ConfigError(f"{where}: 'sha256' must be 64 lower-case hex digits, got {sha!r}.")
        version = raw.get("runtime_version")
        if version is not None and not isinstance(version, str):
            raise ConfigError(f"{where}: 'runtime_version' must be text or null, got {version!r}.")
        return cls(
            file=file,
            format=_choice(where, "format", raw["format"], FORMATS),
            target=_choice(where, "target", raw.get("target", cls.target), TARGETS),
            precision=_choice(where, "precision", raw.get("precision", cls.precision), PRECISIONS),
            nms=_choice(where, "nms", raw["nms"], NMS_PLACES),
            runtime_version=version,
            sha256=sha,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ModelSpec:
    """The whole ``deploy.json``. ``meta`` is free-form (kit version, created, source checkpoint)."""

    line: str
    classes: list[str]
    input: InputSpec
    models: list[ModelEntry]
    postprocess: PostprocessSpec = field(default_factory=PostprocessSpec)
    meta: dict[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA

    @classmethod
    def from_dict(cls, raw: Any, where: str = FILENAME) -> "ModelSpec":
        known = ("schema", "line", "classes", "input", "postprocess", "models", "meta")
        raw = _check_keys(where, raw, known, ("schema", "line", "classes", "input", "models"))
        if raw["schema"] != SCHEMA:
            raise ConfigError(
                f"{where}: schema is {raw['schema']!r}, this runtime reads {SCHEMA!r}. "
                "Re-export the model with a matching defectkit, or update the edge runtime."
            )
        line = raw["line"]
        if not isinstance(line, str) or not line:
            raise ConfigError(f"{where}: 'line' must be the non-empty line id, got {line!r}.")
        classes = raw["classes"]
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
            raise ConfigError(f"{where}: 'classes' must be a non-empty list of class names, got {classes!r}.")
        if len(set(classes)) != len(classes):
            raise ConfigError(f"{where}: class names must be unique, got {classes!r}.")
        models = raw["models"]
        if not isinstance(models, list) or not models:
            raise ConfigError(f"{where}: 'models' must be a non-empty list of model entries.")
        entries = [ModelEntry.from_dict(m, f"{where} models[{i}]") for i, m in enumerate(models)]
        files = [e.file for e in entries]
        if len(set(files)) != len(files):
            raise ConfigError(f"{where}: each model file may appear once in 'models', got {files}.")
        meta = raw.get("meta", {})
        if not isinstance(meta, Mapping):
            raise ConfigError(f"{where}: 'meta' must be a JSON object, got {type(meta).__name__}.")
        return cls(
            line=line,
            classes=list(classes),
            input=InputSpec.from_dict(raw["input"], where),
            postprocess=PostprocessSpec.from_dict(raw.get("postprocess", {}), where),
            models=entries,
            meta=dict(meta),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema": self.schema,
            "line": self.line,
            "classes": list(self.classes),
            "input": self.input.to_dict(),
            "postprocess": self.postprocess.to_dict(),
            "models": [m.to_dict() for m in self.models],
        }
        if self.meta:
            out["meta"] = dict(self.meta)
        return out

    @staticmethod
    def path_of(path: str | Path) -> Path:
        """``deploy.json`` itself, or the one inside a directory or beside a model file."""
        path = Path(path)
        if path.is_dir():
            return path / FILENAME
        if path.name == FILENAME or path.suffix == ".json":
            return path
        return path.parent / FILENAME

    @classmethod
    def load(cls, path: str | Path) -> "ModelSpec":
        """Read and validate ``deploy.json`` (given itself, its directory, or a model file beside it)."""
        path = cls.path_of(path)
        if not path.is_file():
            raise ConfigError(
                f"'{path}' does not exist: a deployable model needs its {FILENAME} beside the model file. "
                "Export the model with `defectkit export`, or copy deploy.json along with it."
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"'{path}' is not valid JSON: {exc}") from exc
        return cls.from_dict(raw, where=f"'{path}'")

    def variant(self, models: Sequence[ModelEntry], meta: Mapping[str, Any]) -> "ModelSpec":
        """A derived model set (a quantized or converted copy): same line, classes, input contract and
        post-processing as this one, other model files and their record."""
        return ModelSpec(line=self.line, classes=list(self.classes), input=self.input, models=list(models),
                         postprocess=self.postprocess, meta=dict(meta))

    def save(self, path: str | Path) -> Path:
        """Write atomically; a directory means ``<dir>/deploy.json``."""
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        self.from_dict(self.to_dict(), where=f"'{path}' (before writing)")  # never write what load refuses
        return atomic_write_json(path, self.to_dict())

    def find(self, model_file: str | Path) -> ModelEntry:
        """The entry of a model file (by base name)."""
        name = Path(model_file).name
        for entry in self.models:
            if entry.file == name:
                return entry
        listed = ", ".join(e.file for e in self.models)
        raise ModelError(
            f"{FILENAME} of line '{self.line}' has no entry for '{name}' (it lists: {listed}). "
            "Pass one of those files, or re-export so deploy.json describes this file."
        )

    def verify(self, directory: str | Path, entry: ModelEntry) -> Path:
        """Check that the model file exists and matches its sha256; return its path."""
        path = Path(directory) / entry.file
        if not path.is_file():
            raise ModelError(f"model file '{path}' listed in {FILENAME} does not exist. Copy the whole export directory.")
        actual = file_sha256(path)
        if actual != entry.sha256:
            raise BundleError(
                f"model file '{path}' has sha256 {actual[:12]}..., {FILENAME} expects {entry.sha256[:12]}...: "
                "the file was changed or truncated. Copy the export directory again (or re-export)."
            )
        return path
