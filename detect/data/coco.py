"""The kit's normalised COCO layout and the few helpers every data verb shares.

Layout of a data set root (written by ``synth`` and ``data import``, read by training)::

    <root>/images/<file>            jpg or png
    <root>/annotations/all.json     COCO, category ids 1..K in line-spec class order
    <root>/annotations/train.json   stratified split of all.json
    <root>/annotations/val.json

COCO dicts stay plain dicts: they are the wire format that pycocotools and ppdet read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from edge_runtime.errors import DataError
from edge_runtime.fileio import atomic_write_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Layout:
    """Paths of one data set in the normalised layout."""

    root: Path

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def annotations(self) -> Path:
        return self.root / "annotations"

    @property
    def all(self) -> Path:
        return self.annotations / "all.json"

    @property
    def train(self) -> Path:
        return self.annotations / "train.json"

    @property
    def val(self) -> Path:
        return self.annotations / "val.json"


def categories(classes: Sequence[str]) -> list[dict[str, Any]]:
    """COCO categories with ids 1..K in line-spec order (the contract with the edge box)."""
    return [{"id": i + 1, "name": name, "supercategory": "defect"} for i, name in enumerate(classes)]


def make_coco(images: list[dict], annotations: list[dict], classes: Sequence[str], description: str = "") -> dict:
    """A COCO dict with the kit's fixed key order (no timestamps: same input gives the same bytes)."""
    return {
        "info": {"description": description or "defectkit data set", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories(classes),
    }


def box_annotation(ann_id: int, image_id: int, category_id: int, bbox: Sequence[float]) -> dict[str, Any]:
    """One COCO box annotation; coordinates rounded to 1/100 px so the JSON is stable."""
    x, y, w, h = (round(float(v), 2) for v in bbox)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [x, y, w, h],
        "area": round(w * h, 2),
        "iscrowd": 0,
    }


def load_coco(path: str | Path) -> dict[str, Any]:
    """Read a COCO JSON file; a missing or malformed file is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file '{path}' does not exist.")
    try:
        with open(path, encoding="utf-8") as fh:
            coco = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"annotation file '{path}' is not valid JSON: {exc}") from exc
    if not isinstance(coco, dict):
        raise DataError(f"annotation file '{path}': expected a JSON object with images/annotations/categories.")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key, []), list):
            raise DataError(f"annotation file '{path}': '{key}' must be a list.")
        coco.setdefault(key, [])
    return coco


def write_coco(path: str | Path, coco: dict[str, Any]) -> Path:
    """Write a COCO dict atomically (compact separators: data sets can hold many boxes)."""
    return atomic_write_text(path, json.dumps(coco, separators=(",", ":")) + "\n")


def subset(coco: dict[str, Any], image_ids: Iterable[int]) -> dict[str, Any]:
    """The images with the given ids (in their original order) and their annotations."""
    keep = set(image_ids)
    out = {k: v for k, v in coco.items() if k not in ("images", "annotations")}
    out["images"] = [im for im in coco["images"] if im["id"] in keep]
    out["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    return out


def class_names(coco: dict[str, Any]) -> list[str]:
    """Category names in id order."""
    return [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
