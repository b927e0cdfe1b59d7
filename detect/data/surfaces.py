"""The surfaces corpus: a seeded, deliberately varied defect data set for a base model that transfers to any line.

Why: a base trained on PCBs alone knows copper and solder mask. A factory line may be brushed steel, wood,
fabric, glazed ceramic or moulded plastic, seen in colour or by a mono camera, in a 4:3 or a tall frame, under
uneven light. This corpus varies all of that (:mod:`surfaces_textures`, :mod:`surfaces_light`) and paints the
defect shapes most lines' defects are made of (:mod:`surfaces_defects`), with about a fifth of the parts
defect-free. Output is the kit's normalised layout (COCO through :mod:`detect.data.coco`, a stratified split)
plus a line spec, so ``train`` reads it like any line; ``surfaces.json`` lists what each frame is made of.

Deterministic: image ``i`` depends only on (seed, i), so the same recipe gives the same bytes anywhere.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_runtime.errors import ConfigError, UserInputError
from edge_runtime.fileio import atomic_write_bytes, atomic_write_json

from detect.linespec import LineSpec

from .coco import Layout, box_annotation, make_coco, write_coco
from .split import stratified_split
from .surfaces_defects import DRAWERS, SURFACE_CLASSES, Box, Mark
from .surfaces_light import light
from .surfaces_textures import FAMILIES, GLOSSY
from .synth import encode_image, plan_defects

# (width, height) of the frames: square, 4:3, 16:9 and tall (portrait) ones.
FRAME_SIZES: tuple[tuple[int, int], ...] = (
    (320, 320), (416, 416), (480, 360), (512, 384), (640, 480), (640, 360),
    (320, 448), (360, 480), (480, 640), (384, 512),
)
TEXTURE_SOURCES = (
    {"source": "procedural: numpy + OpenCV noise, weave, ring, knurl and grain generators in "
               "detect/data/surfaces_textures.py (no image files, no scikit-image, nothing from bench/)",
     "licence": "the kit's own code; the generated images carry no third-party licence"},
)


@dataclass(frozen=True)
class SurfaceRecipe:
    """Everything that decides the corpus (stored in ``surfaces.json`` and in the base model's provenance)."""

    count: int = 3000
    seed: int = 20261130  # no measuring line or test uses it
    defect_free_fraction: float = 0.2
    gray_fraction: float = 0.3  # frames from a mono camera (three equal channels)
    part_fraction: float = 0.4  # frames showing a part on a background (chips sit on its edge)
    val_fraction: float = 0.1
    image_format: str = "jpg"
    frame_sizes: tuple[tuple[int, int], ...] = FRAME_SIZES

    def check(self) -> None:
        if self.count < 2:
            raise ConfigError(f"surfaces corpus: count must be at least 2 (one train and one val image), "
                              f"got {self.count}.")
        for name in ("defect_free_fraction", "gray_fraction", "part_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"surfaces corpus: {name} must be in [0, 1), got {getattr(self, name)}.")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"surfaces corpus: val_fraction must be in (0, 1), got {self.val_fraction}.")
        if self.image_format not in ("jpg", "png"):
            raise ConfigError(f"surfaces corpus: image_format must be jpg or png, got '{self.image_format}'.")


@dataclass(frozen=True)
class Frame:
    """One rendered frame: pixels (uint8 BGR), its boxes and what it is made of."""

    image: np.ndarray
    boxes: list[tuple[str, Box]]
    meta: dict[str, Any]


def _part_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Anti-aliased mask of a part (rounded rectangle or ellipse) covering most of the frame."""
    mask = np.zeros((h, w), np.float32)
    cx, cy = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.4, 0.6)
    ax, ay = w * rng.uniform(0.28, 0.45), h * rng.uniform(0.28, 0.45)
    if rng.random() < 0.5:
        cv2.ellipse(mask, ((cx, cy), (2 * ax, 2 * ay), rng.uniform(-20, 20)), 1.0, -1, cv2.LINE_AA)
    else:
        r = int(min(ax, ay) * rng.uniform(0.05, 0.5))
        x0, y0, x1, y1 = int(cx - ax), int(cy - ay), int(cx + ax), int(cy + ay)
        cv2.rectangle(mask, (x0 + r, y0), (x1 - r, y1), 1.0, -1)
        cv2.rectangle(mask, (x0, y0 + r), (x1, y1 - r), 1.0, -1)
        for px, py in ((x0 + r, y0 + r), (x1 - r, y0 + r), (x0 + r, y1 - r), (x1 - r, y1 - r)):
            cv2.circle(mask, (px, py), r, 1.0, -1, cv2.LINE_AA)
    return cv2.GaussianBlur(mask, (0, 0), 0.8)  # soft edge (cv2 anti-aliases 8-bit images only)


def _edge_point(rng: np.random.Generator, mask: np.ndarray) -> tuple[int, int] | None:
    inside = (mask > 0.5).astype(np.uint8)
    edge = np.argwhere(inside - cv2.erode(inside, np.ones((3, 3), np.uint8)))
    if len(edge) == 0:
        return None
    y, x = edge[int(rng.integers(len(edge)))]
    return int(x), int(y)


def _overlaps(a: Box, b: Box, margin: float) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _draw(rng: np.random.Generator, name: str, h: int, w: int, s: float, mask: np.ndarray | None) -> Mark | None:
    """One candidate defect; on a part it must lie on the part (a chip: on its edge, cut by it)."""
    if name == "chip" and mask is not None:
        at = _edge_point(rng, mask)
        mark = DRAWERS["chip"](rng, h, w, s, edge=at) if at else None
        if mark is not None:
            ph, pw = mark.alpha.shape
            mark.alpha = mark.alpha * mask[mark.y:mark.y + ph, mark.x:mark.x + pw]
        return mark
    mark = DRAWERS[name](rng, h, w, s)
    if mark is not None and mask is not None:
        ph, pw = mark.alpha.shape
        on_part = mask[mark.y:mark.y + ph, mark.x:mark.x + pw]
        if float((mark.alpha * on_part).sum()) < 0.97 * float(mark.alpha.sum()):
            return None
    return mark


def render_frame(rng: np.random.Generator, recipe: SurfaceRecipe, wanted: list[str], attempts: int = 30) -> Frame:
    """Draw one frame: material (and maybe a part on a background), the wanted defects where they fit, light."""
    names = list(FAMILIES)
    w, h = recipe.frame_sizes[int(rng.integers(len(recipe.frame_sizes)))]
    family = names[int(rng.integers(len(names)))]
    gray = bool(rng.random() < recipe.gray_fraction)
    img = FAMILIES[family](rng, h, w).astype(np.float32)
    mask = under = None
    meta: dict[str, Any] = {"family": family, "gray": gray, "width": w, "height": h}
    if rng.random() < recipe.part_fraction:
        background = names[int(rng.integers(len(names)))]
        under = FAMILIES[background](rng, h, w) * rng.uniform(0.35, 0.8)
        mask = _part_mask(rng, h, w)
        shift = np.float32([[1, 0, rng.uniform(2, 8)], [0, 1, rng.uniform(2, 8)]])
        shadow = cv2.GaussianBlur(cv2.warpAffine(mask, shift, (w, h)), (0, 0), 4.0)
        ground = under * (1.0 - 0.5 * shadow[..., None])
        img = img * mask[..., None] + ground * (1.0 - mask[..., None])
        under = ground
        meta["background"] = background
    else:
        under = np.zeros_like(img)
    s = max(h, w) / 480.0
    placed: list[tuple[str, Box]] = []
    for name in wanted:
        for _ in range(attempts):
            mark = _draw(rng, name, h, w, s, mask)
            box = mark.box() if mark is not None else None
            if box is None or min(box[2] - box[0], box[3] - box[1]) < 2:
                continue
            if any(_overlaps(box, other, 3.0) for _, other in placed):
                continue
            mark.apply(img, under)
            placed.append((name, box))
            break
    img = light(img, rng, family in GLOSSY)
    out = (img * 255.0 + 0.5).astype(np.uint8)
    if gray:
        out = cv2.cvtColor(cv2.cvtColor(out, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    return Frame(out, placed, meta)


def _clear_previous(layout: Layout, line: str) -> None:
    """Remove frames of an earlier run of this generator; refuse a folder holding anything else."""
    if not layout.images.exists():
        return
    ours = re.compile(rf"^{re.escape(line)}_\d{{5}}\.(jpg|png)$")
    files = list(layout.images.iterdir())
    others = sorted(f.name for f in files if not ours.match(f.name))
    if others:
        raise UserInputError(f"surfaces corpus: '{layout.images}' already holds other files ({', '.join(others[:3])}"
                             "...); choose an empty or new folder (the generator never deletes data it did not write).")
    for f in files:
        f.unlink()


def generate_surfaces(out_dir: Path, recipe: SurfaceRecipe = SurfaceRecipe(), line: str = "surfaces",
                      image_size: int = 320, model_size: str = "tiny", progress: bool = True) -> LineSpec:
    """Write the corpus into ``out_dir`` (images, COCO all/train/val, ``surfaces.json``, ``<line>.yaml``)."""
    from dataclasses import replace

    from tqdm import tqdm

    recipe.check()
    out_dir = Path(out_dir)
    layout = Layout(out_dir)
    _clear_previous(layout, line)
    layout.images.mkdir(parents=True, exist_ok=True)
    plans = plan_defects(np.random.default_rng([recipe.seed, 0]), recipe.count, recipe.defect_free_fraction,
                         SURFACE_CLASSES)
    cat_id = {name: i + 1 for i, name in enumerate(SURFACE_CLASSES)}
    images, annotations, frames = [], [], []
    for i in tqdm(range(recipe.count), desc="surfaces", unit="img", disable=not progress):
        frame = render_frame(np.random.default_rng([recipe.seed, 1, i]), recipe, plans[i])
        file_name = f"{line}_{i:05d}.{recipe.image_format}"
        atomic_write_bytes(layout.images / file_name, encode_image(frame.image, recipe.image_format))
        h, w = frame.image.shape[:2]
        images.append({"id": i + 1, "file_name": file_name, "width": w, "height": h})
        for name, (x0, y0, x1, y1) in frame.boxes:
            annotations.append(box_annotation(len(annotations) + 1, i + 1, cat_id[name], (x0, y0, x1 - x0, y1 - y0)))
        frames.append({"file_name": file_name, **frame.meta, "defects": [n for n, _ in frame.boxes]})
    coco = make_coco(images, annotations, SURFACE_CLASSES, f"defectkit surfaces corpus seed={recipe.seed}")
    write_coco(layout.all, coco)
    train, val = stratified_split(coco, recipe.val_fraction, recipe.seed)
    write_coco(layout.train, train)
    write_coco(layout.val, val)
    atomic_write_json(out_dir / "surfaces.json", {"schema": "defectkit.surfaces-corpus/1", "recipe": asdict(recipe),
                                                  "classes": list(SURFACE_CLASSES), "families": list(FAMILIES),
                                                  "texture_sources": list(TEXTURE_SOURCES), "frames": frames})
    raw = {"line": line, "classes": list(SURFACE_CLASSES), "image_size": image_size, "model_size": model_size,
           "paths": {"root": "."}, "data": {"val_fraction": recipe.val_fraction, "split_seed": recipe.seed}}
    spec = LineSpec.from_dict(raw, out_dir.resolve(), where=f"surfaces corpus '{out_dir}'")
    path = spec.save(out_dir / f"{line}.yaml")
    return replace(spec, source=path.resolve())


def corpus_summary(out_dir: Path) -> dict[str, Any]:
    """Counts a reader wants before trusting the corpus: frames per family, grey, parts, empty, boxes per class."""
    import json
    from collections import Counter

    record = json.loads((Path(out_dir) / "surfaces.json").read_text())
    frames = record["frames"]
    return {"frames": len(frames),
            "families": dict(Counter(f["family"] for f in frames)),
            "gray": sum(f["gray"] for f in frames),
            "parts": sum("background" in f for f in frames),
            "empty": sum(not f["defects"] for f in frames),
            "sizes": dict(Counter(f"{f['width']}x{f['height']}" for f in frames)),
            "boxes": dict(Counter(d for f in frames for d in f["defects"]))}
