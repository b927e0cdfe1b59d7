"""Writing the line spec that goes with a data set written by synth, import or fix.

The spec's ``paths.root`` is the data set folder itself ("."), so the folder can be moved as a whole.
Settings of a given base spec (thresholds, training policy) are carried over unchanged.

Without a base spec, a new line's spec matches the kit's shipped base model (``base_weights/``: its model size,
its input size, and ``train.pretrained`` pointing at it), so ``defectkit train`` fine-tunes from it with no edit
of the spec. The path is written relative to the spec file (the spec loader resolves it from there), so the
data folder and the kit can move together; ``--model-size``, ``--image-size`` and ``--no-pretrained`` decide
otherwise.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from detect.linespec import LineSpec

BASE_WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "base_weights"
SHIPPED_BASE = "pcb-base-tiny-320"  # the base a new line starts from (provenance: base_weights/<name>.json)


@dataclass(frozen=True)
class BaseModel:
    """A base model shipped with the kit: its weights and the model and input size it was trained at."""

    weights: Path
    model_size: str
    image_size: int


def shipped_base(name: str = SHIPPED_BASE) -> BaseModel | None:
    """The kit's shipped base (sizes from its provenance JSON); None when the files are not there."""
    record = BASE_WEIGHTS_DIR / f"{name}.json"
    weights = BASE_WEIGHTS_DIR / f"{name}.pdparams"
    if not (record.is_file() and weights.is_file()):
        return None
    recipe = json.loads(record.read_text()).get("recipe", {})
    return BaseModel(weights, str(recipe.get("model_size", "tiny")), int(recipe.get("image_size", 320)))


def sanitize_line_id(name: str) -> str:
    """A valid line id from a folder name: lower case, other characters become '-'."""
    line = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-_")[:64]
    return line or "line"


def new_line_settings(spec_dir: Path, image_size: int | None = None, model_size: str | None = None,
                      pretrained: bool = True) -> tuple[int, str, dict]:
    """(image_size, model_size, train section) of a new line without a base spec: the shipped base's sizes and
    ``train.pretrained`` (relative to ``spec_dir``) unless told otherwise. Weights for another model size than
    the one asked for are not written (``train`` would refuse them)."""
    base = shipped_base()
    if base is None:
        return image_size or 320, model_size or "tiny", {}
    size = model_size or base.model_size
    train = {}
    if pretrained and size == base.model_size:
        train["pretrained"] = os.path.relpath(base.weights, Path(spec_dir).resolve())
    return image_size or base.image_size, size, train


def write_line_spec(
    out_dir: Path,
    classes: Sequence[str],
    line: str | None = None,
    base: LineSpec | None = None,
    image_size: int | None = None,
    model_size: str | None = None,
    pretrained: bool = True,
    final_dir: Path | None = None,
) -> LineSpec:
    """Save ``<out_dir>/<line>.yaml`` pointing at ``out_dir``; returns the loaded-equivalent spec.

    ``final_dir``: where ``out_dir`` will be renamed to (an import builds beside its output); the line id and
    the relative path of the base weights are taken from there (same parent, so the same relative path)."""
    out_dir = Path(out_dir).resolve()
    final_dir = Path(final_dir).resolve() if final_dir else out_dir
    line = line or (base.line if base else sanitize_line_id(final_dir.name))
    raw = base.to_dict(out_dir) if base else {}
    raw.update({"line": line, "classes": list(classes), "paths": {"root": "."}})
    if base is None:
        size, msize, train = new_line_settings(final_dir, image_size, model_size, pretrained)
        raw["image_size"], raw["model_size"] = size, msize
        if train:
            raw["train"] = {**train, **(raw.get("train") or {})}
    else:
        raw["image_size"] = image_size or raw.get("image_size", 320)
        raw["model_size"] = model_size or raw.get("model_size", "s")
        if not pretrained:
            (raw.get("train") or {}).pop("pretrained", None)
    spec = LineSpec.from_dict(raw, out_dir, where=f"line spec for '{final_dir}'")
    path = spec.save(out_dir / f"{line}.yaml")
    return replace(spec, source=path.resolve())
