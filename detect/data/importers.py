"""``defectkit data import``: foreign labels into the kit's normalised layout.

Classes are matched by NAME to the line spec and renumbered 1..K in its order; a class name the
spec does not know is an error listing every such name (or dropped with ``--drop-unknown``).
Images are copied (never moved) with unique file names; train/val are split right away.
"""
from __future__ import annotations

import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from edge_runtime.errors import ConfigError, DataError, UserInputError
from detect.linespec import LineSpec
from detect.settings import DataSettings

from .coco import Layout, box_annotation, make_coco, subset, write_coco
from .linefile import write_line_spec
from .readers import Record, pixel_format, read_coco, read_labelme, read_voc, read_yolo, yolo_class_names
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


def read_val_source(src_format: str, val_from: Path, classes: Sequence[str], records: list[Record],
                     images_dir: Path | None = None) -> tuple[list[Record], list[Record]]:
    """(train, val) records for a user's own split.

    ``val_from`` is either a second source in the same format (a COCO file or folder, a VOC, YOLO or LabelMe
    folder) holding the validation images, or a text file (``.txt``, e.g. VOC's ImageSets/Main/val.txt) that
    lists which images of the first source are validation images, one file name, path or stem per line."""
    val_from = Path(val_from)
    if not val_from.exists():
        raise UserInputError(f"import: --val-from '{val_from}' does not exist.")
    if val_from.is_file() and val_from.suffix.lower() == ".txt":
        wanted = [ln.strip() for ln in val_from.read_text(encoding="utf-8").splitlines() if ln.strip()]
        keys = {}
        for i, rec in enumerate(records):
            for key in (rec.image.name, rec.image.stem, str(rec.image)):
                keys.setdefault(key, set()).add(i)
        unknown = [w for w in wanted if w not in keys and Path(w).name not in keys]
        if unknown:
            raise DataError(f"import: {len(unknown)} name(s) in '{val_from}' match no image of the source: "
                            f"{', '.join(unknown[:5])}" + (" ..." if len(unknown) > 5 else "")
                            + ". List image file names or stems, one per line.")
        chosen = set().union(*(keys.get(w) or keys[Path(w).name] for w in wanted)) if wanted else set()
        val = [r for i, r in enumerate(records) if i in chosen]
        train = [r for i, r in enumerate(records) if i not in chosen]
    else:
        train, val = records, read_records(src_format, val_from, classes, images_dir)
    if not val:
        raise DataError(f"import: --val-from '{val_from}' gives no validation image.")
    if not train:
        raise DataError(f"import: every image is a validation image (--val-from '{val_from}'); nothing to train on.")
    return train, val


def split_warnings(train: list[dict], val: list[dict], anns: list[dict], classes: Sequence[str]) -> list[str]:
    """Classes that only one side of a user's split has, with the box counts per side."""
    side = {im["id"]: "train" for im in train} | {im["id"]: "val" for im in val}
    counts = {name: Counter() for name in classes}
    for a in anns:
        counts[classes[a["category_id"] - 1]][side[a["image_id"]]] += 1
    out = []
    for name, c in counts.items():
        if c["val"] and not c["train"]:
            out.append(f"class '{name}' is only in validation ({c['val']} box(es), 0 in training): the model cannot "
                       "learn it from this split")
        elif c["train"] and not c["val"]:
            out.append(f"class '{name}' is only in training ({c['train']} box(es), 0 in validation): its AP will "
                       "not be measured")
    return out


@dataclass
class PixelPlan:
    """What the import does to pixels: 16-bit images are scaled to 8 bits with one factor for the whole data set
    (its bit depth: 12-bit data in 16-bit files keeps its contrast), grayscale is kept and said so."""

    wide: set[Path] = field(default_factory=set)  # images with more than 8 bits per sample
    gray: int = 0  # single-channel 8-bit images (read as three equal channels by training and the box)
    bits: int = 8  # effective bit depth of the wide images (their largest value decides)
    peak: int = 0

    @property
    def scale(self) -> float:
        return 255.0 / (2 ** self.bits - 1)

    def messages(self) -> list[str]:
        out = []
        if self.wide:
            out.append(f"{len(self.wide)} image(s) have 16 bits per sample (largest value {self.peak}: {self.bits}-bit "
                       f"data): converted to 8 bits (value x 255/{2 ** self.bits - 1}, one factor for the whole data "
                       "set). The trainer and the edge box decode 8 bits (OpenCV keeps only the top 8 of 16, which "
                       "would train on nearly black images); feed the box frames converted the same way.")
        if self.gray:
            out.append(f"{self.gray} image(s) are single-channel grayscale: kept as they are; training and the edge "
                       "box read them as three equal channels.")
        return out

    def record(self) -> dict:
        return {"wide_images": len(self.wide), "bits": self.bits, "scale": round(self.scale, 6),
                "grayscale_images": self.gray} if (self.wide or self.gray) else {}


def plan_pixels(records: list[Record]) -> PixelPlan:
    """Read every image's pixel format; refuse what cannot be converted without a choice only the user can make."""
    import cv2

    plan = PixelPlan()
    floats = []
    for rec in records:
        fmt = pixel_format(rec.image)
        if fmt.kind == "float" or fmt.bits > 16:
            floats.append(f"{rec.image.name} ({fmt.bits}-bit {fmt.kind})")
        elif fmt.bits > 8:
            plan.wide.add(rec.image)
            img = cv2.imread(str(rec.image), cv2.IMREAD_UNCHANGED)
            if img is None:
                raise DataError(f"import: image '{rec.image}' cannot be decoded by OpenCV; fix or remove it.")
            plan.peak = max(plan.peak, int(img.max()))
        elif fmt.channels == 1:
            plan.gray += 1
    if floats:
        raise DataError(f"import: {len(floats)} image(s) store 32-bit or floating-point samples, e.g. "
                        f"{', '.join(floats[:3])}: there is no one right way to map them to the 8 bits the model reads."
                        " Convert them to 8- or 16-bit PNG with the scaling your camera uses, then import again.")
    if plan.wide:
        plan.bits = min(16, max(8, int(plan.peak).bit_length()))
    return plan


def copy_image(src: Path, dst: Path, plan: PixelPlan) -> None:
    """Copy one image into the layout, scaled to 8 bits when the plan says it is wider (same format, same name)."""
    if src not in plan.wide:
        shutil.copyfile(src, dst)
        return
    import cv2
    import numpy as np

    img = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)
    out = np.clip(np.round(img.astype(np.float32) * plan.scale), 0, 255).astype(np.uint8)
    if not cv2.imwrite(str(dst), out):
        raise DataError(f"import: could not write the 8-bit copy of '{src}' to '{dst}'.")


def _building_dir(out_dir: Path) -> Path:
    """A fresh temporary folder beside ``out_dir`` (same parent: relative paths from it are the same)."""
    import tempfile

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.importing-", dir=out_dir.parent))


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
    val_from: str | Path | None = None,
    image_size: int | None = None,
    model_size: str | None = None,
    pretrained: bool = True,
    warn=None,
) -> LineSpec:
    """Convert ``src`` into ``out_dir`` (images/, annotations/{all,train,val}.json, <line>.yaml).

    The split is the user's own when ``val_from`` is given (see :func:`read_val_source`), else stratified with
    ``val_fraction`` and ``seed`` when given, else the base spec's ``data`` section (the table's defaults
    without one). Without a base spec the line spec starts from the kit's shipped base model
    (:func:`detect.data.linefile.write_line_spec`). Everything is built in a folder beside ``out_dir`` and
    renamed at the end: a refused import leaves nothing behind."""
    data = base_spec.settings.data if base_spec is not None else DataSettings()
    val_fraction = data.val_fraction if val_fraction is None else val_fraction
    seed = data.split_seed if seed is None else seed
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserInputError(f"import: '{out_dir}' already exists and is not empty; choose a new folder.")
    classes = list(classes)
    images_dir = Path(images_dir) if images_dir else None
    records = read_records(src_format, Path(src), classes, images_dir)
    if not records:
        raise DataError(f"import: no images found in '{src}'.")
    n_train = len(records)
    if val_from is not None:
        train_recs, val_recs = read_val_source(src_format, Path(val_from), classes, records, images_dir)
        records, n_train = train_recs + val_recs, len(train_recs)
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
    warn = warn or (lambda message: print(message, file=sys.stderr))
    pixels = plan_pixels(records)
    build = _building_dir(out_dir)
    try:
        spec = _write_layout(build, out_dir, src_format, src, records, n_train, val_from is not None, classes,
                             val_fraction, seed, line, base_spec, image_size, model_size, pretrained, warn, pixels)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename needs the name free
        build.rename(out_dir)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return LineSpec.load(out_dir / spec.source.name)


def _write_layout(build: Path, out_dir: Path, src_format: str, src, records: list[Record], n_train: int,
                  own_split: bool, classes: list[str], val_fraction: float, seed: int, line, base_spec,
                  image_size, model_size, pretrained: bool, warn, pixels: PixelPlan) -> LineSpec:
    layout = Layout(build)
    for message in pixels.messages():
        warn(f"note: {message}")
    layout.images.mkdir(parents=True, exist_ok=True)
    cat_id = {name: i + 1 for i, name in enumerate(classes)}
    images, anns = [], []
    for i, (rec, name) in enumerate(zip(records, _unique_names(records)), start=1):
        copy_image(rec.image, layout.images / name, pixels)
        images.append({"id": i, "file_name": name, "width": rec.width, "height": rec.height})
        for cls, x, y, w, h in rec.boxes:
            if cls in cat_id:
                anns.append(box_annotation(len(anns) + 1, i, cat_id[cls], (x, y, w, h)))
    coco = make_coco(images, anns, classes, f"imported from {src_format} '{src}'")
    if pixels.record():
        coco["info"]["pixel_conversion"] = pixels.record()
    write_coco(layout.all, coco)
    if own_split:
        train_ids = {im["id"] for im in images[:n_train]}
        train = subset(coco, train_ids)
        val = subset(coco, [im["id"] for im in images[n_train:]])
        for message in split_warnings(train["images"], val["images"], anns, classes):
            warn(f"warning: {message}")
        write_coco(layout.train, train)
        write_coco(layout.val, val)
    elif len(images) >= 2:
        train, val = stratified_split(coco, val_fraction, seed)
        write_coco(layout.train, train)
        write_coco(layout.val, val)
    return write_line_spec(build, classes, line=line, base=base_spec, image_size=image_size,
                           model_size=model_size, pretrained=pretrained, final_dir=out_dir)
