"""Hard examples out of the collector, into a labelling tool, back into a retrain.

``export_hard_examples`` writes a data folder in the kit's layout (``images/`` + ``annotations/all.json``)
holding the line's hard examples with the model's own detections as *pre-labels*: a labeller corrects boxes
and classes (and adds a new defect class) instead of drawing everything. The COCO ``info`` says
``"reviewed": false``; ``defectkit retrain --add`` refuses such a file, because training on unreviewed model
output teaches the model its own mistakes. A labelling tool's re-export (or setting the flag) clears it.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from edge_runtime.errors import UserInputError
from edge_runtime.fileio import atomic_write_json
from edge_runtime.hard_examples import PRELABEL_SOURCE
from fleet.db import Conn


@dataclass
class Export:
    root: Path
    images: int
    boxes: int
    classes: list
    skipped: int = 0  # stored images that do not decode (sent before the collector decode-checked them)


def export_hard_examples(conn: Conn, *, line: str, out: Path, classes: Sequence[str] = (),
                         min_score: float = 0.3, limit: int = 10_000, device: Optional[str] = None) -> Export:
    """Write ``out/images/<id>.jpg`` and ``out/annotations/all.json`` (pre-labels: detections >= ``min_score``).

    ``classes``: the line's classes in contract order (categories 1..K); classes met in detections but not
    listed are appended. ``out`` must not exist yet: an export never overwrites labelling work."""
    from fleet import store

    out = Path(out)
    if out.exists():
        raise UserInputError(f"{out} already exists: an export never overwrites labelling work. Choose a new --out.")
    rows = store.list_hard_examples(conn, line=line, device=device, limit=limit)
    if not rows:
        raise UserInputError(f"the collector holds no hard examples of line '{line}'"
                             f"{f' from device {device}' if device else ''}; nothing to export.")
    names = list(dict.fromkeys([*classes, *(d["class"] for r in rows for d in r["detections"] if _usable(d))]))
    cat = {n: i + 1 for i, n in enumerate(names)}
    images_dir = out / "images"
    images_dir.mkdir(parents=True)
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for r in sorted(rows, key=lambda r: (r["time"], r["id"])):
        src = Path(r["image_path"])
        if not src.is_file():
            continue  # a pruned or lost image: its metadata alone cannot be labelled
        name = f"{r['id']}{src.suffix or '.jpg'}"
        shutil.copyfile(src, images_dir / name)
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": name, "width": r.get("width"), "height": r.get("height"),
                       "device_id": r["device_id"], "bundle_version": r["bundle_version"], "time": r["time"]})
        for d in r["detections"]:
            if not _usable(d) or d["score"] < min_score:
                continue  # a row stored before the collector checked boxes: skipped, not the whole export
            x1, y1, x2, y2 = d["box"]
            w, h = x2 - x1, y2 - y1
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat[d["class"]],
                         "bbox": [round(x1, 2), round(y1, 2), round(w, 2), round(h, 2)], "area": round(w * h, 2),
                         "iscrowd": 0, "score": round(float(d["score"]), 4)})
    bad = _fill_sizes(images, images_dir)
    if bad:
        for im in images:
            if im["id"] in bad:
                (images_dir / im["file_name"]).unlink()
        images = [im for im in images if im["id"] not in bad]
        anns = [a for a in anns if a["image_id"] not in bad]
    coco = {"info": {"description": PRELABEL_SOURCE, "line": line, "reviewed": False,
                     "note": "model pre-labels: correct every box and class, then re-export from the labelling "
                             "tool or set info.reviewed to true"},
            "licenses": [], "images": images, "annotations": anns,
            "categories": [{"id": i, "name": n, "supercategory": "defect"} for n, i in cat.items()]}
    atomic_write_json(out / "annotations" / "all.json", coco, indent=None)
    return Export(out, len(images), len(anns), names, skipped=len(bad))


def _usable(d: Any) -> bool:
    box = d.get("box") if isinstance(d, dict) else None
    return (isinstance(d.get("score"), (int, float)) and isinstance(d.get("class"), str) and isinstance(box, list)
            and len(box) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
            and box[0] <= box[2] and box[1] <= box[3])


def _fill_sizes(images: list[dict[str, Any]], images_dir: Path) -> set:
    """Image sizes from the files (COCO needs width and height); returns the ids of images that do not decode."""
    import cv2

    bad = set()
    for im in images:
        img = cv2.imread(str(images_dir / im["file_name"]), cv2.IMREAD_COLOR)
        if img is None:
            bad.add(im["id"])
        elif not im.get("width") or not im.get("height"):
            im["height"], im["width"] = int(img.shape[0]), int(img.shape[1])
    return bad

