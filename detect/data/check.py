"""``defectkit data check``: find every fault of a COCO data set at once.

Why all at once: a factory data set is fixed by a person, and one fault per run wastes their day.
Each :class:`Fault` names the kind, the file, the record (image id, annotation id, file name) and
what is wrong. Training calls :func:`check_dataset` first and refuses bad data with the report
(:meth:`CheckReport.raise_if_faulty`). Images are really decoded, so a truncated JPEG is caught
here and not as a hang in the training data loader.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import cv2

from detect.settings import DataSettings
from edge_runtime.errors import DataError

from .coco import class_names, load_coco
from .target import resolve_target



@dataclass(frozen=True)
class Fault:
    kind: str
    file: str
    record: str
    message: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.file}: {self.record}: {self.message}"


@dataclass
class CheckReport:
    files: list[str]
    faults: list[Fault] = field(default_factory=list)
    images: int = 0
    annotations: int = 0
    classes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.faults

    def kinds(self) -> Counter:
        return Counter(f.kind for f in self.faults)

    def format(self) -> str:
        head = f"checked {', '.join(self.files)}: {self.images} image(s), {self.annotations} box(es)"
        if self.ok:
            return "\n".join([head + ": no faults.", *self.notes])
        kinds = ", ".join(f"{k} x{n}" for k, n in sorted(self.kinds().items()))
        lines = [f"{head}: {len(self.faults)} fault(s) ({kinds})"]
        lines += [f"  {f}" for f in self.faults]
        lines += self.notes
        lines.append("Repair a copy with `defectkit data check TARGET --fix OUT` (the original is left untouched).")
        return "\n".join(lines)

    def raise_if_faulty(self) -> None:
        """For training: refuse data with faults, naming every one of them."""
        if not self.ok:
            raise DataError(self.format())


@dataclass(frozen=True)
class ImageStatus:
    state: str  # ok | missing | unreadable | truncated
    width: int = 0
    height: int = 0
    detail: str = ""


@lru_cache(maxsize=4096)
def _inspect_cached(path: str, mtime_ns: int, size: int) -> ImageStatus:
    from PIL import Image

    with open(path, "rb") as fh:
        data = fh.read()
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        return ImageStatus("unreadable", detail="OpenCV cannot decode it (not an image, or corrupt)")
    h, w = img.shape[:2]
    head = data[:8]
    if head.startswith(b"\xff\xd8") and b"\xff\xd9" not in data[-64:]:
        return ImageStatus("truncated", w, h, "JPEG end-of-image marker missing: the file was cut short")
    if head.startswith(b"\x89PNG") and b"IEND" not in data[-16:]:
        return ImageStatus("truncated", w, h, "PNG IEND chunk missing: the file was cut short")
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as exc:  # PIL raises OSError/SyntaxError/ValueError for broken files
        return ImageStatus("truncated", w, h, f"decoding failed: {exc}")
    return ImageStatus("ok", w, h)


def inspect_image(path: Path) -> ImageStatus:
    """Decode an image fully (cached by path, mtime and size)."""
    try:
        st = path.stat()
    except OSError:
        return ImageStatus("missing", detail="file does not exist")
    if not path.is_file():
        return ImageStatus("missing", detail="not a file")
    return _inspect_cached(str(path), st.st_mtime_ns, st.st_size)


def _image_rec(im: dict) -> str:
    return f"image id={im.get('id')!r} file_name={im.get('file_name')!r}"


def _ann_rec(ann: dict, file_of: dict) -> str:
    return f"annotation id={ann.get('id')!r} image id={ann.get('image_id')!r} file_name={file_of.get(ann.get('image_id'))!r}"


def parse_bbox(bbox: Any) -> tuple[float, float, float, float] | None:
    """Four finite numbers, or None."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    try:
        vals = tuple(float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    return vals if all(math.isfinite(v) for v in vals) else None


def image_size(im: dict, status: ImageStatus) -> tuple[float, float]:
    """The size boxes are checked against: the decoded one when the file could be read."""
    if status.state in ("ok", "truncated") and status.width:
        return float(status.width), float(status.height)
    return float(im.get("width") or 0), float(im.get("height") or 0)


def check_coco(coco: dict, file: str, images_dir: Path, classes: Sequence[str] | None,
               box_tolerance_px: float = DataSettings.box_tolerance_px) -> CheckReport:
    """Check one COCO dict (already loaded) whose images live in ``images_dir``; a box may stick out of its
    image by ``box_tolerance_px`` (``data.box_tolerance_px``) before it is a fault."""
    rep = CheckReport([file], images=len(coco["images"]), annotations=len(coco["annotations"]),
                      classes=list(classes or class_names(coco)))
    add = lambda kind, record, msg: rep.faults.append(Fault(kind, file, record, msg))  # noqa: E731
    cat_ids = Counter(c.get("id") for c in coco["categories"])
    for cid, n in cat_ids.items():
        if n > 1:
            add("duplicate_category_id", f"category id={cid!r}", f"{n} categories share this id")
    names = [c.get("name") for c in coco["categories"]]
    if classes is not None:
        extra = [n for n in names if n not in classes]
        missing = [c for c in classes if c not in names]
        if extra or missing:
            add("class_mismatch", "categories",
                f"category names do not match the line spec {list(classes)}: "
                + "; ".join(s for s in (f"not in the spec: {extra}" if extra else "",
                                        f"missing: {missing}" if missing else "") if s))
        elif names != list(classes):
            rep.notes.append(f"note: {file}: categories are in another order than the line spec; they are matched by name.")
    id_counts = Counter(im.get("id") for im in coco["images"])
    name_counts = Counter(im.get("file_name") for im in coco["images"])
    file_of = {im.get("id"): im.get("file_name") for im in coco["images"]}
    statuses: dict[Any, ImageStatus] = {}
    for im in coco["images"]:
        rec = _image_rec(im)
        if id_counts[im.get("id")] > 1:
            add("duplicate_image_id", rec, f"{id_counts[im.get('id')]} images share id {im.get('id')!r}")
        if im.get("file_name") and name_counts[im.get("file_name")] > 1:
            add("duplicate_file_name", rec, f"{name_counts[im.get('file_name')]} images share this file name")
        if not isinstance(im.get("file_name"), str) or not im.get("file_name"):
            add("bad_image_record", rec, "no file_name")
            continue
        status = inspect_image(images_dir / im["file_name"])
        statuses.setdefault(im.get("id"), status)
        if status.state == "missing":
            add("missing_image", rec, f"listed but not found at {images_dir / im['file_name']}")
        elif status.state in ("unreadable", "truncated"):
            add(f"{status.state}_image", rec, status.detail)
        if status.width and (im.get("width"), im.get("height")) != (status.width, status.height):
            add("size_mismatch", rec, f"record says {im.get('width')}x{im.get('height')}, file is {status.width}x{status.height}")
    ann_counts = Counter(a.get("id") for a in coco["annotations"])
    images_by_id = {im.get("id"): im for im in coco["images"]}
    for ann in coco["annotations"]:
        rec = _ann_rec(ann, file_of)
        if ann_counts[ann.get("id")] > 1:
            add("duplicate_annotation_id", rec, f"{ann_counts[ann.get('id')]} annotations share id {ann.get('id')!r}")
        if ann.get("category_id") not in cat_ids:
            add("unknown_category", rec, f"category_id {ann.get('category_id')!r} is not in categories {sorted(cat_ids, key=str)}")
        im = images_by_id.get(ann.get("image_id"))
        if im is None:
            add("dangling_annotation", rec, f"image_id {ann.get('image_id')!r} is not in images")
            continue
        box = parse_bbox(ann.get("bbox"))
        if box is None:
            add("bad_bbox", rec, f"bbox {ann.get('bbox')!r} is not four finite numbers [x, y, w, h]")
            continue
        x, y, w, h = box
        if w <= 0 or h <= 0:
            add("box_non_positive", rec, f"bbox {list(box)} has width or height <= 0")
            continue
        W, H = image_size(im, statuses.get(im.get("id"), ImageStatus("missing")))
        t = box_tolerance_px
        if W and H and (x < -t or y < -t or x + w > W + t or y + h > H + t):
            add("box_out_of_bounds", rec, f"bbox {list(box)} reaches outside the {W:g}x{H:g} image")
    return rep


def check_dataset(ann_path: str | Path, images_dir: str | Path, classes: Sequence[str] | None = None,
                  box_tolerance_px: float = DataSettings.box_tolerance_px) -> CheckReport:
    """Check one COCO file; ``classes`` (line-spec order) also checks the category names."""
    ann_path = Path(ann_path)
    try:
        coco = load_coco(ann_path)
    except DataError as exc:
        return CheckReport([str(ann_path)], [Fault("bad_json", str(ann_path), "file", str(exc))])
    return check_coco(coco, str(ann_path), Path(images_dir), classes, box_tolerance_px)


def check_target(target: str | Path) -> CheckReport:
    """Check every annotation file of a line spec / data set folder / COCO file; one merged report."""
    t = resolve_target(target)
    classes = t.classes if t.spec is not None else None
    data = t.spec.settings.data if t.spec is not None else DataSettings()
    merged = CheckReport([])
    for ann in t.ann_files:
        rep = check_dataset(ann, t.images_dir, classes, data.box_tolerance_px)
        merged.files += rep.files
        merged.faults += rep.faults
        merged.notes += rep.notes
        merged.images = max(merged.images, rep.images)
        merged.annotations = max(merged.annotations, rep.annotations)
    merged.classes = list(t.classes)
    return merged
