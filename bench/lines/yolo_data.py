"""The YOLO arm's data set, written from the kit's imported layout: the same images (after the import's pixel
conversion), the same train/val split, the same boxes.

Images are hard-linked (copied across file systems) into ``images/{train,val}``; labels are YOLO txt.
Returns the data YAML and the map from val image path to its COCO image id (to score YOLO's detections with
the same annotations file as the kit's).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_yolo_dataset(layout_root: Path, out: Path) -> tuple[Path, dict[str, int]]:
    """``out/images/{train,val}``, ``out/labels/{train,val}``, ``out/data.yaml``; (yaml path, val map)."""
    val_map: dict[str, int] = {}
    names: list[str] = []
    for split in ("train", "val"):
        coco = json.loads((layout_root / "annotations" / f"{split}.json").read_text())
        names = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        boxes: dict[int, list[str]] = {im["id"]: [] for im in coco["images"]}
        size = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
        for a in coco["annotations"]:
            w, h = size[a["image_id"]]
            x, y, bw, bh = a["bbox"]
            boxes[a["image_id"]].append(f"{a['category_id'] - 1} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} "
                                        f"{bw / w:.6f} {bh / h:.6f}")
        for im in coco["images"]:
            dst = out / "images" / split / im["file_name"]
            _link(layout_root / "images" / im["file_name"], dst)
            (out / "labels" / split / f"{Path(im['file_name']).stem}.txt").write_text(
                "\n".join(boxes[im["id"]]) + ("\n" if boxes[im["id"]] else ""))
            if split == "val":
                val_map[str(dst)] = im["id"]
    data = out / "data.yaml"
    data.write_text(json.dumps({"path": str(out), "train": "images/train", "val": "images/val",
                                "names": {i: n for i, n in enumerate(names)}}))  # JSON is YAML
    return data, val_map
