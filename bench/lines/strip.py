"""Line (b) "strip": machined metal strips from a line-scan camera, 800x200, single-channel 16-bit PNG (12-bit data).

Drawn here with numpy/OpenCV: brushing streaks along the strip, the line-scan look (a fixed gain per sensor column,
a flicker per scanned row), periodic tool marks and a falloff of the light across the strip. Values sit in
0..4095 as a 12-bit camera writes them into 16-bit files, which is what the import has to handle. Small defects:
scratch (a thin bright or dark line at a slant), pit (a lit hole), dent (a shading gradient).
Written as Pascal VOC with the user's own split in ``ImageSets/Main/val.txt``.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .draw import darken_path, dent, pit
from .writers import write_voc

CLASSES = ["scratch", "pit", "dent"]
W, H = 800, 200
FULL = 4095.0  # 12-bit camera


def _surface(rng: np.random.Generator) -> np.ndarray:
    streaks = cv2.GaussianBlur(rng.normal(0, 1, (H, W)).astype(np.float32), (0, 0), sigmaX=rng.uniform(15, 40),
                               sigmaY=0.8)
    streaks /= streaks.std() + 1e-6
    col_gain = 1 + rng.normal(0, 0.015, W)  # column PRNU of the line sensor
    row_flicker = 1 + cv2.GaussianBlur(rng.normal(0, 0.02, (H, 1)).astype(np.float32), (1, 5), 0)[:, 0]
    xx = np.arange(W, dtype=np.float32)
    period = rng.uniform(18, 45)
    tool = 0.03 * np.sin(2 * np.pi * xx / period + rng.uniform(0, 6.3)) ** 8
    yy = np.linspace(-1, 1, H, dtype=np.float32)
    across = 1 - rng.uniform(0.1, 0.35) * yy ** 2
    level = rng.uniform(0.35, 0.6)
    img = level * (1 + 0.06 * streaks + tool[None, :]) * across[:, None] * row_flicker[:, None] * col_gain[None, :]
    return img.astype(np.float32)


def _defect(rng: np.random.Generator, img: np.ndarray, cls: str):
    centre = (rng.uniform(20, W - 20), rng.uniform(15, H - 15))
    if cls == "scratch":
        length, ang = rng.uniform(30, 140), rng.uniform(-0.6, 0.6) + (np.pi if rng.random() < 0.5 else 0)
        t = np.linspace(-0.5, 0.5, 20)[:, None] * length
        pts = np.array(centre) + t * np.array([np.cos(ang), np.sin(ang)]) + rng.normal(0, 0.4, (20, 2))
        return darken_path(img, pts, int(rng.integers(1, 3)), rng.choice([rng.uniform(0.45, 0.7), rng.uniform(1.4, 1.8)]))
    if cls == "pit":
        return pit(img, centre, rng.uniform(3, 7), rng.uniform(0.5, 0.85), rng.uniform(0.4, 0.9))
    return dent(img, centre, (rng.uniform(9, 22), rng.uniform(6, 16)), rng.uniform(0, 180), rng.uniform(0.25, 0.5))


def frames(names: list[str], seed: int):
    """One strip per name, deterministic by ``seed``: (file name, uint16 single channel, boxes)."""
    rng = np.random.default_rng(seed)
    for name in names:
        img = _surface(rng)
        boxes = []
        for _ in range(0 if rng.random() < 0.12 else int(rng.integers(1, 4))):
            cls = CLASSES[rng.integers(len(CLASSES))]
            box = _defect(rng, img, cls)
            if box:
                boxes.append((cls, *box))
        img = img * FULL + rng.normal(0, 12, img.shape)  # read noise in counts
        yield name, np.clip(img, 0, FULL).astype(np.uint16), boxes


def make(root: Path, n_train: int, n_val: int, seed: int) -> list[str]:
    """Write the line under ``root`` (VOC); return the ``defectkit data import`` arguments (without --out)."""
    names = [f"strip_{i:05d}.png" for i in range(n_train + n_val)]
    order = np.random.default_rng(seed + 7).permutation(len(names))
    val_names = {names[i] for i in order[:n_val]}
    val_txt = write_voc(root, frames(names, seed), val_names)
    return ["--format", "voc", str(root), "--val-from", str(val_txt), "--classes", ",".join(CLASSES)]
