"""Readers of foreign label formats into one neutral form: a list of :class:`Record`.

COCO JSON, Pascal VOC XML, YOLO txt and LabelMe JSON each become records (image path, size, boxes
with class NAMES); ``importers.py`` then maps names to the line spec and writes the kit's layout.
Coordinates are converted to COCO pixels [x, y, w, h] here and nowhere else.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml

from edge_runtime.errors import DataError

from .coco import IMAGE_SUFFIXES, load_coco


@dataclass
class Record:
    image: Path
    width: int
    height: int
    boxes: list[tuple[str, float, float, float, float]] = field(default_factory=list)
    source: str = ""  # label file the record came from (for error messages)


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception as exc:
        raise DataError(f"image '{path}' cannot be opened ({exc}); fix or remove it before importing.") from exc


@dataclass(frozen=True)
class PixelFormat:
    """Bits per sample, channels and sample kind of an image file, read from its header where possible."""

    bits: int
    channels: int
    kind: str = "uint"  # uint | float


_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # IHDR colour type -> channels (3: palette, decoded to RGB)


def pixel_format(path: Path) -> PixelFormat:
    """How an image stores its pixels. PNG from its IHDR chunk (PIL reports a 16-bit RGB PNG as 8-bit RGB),
    TIFF by decoding it (any depth and sample kind occurs), JPEG/BMP are 8-bit (only the channel count is read).
    The trainer and the edge box decode with OpenCV's IMREAD_COLOR, which keeps only the top 8 bits of a
    16-bit image: the import must know."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".png":
        with open(path, "rb") as fh:
            head = fh.read(26)
        if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
            return PixelFormat(max(8, head[24]), _PNG_CHANNELS.get(head[25], 3))
    if suffix in (".tif", ".tiff"):
        import cv2
        import numpy as np

        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise DataError(f"image '{path}' cannot be decoded by OpenCV; fix or remove it before importing.")
        kind = "float" if np.issubdtype(img.dtype, np.floating) else "uint"
        return PixelFormat(max(8, img.dtype.itemsize * 8), 1 if img.ndim == 2 else img.shape[2], kind)
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = im.mode
    except Exception as exc:
        raise DataError(f"image '{path}' cannot be opened ({exc}); fix or remove it before importing.") from exc
    if mode.startswith("I;16"):
        return PixelFormat(16, 1)
    if mode in ("I", "F"):
        return PixelFormat(32, 1, "float" if mode == "F" else "uint")
    return PixelFormat(8, {"L": 1, "1": 1, "LA": 2, "RGBA": 4}.get(mode, 3))


def _find_image(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES + tuple(s.upper() for s in IMAGE_SUFFIXES):
        p = folder / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def read_coco(src: Path, images_dir: Path | None = None) -> list[Record]:
    """A COCO JSON file (or a folder holding exactly one, or annotations/*.json)."""
    if src.is_dir():
        found = sorted(src.glob("*.json")) or sorted((src / "annotations").glob("*.json"))
        if len(found) != 1:
            raise DataError(f"COCO import: found {len(found)} JSON files in '{src}'; pass the annotation file itself.")
        src = found[0]
    coco = load_coco(src)
    if images_dir is None:
        for cand in (src.parent / "images", src.parent.parent / "images", src.parent):
            if cand.is_dir():
                images_dir = cand
                break
    names = {c.get("id"): c.get("name") for c in coco["categories"]}
    by_image: dict = {}
    for ann in coco["annotations"]:
        if ann.get("category_id") not in names:
            raise DataError(f"COCO import '{src}': annotation id={ann.get('id')!r} has category_id "
                            f"{ann.get('category_id')!r}, which is not in categories {sorted(names, key=str)}.")
        x, y, w, h = (float(v) for v in ann["bbox"])
        by_image.setdefault(ann.get("image_id"), []).append((names[ann["category_id"]], x, y, w, h))
    records = []
    for im in coco["images"]:
        path = images_dir / im["file_name"]
        w, h = im.get("width"), im.get("height")
        if not (w and h) and path.is_file():
            w, h = _image_size(path)
        records.append(Record(path, int(w or 0), int(h or 0), by_image.get(im["id"], []), str(src)))
    return records


def read_voc(src: Path) -> list[Record]:
    """Pascal VOC: ``Annotations/*.xml`` + ``JPEGImages/`` (or XML and images in one folder).

    VOC boxes are 1-based inclusive pixel indices: x = xmin - 1, w = xmax - xmin + 1.
    """
    ann_dir = src / "Annotations" if (src / "Annotations").is_dir() else src
    img_dirs = [d for d in (src / "JPEGImages", src / "images", ann_dir, src) if d.is_dir()]
    xmls = sorted(ann_dir.glob("*.xml"))
    if not xmls:
        raise DataError(f"VOC import: no .xml files in '{ann_dir}'.")
    records = []
    for xml in xmls:
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError as exc:
            raise DataError(f"VOC import: '{xml}' is not valid XML: {exc}") from exc
        filename = (root.findtext("filename") or "").strip()
        image = next((d / filename for d in img_dirs if filename and (d / filename).is_file()), None)
        image = image or next((p for d in img_dirs if (p := _find_image(d, xml.stem))), None)
        if image is None:
            raise DataError(f"VOC import: no image for '{xml}' (filename '{filename}') in {[str(d) for d in img_dirs]}.")
        size = root.find("size")
        try:
            w, h = int(float(size.findtext("width"))), int(float(size.findtext("height")))
        except (AttributeError, TypeError, ValueError):
            w, h = _image_size(image)
        boxes = []
        for i, obj in enumerate(root.iter("object")):
            bb = obj.find("bndbox")
            try:
                x0, y0, x1, y1 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            except (AttributeError, TypeError, ValueError) as exc:
                raise DataError(f"VOC import: '{xml}' object #{i + 1} has no valid bndbox.") from exc
            boxes.append(((obj.findtext("name") or "").strip(), x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1))
        records.append(Record(image, w, h, boxes, str(xml)))
    return records


def yolo_class_names(src: Path) -> list[str] | None:
    """Class names shipped with a YOLO folder: classes.txt, or data.yaml / dataset.yaml ``names``."""
    for txt in (src / "classes.txt", src / "labels" / "classes.txt"):
        if txt.is_file():
            return [line.strip() for line in txt.read_text(encoding="utf-8").splitlines() if line.strip()]
    for name in ("data.yaml", "dataset.yaml"):
        if (src / name).is_file():
            names = (yaml.safe_load((src / name).read_text(encoding="utf-8")) or {}).get("names")
            if isinstance(names, dict):
                return [names[k] for k in sorted(names, key=int)]
            if isinstance(names, list):
                return [str(n) for n in names]
    return None


def read_yolo(src: Path, index_names: Sequence[str]) -> list[Record]:
    """YOLO: ``images/**`` + ``labels/**`` (same relative path, .txt) with ``cls cx cy w h`` normalised; or
    one split, ``<root>/images/<split>`` with its labels in ``<root>/labels/<split>``."""
    img_root = src / "images" if (src / "images").is_dir() else src
    lbl_root = src / "labels" if (src / "labels").is_dir() else img_root
    # one split of a YOLO folder given directly (images/val): its labels are in labels/val
    if src.parent.name == "images" and (src.parent.parent / "labels" / src.name).is_dir():
        lbl_root = src.parent.parent / "labels" / src.name
    images = sorted(p for p in img_root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"YOLO import: no images under '{img_root}'.")
    records = []
    for image in images:
        label = (lbl_root / image.relative_to(img_root)).with_suffix(".txt")
        w, h = _image_size(image)
        boxes = []
        if label.is_file():
            for n, line in enumerate(label.read_text(encoding="utf-8").splitlines(), 1):
                parts = line.split()
                if not parts:
                    continue
                try:
                    cls, vals = int(parts[0]), [float(v) for v in parts[1:]]
                    if len(vals) != 4 and (len(vals) < 6 or len(vals) % 2):
                        raise ValueError
                except ValueError as exc:
                    raise DataError(f"YOLO import: '{label}' line {n}: expected 'class cx cy w h' (or a class and "
                                    f"polygon x y pairs), got '{line}'.") from exc
                if not 0 <= cls < len(index_names):
                    raise DataError(f"YOLO import: '{label}' line {n}: class index {cls} but only "
                                    f"{len(index_names)} class names {list(index_names)}.")
                if len(vals) == 4:
                    cx, cy, bw, bh = vals
                else:  # YOLO segmentation polygon: its bounding box
                    xs, ys = vals[0::2], vals[1::2]
                    cx, cy, bw, bh = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)
                boxes.append((index_names[cls], (cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h))
        records.append(Record(image, w, h, boxes, str(label)))
    return records


def read_labelme(src: Path) -> list[Record]:
    """LabelMe JSON: rectangles as they are, polygons/circles as their bounding box."""
    files = sorted(src.rglob("*.json"))
    if not files:
        raise DataError(f"LabelMe import: no .json files under '{src}'.")
    records = []
    for f in files:
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"LabelMe import: '{f}' is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict) or "shapes" not in doc:
            raise DataError(f"LabelMe import: '{f}' has no 'shapes'; is it a LabelMe file?")
        image = f.parent / str(doc.get("imagePath") or "")
        if not image.is_file():
            image = _find_image(f.parent, f.stem)
        if image is None:
            raise DataError(f"LabelMe import: no image for '{f}' (imagePath '{doc.get('imagePath')}').")
        w, h = doc.get("imageWidth"), doc.get("imageHeight")
        if not (w and h):
            w, h = _image_size(image)
        boxes = []
        for i, shape in enumerate(doc["shapes"]):
            kind = shape.get("shape_type") or "polygon"
            pts = [(float(x), float(y)) for x, y in shape.get("points", [])]
            if kind == "circle" and len(pts) == 2:
                (cx, cy), (px, py) = pts
                r = ((px - cx) ** 2 + (py - cy) ** 2) ** 0.5
                pts = [(cx - r, cy - r), (cx + r, cy + r)]
            elif kind not in ("rectangle", "polygon") or len(pts) < 2:
                raise DataError(f"LabelMe import: '{f}' shape #{i + 1} ({kind}, label '{shape.get('label')}') "
                                "is not a box; use rectangle, polygon or circle shapes.")
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            boxes.append((str(shape.get("label", "")).strip(), min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)))
        records.append(Record(image, int(w), int(h), boxes, str(f)))
    return records
