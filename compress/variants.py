"""Compression variants of a run: where each lives, what it is and how it scored.

Every method (prune, ptq, qat) turns the run's FP32 export into one or more *variants*. A variant is an
export directory with a ``deploy.json`` (``edge_runtime.modelspec``, the same contract as ``defectkit
export``) plus a ``variant.json`` that records its method, parent, recipe, COCO figures, size, FLOPs,
latency and the gate's verdict. Layout::

    runs/<line>/<run>/export/                the FP32 parent (``defectkit export``)
    runs/<line>/<run>/compress/<name>/       one variant: deploy.json, model files, variant.json
    runs/<line>/<run>/compress/table.{md,csv,png}

The FP32 parent has a ``compress/fp32/variant.json`` whose ``export_dir`` points at ``../../export``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from edge_runtime.errors import UserInputError
from edge_runtime.fileio import atomic_write_json

COMPRESS_DIR = "compress"
VARIANT_FILE = "variant.json"
PARENT = "fp32"
METHODS = ("fp32", "prune", "ptq", "qat")


@dataclass
class Variant:
    """One deployable variant of a run and its figures (``None`` = not measured)."""

    name: str
    method: str
    parent: str | None
    export_dir: Path  # holds deploy.json and the model files
    recipe: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] | None = None  # detect.evaluate.EvalResult.to_dict() on the line's val set
    eval_model: str | None = None  # the model file (in export_dir) that was evaluated
    gflops: float | None = None
    params_m: float | None = None
    size_mb: float | None = None  # size of the evaluated model file(s)
    latency_ms: dict[str, float] = field(default_factory=dict)  # "<backend>@<threads>" -> median ms
    gate: dict[str, Any] | None = None  # compress.gate.GateResult.to_dict()
    settings: dict[str, Any] | None = None  # :func:`settings_record`: the run's settings.yaml (path, sha256) + used

    @property
    def map50_95(self) -> float | None:
        return None if self.eval is None else float(self.eval["map50_95"])

    @property
    def map50(self) -> float | None:
        return None if self.eval is None else float(self.eval["map50"])

    @property
    def deploy_json(self) -> Path:
        return self.export_dir / "deploy.json"

    def to_dict(self, base: Path) -> dict[str, Any]:
        out = asdict(self)
        out["export_dir"] = os.path.relpath(self.export_dir, base)
        return out

    def save(self, run_dir: str | Path) -> Path:
        """Write ``<run>/compress/<name>/variant.json`` atomically."""
        directory = variant_dir(run_dir, self.name)
        directory.mkdir(parents=True, exist_ok=True)
        return atomic_write_json(directory / VARIANT_FILE, self.to_dict(directory))

    @classmethod
    def load(cls, path: str | Path) -> "Variant":
        path = Path(path)
        if path.is_dir():
            path = path / VARIANT_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise UserInputError(f"variant file {path}: {exc.strerror}. Run `defectkit compress` first.") from None
        except ValueError as exc:
            raise UserInputError(f"variant file {path} is not valid JSON ({exc}); delete it and compress again.") from None
        raw["export_dir"] = (path.parent / raw["export_dir"]).resolve()
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in known})


def settings_record(run_dir: str | Path | None, spec, train: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a variant was made with: the run's ``settings.yaml`` (path and sha256: every section as trained,
    the command-line overrides of ``defectkit train`` included), the overrides recorded on the spec (the run's
    and this command's), the compress section used and, for a fine-tune (prune, QAT), its own train section.
    ``run_dir`` None (a stage called on a spec outside a run): no pointer."""
    out: dict[str, Any] = {}
    if run_dir is not None:
        from detect.run_settings import settings_path

        path = settings_path(Path(run_dir))
        out["run_settings"] = {"file": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    if spec is not None:
        out["overrides"] = {k: dict(v) for k, v in spec.cli.items()}
        out["compress"] = spec.settings.to_dict()["compress"]
    if train is not None:
        out["train"] = dict(train)
    return out


def variant_dir(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / COMPRESS_DIR / name


def list_variants(run_dir: str | Path) -> list[Variant]:
    """Every variant of a run with a variant.json, the FP32 parent first, then by name."""
    root = Path(run_dir) / COMPRESS_DIR
    found = [Variant.load(p) for p in sorted(root.glob(f"*/{VARIANT_FILE}"))] if root.is_dir() else []
    return sorted(found, key=lambda v: (v.name != PARENT, v.name))


def load_variant(run_dir: str | Path, name: str) -> Variant:
    path = variant_dir(run_dir, name) / VARIANT_FILE
    if not path.is_file():
        have = ", ".join(v.name for v in list_variants(run_dir)) or "none yet"
        raise UserInputError(f"run {run_dir} has no variant '{name}' (have: {have}). "
                             "Make it with `defectkit compress --method prune|ptq|qat RUN`.")
    return Variant.load(path)


def model_size_mb(export_dir: Path, model_file: str) -> float:
    """Size of a model file plus its weights file (``.pdiparams`` beside a ``.pdmodel``)."""
    path = Path(export_dir) / model_file
    total = path.stat().st_size
    params = path.with_suffix(".pdiparams")
    if path.suffix == ".pdmodel" and params.is_file():
        total += params.stat().st_size
    return round(total / 1e6, 3)


__all__ = ["Variant", "COMPRESS_DIR", "VARIANT_FILE", "PARENT", "METHODS", "settings_record", "variant_dir", "list_variants",
           "load_variant", "model_size_mb"]
