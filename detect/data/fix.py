"""``defectkit data check --fix OUT``: a repaired copy of a data set, never an edit in place.

Every change is listed with its reason in ``OUT/fix_report.json`` so a person can review what the
kit dropped or altered. Policy: drop images that are missing, unreadable or truncated (and their
boxes); correct recorded image sizes; clip boxes to the image and drop the ones left empty; drop
boxes of unknown images or categories; renumber duplicate ids; renumber categories 1..K in the line
spec's order (matched by name). The copy passes ``data check`` and is ready to train.
"""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from edge_runtime.errors import UserInputError
from edge_runtime.fileio import atomic_write_json
from detect.linespec import LineSpec
from detect.settings import DataSettings

from .check import CheckReport, check_dataset, inspect_image, parse_bbox
from .coco import Layout, box_annotation, load_coco, make_coco, write_coco
from .linefile import write_line_spec
from .split import stratified_split


@dataclass(frozen=True)
class Change:
    action: str  # drop_image | drop_annotation | clip_box | renumber_image | renumber_annotation | set_size | renumber_category
    record: str
    reason: str


@dataclass
class FixResult:
    out_dir: Path
    changes: list[Change] = field(default_factory=list)
    spec: LineSpec | None = None
    check: CheckReport | None = None

    @property
    def report_path(self) -> Path:
        return self.out_dir / "fix_report.json"


def _prepare_out(out_dir: Path, ann_path: Path, images_dir: Path) -> None:
    out = out_dir.resolve()
    if out in (ann_path.resolve().parent, ann_path.resolve().parent.parent, images_dir.resolve(), images_dir.resolve().parent):
        raise UserInputError(f"--fix OUT '{out_dir}' is the data set itself; choose a new folder (the original is never modified).")
    if out.exists() and any(out.iterdir()):
        raise UserInputError(f"--fix OUT '{out_dir}' is not empty; choose a new or empty folder.")


def _repair(coco: dict[str, Any], images_dir: Path, classes: Sequence[str], changes: list[Change]) -> tuple[list, list]:
    log = lambda action, record, reason: changes.append(Change(action, record, reason))  # noqa: E731
    new_cat = {name: i + 1 for i, name in enumerate(classes)}
    cat_name: dict[Any, str] = {}
    for c in coco["categories"]:
        cat_name.setdefault(c.get("id"), c.get("name"))
        if c.get("name") in new_cat and c.get("id") != new_cat[c.get("name")]:
            log("renumber_category", f"category {c.get('name')!r}", f"id {c.get('id')} -> {new_cat[c.get('name')]} (line-spec order)")
    images, kept_by_id, kept_by_name, dropped = [], {}, {}, set()
    next_id = max([im.get("id") for im in coco["images"] if isinstance(im.get("id"), int)] + [0]) + 1
    for im in coco["images"]:
        rec = f"image id={im.get('id')!r} file_name={im.get('file_name')!r}"
        name = im.get("file_name")
        if not isinstance(name, str) or not name:
            log("drop_image", rec, "no file_name")
            dropped.add(im.get("id"))
            continue
        if name in kept_by_name:
            log("drop_image", rec, f"duplicate of image id={kept_by_name[name]['id']} (same file); its boxes move there")
            kept_by_id.setdefault(im.get("id"), kept_by_name[name])
            continue
        status = inspect_image(images_dir / name)
        if status.state != "ok":
            log("drop_image", rec, f"{status.state}: {status.detail}")
            dropped.add(im.get("id"))
            continue
        new = {"id": im.get("id"), "file_name": name, "width": status.width, "height": status.height}
        if (im.get("width"), im.get("height")) != (status.width, status.height):
            log("set_size", rec, f"recorded {im.get('width')}x{im.get('height')}, file is {status.width}x{status.height}")
        if not isinstance(new["id"], int) or new["id"] in {i["id"] for i in images}:
            log("renumber_image", rec, f"duplicate or invalid id -> {next_id} (boxes with image_id {im.get('id')!r} stay with the first image)")
            new["id"], next_id = next_id, next_id + 1
        kept_by_id.setdefault(im.get("id"), new)
        kept_by_name[name] = new
        images.append(new)
    anns, seen_ann = [], set()
    next_ann = max([a.get("id") for a in coco["annotations"] if isinstance(a.get("id"), int)] + [0]) + 1
    for ann in coco["annotations"]:
        rec = f"annotation id={ann.get('id')!r} image id={ann.get('image_id')!r}"
        im = kept_by_id.get(ann.get("image_id"))
        if im is None:
            why = "its image was dropped" if ann.get("image_id") in dropped else "dangling: image_id is not in images"
            log("drop_annotation", rec, why)
            continue
        name = cat_name.get(ann.get("category_id"))
        if name is None or name not in new_cat:
            why = f"unknown category_id {ann.get('category_id')!r}" if name is None else f"class {name!r} is not in the line spec"
            log("drop_annotation", rec, why)
            continue
        box = parse_bbox(ann.get("bbox"))
        if box is None:
            log("drop_annotation", rec, f"bbox {ann.get('bbox')!r} is not four finite numbers")
            continue
        x, y, w, h = box
        if w <= 0 or h <= 0:
            log("drop_annotation", rec, f"bbox {list(box)} has non-positive size")
            continue
        x0, y0 = max(0.0, x), max(0.0, y)
        x1, y1 = min(float(im["width"]), x + w), min(float(im["height"]), y + h)
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            log("drop_annotation", rec, f"bbox {list(box)} is empty after clipping to {im['width']}x{im['height']}")
            continue
        clipped = (x0, y0, x1 - x0, y1 - y0)
        if max(abs(a - b) for a, b in zip(clipped, box)) > 1e-6:
            log("clip_box", rec, f"bbox {list(box)} -> {[round(v, 2) for v in clipped]} (inside {im['width']}x{im['height']})")
        ann_id = ann.get("id")
        if not isinstance(ann_id, int) or ann_id in seen_ann:
            log("renumber_annotation", rec, f"duplicate or invalid id -> {next_ann}")
            ann_id, next_ann = next_ann, next_ann + 1
        seen_ann.add(ann_id)
        anns.append(box_annotation(ann_id, im["id"], new_cat[name], clipped))
    return images, anns


def fix_dataset(
    ann_path: str | Path,
    images_dir: str | Path,
    classes: Sequence[str],
    out_dir: str | Path,
    spec: LineSpec | None = None,
    val_fraction: float = DataSettings.val_fraction,
    seed: int = DataSettings.split_seed,
    coco: dict[str, Any] | None = None,
) -> FixResult:
    """Write a repaired copy into ``out_dir`` (layout + line spec + fix_report.json) and check it."""
    ann_path, images_dir, out_dir = Path(ann_path), Path(images_dir), Path(out_dir)
    _prepare_out(out_dir, ann_path, images_dir)
    coco = coco if coco is not None else load_coco(ann_path)
    result = FixResult(out_dir)
    images, anns = _repair(coco, images_dir, list(classes), result.changes)
    if not images:
        raise UserInputError(f"--fix: no usable image left in '{ann_path}'; nothing to write.")
    layout = Layout(out_dir)
    for im in images:
        dst = layout.images / im["file_name"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(images_dir / im["file_name"], dst)
    fixed = make_coco(images, anns, classes, f"repaired copy of {ann_path}")
    write_coco(layout.all, fixed)
    if len(images) >= 2:
        train, val = stratified_split(fixed, val_fraction, seed)
        write_coco(layout.train, train)
        write_coco(layout.val, val)
    result.spec = write_line_spec(out_dir, classes, base=spec)
    atomic_write_json(result.report_path, {
        "source": str(ann_path.resolve()),
        "images_dir": str(images_dir.resolve()),
        "out": str(out_dir.resolve()),
        "kept": {"images": len(images), "annotations": len(anns)},
        "changes": [asdict(c) for c in result.changes],
    })
    result.check = check_dataset(layout.all, layout.images, classes)
    return result


def merged_coco(files: Sequence[Path]) -> dict[str, Any]:
    """Train and val files of a set without all.json, concatenated (fix renumbers what collides)."""
    out = load_coco(files[0])
    for f in files[1:]:
        other = load_coco(f)
        out["images"] = out["images"] + other["images"]
        out["annotations"] = out["annotations"] + other["annotations"]
    return out


def fix_dataset_target(target: str | Path, out_dir: str | Path) -> FixResult:
    """``data check --fix``: repair a copy of the data set a target points at (line spec, folder or COCO file);
    the split of the copy follows the spec's ``data`` section (the table's defaults without a spec)."""
    from .target import resolve_target

    t = resolve_target(target)
    data = t.spec.settings.data if t.spec is not None else DataSettings()
    coco = None if t.main_ann.name == "all.json" or len(t.ann_files) == 1 else merged_coco(t.ann_files)
    return fix_dataset(t.main_ann, t.images_dir, t.classes, out_dir, spec=t.spec, val_fraction=data.val_fraction,
                       seed=data.split_seed, coco=coco)
