"""Line (a) "stone": real photographs (scikit-image's bundled brick, gravel and grass, CC0) as colour panels.

Why photographs: a synthetic base can learn the look of its own generator; real texture statistics are the honest
test. The three grey 512x512 photographs are mirrored into a 1024 canvas, rotated, flipped, cropped at a random
zoom to 640x480 and tinted with a per-frame material colour, so a few hundred frames differ. Defects drawn on top:
crack (a drifting dark path), pinhole (a lit pit), stain (a soft irregular blob of another colour).
Written as COCO: ``train/annotations.json`` and ``val/annotations.json``, JPEG images.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .draw import blend_blob, darken_path, pit, random_walk
from .writers import write_coco

CLASSES = ["crack", "pinhole", "stain"]
SIZE = (640, 480)  # width, height
# (photograph, dark colour, light colour) in BGR, jittered per frame
MATERIALS = [("brick", (40, 50, 110), (150, 170, 215)), ("gravel", (60, 70, 80), (190, 200, 205)),
             ("grass", (30, 70, 40), (120, 190, 150))]


def _photos() -> dict[str, np.ndarray]:
    from skimage import data

    return {name: getattr(data, name)().astype(np.float32) / 255.0 for name, *_ in MATERIALS}


def _surface(rng: np.random.Generator, photos: dict[str, np.ndarray]) -> np.ndarray:
    name, dark, light = MATERIALS[rng.integers(len(MATERIALS))]
    g = photos[name]
    canvas = np.block([[g, g[:, ::-1]], [g[::-1, :], g[::-1, ::-1]]])
    canvas = np.rot90(canvas, rng.integers(4))
    if rng.random() < 0.5:
        canvas = canvas[:, ::-1]
    zoom = rng.uniform(0.5, 1.0)
    cw, ch = int(SIZE[0] * zoom * 1.5), int(SIZE[1] * zoom * 1.5)
    x0, y0 = rng.integers(0, canvas.shape[1] - cw), rng.integers(0, canvas.shape[0] - ch)
    crop = cv2.resize(np.ascontiguousarray(canvas[y0:y0 + ch, x0:x0 + cw]), SIZE, interpolation=cv2.INTER_LINEAR)
    gamma = rng.uniform(0.75, 1.35)
    crop = np.clip(crop, 0, 1) ** gamma
    d = np.array(dark, np.float32) + rng.normal(0, 12, 3)
    li = np.array(light, np.float32) + rng.normal(0, 12, 3)
    img = d + crop[..., None] * (li - d)
    yy, xx = np.mgrid[0:SIZE[1], 0:SIZE[0]].astype(np.float32)  # uneven lighting across the panel
    cx, cy = rng.uniform(0, SIZE[0]), rng.uniform(0, SIZE[1])
    light_falloff = 1 - rng.uniform(0.05, 0.3) * (((xx - cx) / SIZE[0]) ** 2 + ((yy - cy) / SIZE[1]) ** 2)
    return img * light_falloff[..., None]


def _defect(rng: np.random.Generator, img: np.ndarray, cls: str):
    h, w = img.shape[:2]
    centre = (rng.uniform(30, w - 30), rng.uniform(30, h - 30))
    if cls == "crack":
        return darken_path(img, random_walk(rng, centre, rng.uniform(50, 180)), int(rng.integers(2, 4)),
                           rng.uniform(0.15, 0.4))
    if cls == "pinhole":
        return pit(img, centre, rng.uniform(3.5, 8), rng.uniform(0.6, 0.9), rng.uniform(0.3, 0.7))
    colour = rng.choice([(20, 60, 110), (40, 40, 45), (60, 110, 160)]) + rng.normal(0, 10, 3)  # rust, oil, clay
    return blend_blob(img, centre, (rng.uniform(12, 40), rng.uniform(10, 30)), rng.uniform(0, 180), colour,
                      rng.uniform(0.4, 0.7), rng.uniform(7, 15), rng)


def frames(n: int, seed: int, prefix: str):
    """``n`` frames, deterministic by ``seed``: (file name, BGR uint8, boxes)."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    for i in range(n):
        img = _surface(rng, photos)
        boxes = []
        for _ in range(0 if rng.random() < 0.1 else int(rng.integers(1, 4))):
            cls = CLASSES[rng.integers(len(CLASSES))]
            box = _defect(rng, img, cls)
            if box:
                boxes.append((cls, *box))
        img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
        yield f"{prefix}{i:04d}.jpg", img, boxes


def make(root: Path, n_train: int, n_val: int, seed: int) -> list[str]:
    """Write the line under ``root``; return the ``defectkit data import`` arguments (without --out)."""
    train = write_coco(root / "train", frames(n_train, seed, "panel_"), CLASSES)
    val = write_coco(root / "val", frames(n_val, seed + 1, "check_"), CLASSES)
    return ["--format", "coco", str(train), str(val), "--classes", ",".join(CLASSES)]
