"""Label writers for the bench's lines, one per format ``defectkit data import`` reads (COCO, VOC, YOLO).

Each takes frames as (file name, image array, [(class, x, y, w, h), ...]) in COCO pixels and writes them the
way a labelling tool would, so the import is exercised on files a factory engineer could hand over.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

Frame = tuple[str, np.ndarray, list[tuple[str, float, float, float, float]]]


def _save(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, 92] if path.suffix.lower() in (".jpg", ".jpeg") else []
    if not cv2.imwrite(str(path), image, params):
        raise OSError(f"could not write {path}")


def write_coco(folder: Path, frames: Iterable[Frame], classes: Sequence[str]) -> Path:
    """``folder/images/*`` + ``folder/annotations.json``; category ids start at 1 as most tools write them."""
    images, anns = [], []
    for i, (name, image, boxes) in enumerate(frames, start=1):
        _save(folder / "images" / name, image)
        images.append({"id": i, "file_name": name, "width": int(image.shape[1]), "height": int(image.shape[0])})
        for cls, x, y, w, h in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": classes.index(cls) + 1,
                         "bbox": [x, y, w, h], "area": round(w * h, 2), "iscrowd": 0})
    doc = {"images": images, "annotations": anns,
           "categories": [{"id": k + 1, "name": n} for k, n in enumerate(classes)]}
    out = folder / "annotations.json"
    out.write_text(json.dumps(doc))
    return out


def write_voc(folder: Path, frames: Iterable[Frame], val_names: set[str]) -> Path:
    """``Annotations/*.xml`` + ``JPEGImages/*`` + ``ImageSets/Main/{train,val}.txt`` (1-based inclusive boxes)."""
    split = {"train": [], "val": []}
    for name, image, boxes in frames:
        _save(folder / "JPEGImages" / name, image)
        h, w = image.shape[:2]
        depth = 1 if image.ndim == 2 else image.shape[2]
        objs = "".join(
            f"<object><name>{cls}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
            f"<bndbox><xmin>{int(round(x)) + 1}</xmin><ymin>{int(round(y)) + 1}</ymin>"
            f"<xmax>{int(round(x + bw))}</xmax><ymax>{int(round(y + bh))}</ymax></bndbox></object>"
            for cls, x, y, bw, bh in boxes)
        xml = (f"<annotation><folder>JPEGImages</folder><filename>{name}</filename><size><width>{w}</width>"
               f"<height>{h}</height><depth>{depth}</depth></size><segmented>0</segmented>{objs}</annotation>")
        (folder / "Annotations").mkdir(parents=True, exist_ok=True)
        (folder / "Annotations" / f"{Path(name).stem}.xml").write_text(xml)
        split["val" if name in val_names else "train"].append(Path(name).stem)
    sets = folder / "ImageSets" / "Main"
    sets.mkdir(parents=True, exist_ok=True)
    for key, stems in split.items():
        (sets / f"{key}.txt").write_text("\n".join(stems) + "\n")
    return sets / "val.txt"


def write_yolo(folder: Path, split: str, frames: Iterable[Frame], classes: Sequence[str]) -> Path:
    """``images/<split>/*`` + ``labels/<split>/*.txt`` (class cx cy w h, normalised) + ``classes.txt``."""
    for name, image, boxes in frames:
        _save(folder / "images" / split / name, image)
        h, w = image.shape[:2]
        lines = [f"{classes.index(c)} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}"
                 for c, x, y, bw, bh in boxes]
        label = folder / "labels" / split / f"{Path(name).stem}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("\n".join(lines) + ("\n" if lines else ""))
    (folder / "classes.txt").write_text("\n".join(classes) + "\n")
    return folder / "images" / split
