"""A small COCO data set the kit "never generated", for tests of every stage.

It differs from ``synth`` output where real customer data differs: non-square images of mixed
sizes, PNG and JPG mixed, images without boxes, category ids starting at 11 and listed out of
order, ``.JPG`` upper-case suffixes. Boards come from ``board.py``; only the three surface defects
(scratch, dent, stain) are drawn here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_runtime.fileio import atomic_write_bytes

from .board import draw_board, fill_poly, render, stroke
from .coco import Layout, box_annotation, write_coco
from .linefile import write_line_spec
from .synth import encode_image

FOREIGN_CLASSES = ("scratch", "dent", "stain")
FOREIGN_IDS = {"scratch": 11, "dent": 12, "stain": 13}
_SIZES = ((352, 256), (256, 384), (416, 320), (320, 224))


def _blend(img: np.ndarray, mask: np.ndarray, colour, strength: float) -> None:
    a = (mask.astype(np.float32) / 255.0 * strength)[..., None]
    img[:] = np.clip(img * (1 - a) + np.asarray(colour, np.float32) * a, 0, 255).astype(np.uint8)


def _paint(img: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Draw one surface defect; returns its box [x, y, w, h]."""
    h, w = img.shape[:2]
    c = rng.uniform([30, 30], [w - 30, h - 30])
    mask = np.zeros((h, w), np.uint8)
    if kind == "scratch":
        ang, half = rng.uniform(0, np.pi), rng.uniform(10, 20)
        d = np.array([np.cos(ang), np.sin(ang)]) * half
        stroke(mask, c - d, c + d, rng.uniform(1.2, 2.2))
        _blend(img, mask, (235, 235, 235), 0.9)
        pts = np.array([c - d, c + d])
    elif kind == "dent":
        r = rng.uniform(6, 11)
        k = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        pts = c + np.stack([np.cos(k) * r * 1.3, np.sin(k) * r], axis=1)
        fill_poly(mask, pts)
        _blend(img, mask, (20, 25, 20), 0.7)
    else:
        r = rng.uniform(7, 12)
        k = np.sort(rng.uniform(0, 2 * np.pi, 10))
        pts = c + np.stack([np.cos(k), np.sin(k)], axis=1) * (r * rng.uniform(0.6, 1.0, 10))[:, None]
        fill_poly(mask, pts)
        _blend(img, mask, (40, 70, 110), 0.6)
    x0, y0 = pts.min(0) - 2
    x1, y1 = pts.max(0) + 2
    return (float(x0), float(y0), float(x1 - x0), float(y1 - y0))


def make_foreign_coco(out_dir: str | Path, count: int = 9, seed: int = 7) -> Path:
    """Write the foreign set (layout folders, COCO ids 11..13) and its line spec; returns the spec path."""
    out_dir = Path(out_dir)
    layout = Layout(out_dir)
    layout.images.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        w, h = _SIZES[i % len(_SIZES)]
        img = render(draw_board(rng, w, h), rng)
        image_id = 100 + i  # ids that do not start at 1 either
        boxes = [] if i % 4 == 2 else [FOREIGN_CLASSES[(i + j) % 3] for j in range(1 + i % 3)]
        for kind in boxes:
            anns.append(box_annotation(1000 + len(anns), image_id, FOREIGN_IDS[kind], _paint(img, kind, rng)))
        fmt, suffix = ("png", ".png") if i % 2 else ("jpg", ".JPG")
        name = f"cam{i % 2 + 1}_{i:04d}{suffix}"
        atomic_write_bytes(layout.images / name, encode_image(img, fmt))
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
    categories = [{"id": FOREIGN_IDS[n], "name": n, "supercategory": "surface"} for n in ("stain", "scratch", "dent")]
    coco = {"images": images, "annotations": anns, "categories": categories}
    write_coco(layout.all, coco)
    val_ids = {im["id"] for im in images[::3]}
    write_coco(layout.train, {**coco, "images": [im for im in images if im["id"] not in val_ids],
                              "annotations": [a for a in anns if a["image_id"] not in val_ids]})
    write_coco(layout.val, {**coco, "images": [im for im in images if im["id"] in val_ids],
                            "annotations": [a for a in anns if a["image_id"] in val_ids]})
    spec = write_line_spec(out_dir, FOREIGN_CLASSES, line="foreign-demo", image_size=320, model_size="tiny")
    return Path(spec.source)
