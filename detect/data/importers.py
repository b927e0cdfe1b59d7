"""``defectkit data import``: foreign labels into the kit's normalised layout.

Classes are matched by NAME to the line spec and renumbered 1..K in its order; a class name the
spec does not know is an error listing every such name (or dropped with ``--drop-unknown``).
Images are copied (never moved) with unique file names; train/val are split right away.
"""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Sequence

from edge_runtime.errors import ConfigError, DataError, UserInputError
from detect.linespec import LineSpec
from detect.settings import DataSettings

from .coco import Layout, box_annotation, make_coco, write_coco
from .linefile import write_line_spec
from .readers import Record, read_coco, read_labelme, read_voc, read_yolo, yolo_class_names
from .split import stratified_split

FORMATS = ("coco", "voc", "yolo", "labelme")


def resolve_classes(classes: str | None, spec: Path | None, src_format: str = "", src: Path | None = None
                    ) -> tuple[list[str], LineSpec | None]:
    """Classes in contract order from --classes or --spec (YOLO may fall back to its classes.txt)."""
    if classes and spec:
        raise UserInputError("give either --classes or --spec, not both.")
    if spec:
        base = LineSpec.load(spec)
        return list(base.classes), base
    if classes:
        names = [c.strip() for c in classes.split(",") if c.strip()]
        if not names or len(set(names)) != len(names):
            raise UserInputError(f"--classes '{classes}' must be distinct comma-separated names, e.g. --classes scratch,dent.")
        return names, None
    if src_format == "yolo" and src is not None and yolo_class_names(src):
        return yolo_class_names(src), None
    raise UserInputError("the classes of the line are needed: --classes a,b,c (in contract order) or --spec LINE.yaml.")


def read_records(src_format: str, src: Path, classes: Sequence[str], images_dir: Path | None = None) -> list[Record]:
    """Dispatch to the reader of one format."""
    src = Path(src)
    if not src.exists():
        raise UserInputError(f"import source '{src}' does not exist.")
    if src_format == "coco":
        return read_coco(src, images_dir)
    if src_format == "voc":
        return read_voc(src)
    if src_format == "yolo":
        return read_yolo(src, yolo_class_names(src) or list(classes))
    if src_format == "labelme":
        return read_labelme(src)
    raise ConfigError(f"unknown import format '{src_format}'; choose one of {', '.join(FORMATS)}.")


def _unique_names(records: list[Record]) -> list[str]:
    """Destination file names: the original name, made unique with a numeric suffix on collisions."""
    used: set[str] = set()
    out = []
    for rec in records:
        stem, suffix = rec.image.stem, rec.image.suffix.lower()
        name, k = f"{stem}{suffix}", 1
        while name.lower() in used:
            name, k = f"{stem}_{k}{suffix}", k + 1
        used.add(name.lower())
        out.append(name)
    return out


def import_dataset(
    src_format: str,
    src: str | Path,
    classes: Sequence[str],
    out_dir: str | Path,
    line: str | None = None,
    images_dir: str | Path | None = None,
    drop_unknown: bool = False,
    val_fraction: float | None = None,
    seed: int | None = None,
    base_spec: LineSpec | None = None,
) -> LineSpec:
    """Convert ``src`` into ``out_dir`` (images/, annotations/{all,train,val}.json, <line>.yaml).

    The split takes ``val_fraction`` and ``seed`` when given, else the base spec's ``data`` section (the table's
    defaults without one)."""
    data = base_spec.settings.data if base_spec is not None else DataSettings()
    val_fraction = data.val_fraction if val_fraction is None else val_fraction
    seed = data.split_seed if seed is None else seed
    out_dir = Path(out_dir)
    classes = list(classes)
    records = read_records(src_format, Path(src), classes, Path(images_dir) if images_dir else None)
    if not records:
        raise DataError(f"import: no images found in '{src}'.")
    missing = [str(r.image) for r in records if not r.image.is_file()]
    if missing:
        raise DataError(f"import: {len(missing)} image(s) listed in the labels do not exist: {', '.join(missing[:10])}"
                        + (" ..." if len(missing) > 10 else "") + ". Pass --images DIR or remove them from the labels.")
    unknown = Counter(name for r in records for name, *_ in r.boxes if name not in classes)
    if unknown and not drop_unknown:
        where = sorted({r.source for r in records for name, *_ in r.boxes if name in unknown})[:5]
        raise DataError(
            f"import: class name(s) not in the line's classes {classes}: "
            + ", ".join(f"'{n}' ({c} box(es))" for n, c in sorted(unknown.items()))
            + f", e.g. in {', '.join(where)}. Add them to --classes / the line spec, or pass --drop-unknown."
        )
    layout = Layout(out_dir)
    if layout.all.exists():
        raise UserInputError(f"import: '{out_dir}' already holds a data set ({layout.all}); choose a new folder.")
    layout.images.mkdir(parents=True, exist_ok=True)
    cat_id = {name: i + 1 for i, name in enumerate(classes)}
    images, anns = [], []
    for i, (rec, name) in enumerate(zip(records, _unique_names(records)), start=1):
        shutil.copyfile(rec.image, layout.images / name)
        images.append({"id": i, "file_name": name, "width": rec.width, "height": rec.height})
        for cls, x, y, w, h in rec.boxes:
            if cls in cat_id:
                anns.append(box_annotation(len(anns) + 1, i, cat_id[cls], (x, y, w, h)))
    coco = make_coco(images, anns, classes, f"imported from {src_format} '{src}'")
    write_coco(layout.all, coco)
    if len(images) >= 2:
        train, val = stratified_split(coco, val_fraction, seed)
        write_coco(layout.train, train)
        write_coco(layout.val, val)
    return write_line_spec(out_dir, classes, line=line, base=base_spec)
