"""Line (c) "weave": woven textile, 512x512 colour PNG, four defect classes, YOLO labels.

A plain weave drawn thread by thread (each warp and weft yarn with its own width and shade, over/under in a
checkerboard, a cosine profile across each yarn), dyed per frame from a few fabric colours and slightly rotated.
Defects: hole (dark backing through frayed yarn), slub (a thick bright yarn segment along the weft), oil_spot
(a soft dark blob), broken_end (a missing warp yarn: a dark vertical gap). Written as YOLO ``images/{train,val}``
with ``labels/`` and ``classes.txt``.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .draw import blend_blob, clip_box
from .writers import write_yolo

CLASSES = ["hole", "slub", "oil_spot", "broken_end"]
S = 512
DYES = [(120, 60, 20), (150, 110, 70), (90, 150, 180), (40, 40, 160), (70, 120, 60), (200, 200, 205)]  # BGR


def _weave(rng: np.random.Generator, pad: int = 64) -> tuple[np.ndarray, float]:
    n = S + 2 * pad
    period = rng.uniform(7, 13)
    coords = np.arange(n, dtype=np.float32)
    jit_u = np.cumsum(rng.normal(0, 0.04, n)).astype(np.float32)  # yarn spacing drifts
    u = coords / period + jit_u
    v = coords / period + np.cumsum(rng.normal(0, 0.04, n)).astype(np.float32)
    iu, iv = np.floor(u).astype(int), np.floor(v).astype(int)
    fu, fv = u - iu, v - iv
    warp_shade = 0.8 + 0.2 * rng.random(iu.max() + 2)
    weft_shade = 0.8 + 0.2 * rng.random(iv.max() + 2)
    over = ((iu[None, :] + iv[:, None]) % 2) == 0
    warp = np.sin(np.pi * fu)[None, :] ** 0.6 * warp_shade[iu][None, :]
    weft = np.sin(np.pi * fv)[:, None] ** 0.6 * weft_shade[iv][:, None]
    cloth = np.where(over, warp * np.ones_like(weft), weft * np.ones_like(warp))
    m = cv2.getRotationMatrix2D((n / 2, n / 2), rng.uniform(-4, 4), 1.0)
    cloth = cv2.warpAffine(cloth.astype(np.float32), m, (n, n), flags=cv2.INTER_LINEAR)
    return cloth[pad:pad + S, pad:pad + S], period


def _defect(rng: np.random.Generator, img: np.ndarray, cls: str, period: float, dye: np.ndarray):
    cx, cy = rng.uniform(25, S - 25), rng.uniform(25, S - 25)
    if cls == "hole":
        return blend_blob(img, (cx, cy), (rng.uniform(5, 14), rng.uniform(5, 14)), rng.uniform(0, 180),
                          (15, 15, 18), 0.95, 3, rng)
    if cls == "oil_spot":
        return blend_blob(img, (cx, cy), (rng.uniform(10, 30), rng.uniform(8, 24)), rng.uniform(0, 180),
                          dye * 0.35, rng.uniform(0.45, 0.7), rng.uniform(9, 19), rng)
    length = rng.uniform(60, 220)
    if cls == "slub":  # thick yarn along the weft (horizontal)
        thick = rng.uniform(0.5, 0.9) * period
        x0, x1 = cx - length / 2, cx + length / 2
        mask = np.zeros((S, S), np.float32)
        cv2.line(mask, (int(x0), int(cy)), (int(x1), int(cy)), 1.0, max(2, int(thick)), cv2.LINE_AA)
        mask = cv2.GaussianBlur(mask, (0, 0), 1.2)
        img[:] = img * (1 - 0.6 * mask[..., None]) + np.minimum(dye * 1.5 + 40, 255) * 0.6 * mask[..., None]
        return clip_box(x0 - 1, cy - thick / 2 - 2, x1 + 1, cy + thick / 2 + 2, S, S)
    gap = rng.uniform(0.6, 1.0) * period  # broken_end: a missing warp yarn (vertical)
    y0, y1 = cy - length / 2, cy + length / 2
    mask = np.zeros((S, S), np.float32)
    cv2.line(mask, (int(cx), int(y0)), (int(cx), int(y1)), 1.0, max(2, int(gap)), cv2.LINE_AA)
    mask = cv2.GaussianBlur(mask, (0, 0), 1.0)
    img *= (1 - 0.55 * mask)[..., None]
    return clip_box(cx - gap / 2 - 2, y0 - 1, cx + gap / 2 + 2, y1 + 1, S, S)


def frames(n: int, seed: int, prefix: str):
    """``n`` frames, deterministic by ``seed``: (file name, BGR uint8, boxes)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        cloth, period = _weave(rng)
        dye = np.array(DYES[rng.integers(len(DYES))], np.float32) + rng.normal(0, 12, 3)
        img = (0.35 + 0.75 * cloth[..., None]) * dye[None, None, :]
        img *= (1 + rng.normal(0, 0.04, (S, S)).astype(np.float32))[..., None]  # yarn fuzz
        boxes = []
        for _ in range(0 if rng.random() < 0.1 else int(rng.integers(1, 4))):
            cls = CLASSES[rng.integers(len(CLASSES))]
            box = _defect(rng, img, cls, period, dye)
            if box:
                boxes.append((cls, *box))
        yield f"{prefix}{i:04d}.png", np.clip(img, 0, 255).astype(np.uint8), boxes


def make(root: Path, n_train: int, n_val: int, seed: int) -> list[str]:
    """Write the line under ``root`` (YOLO); return the ``defectkit data import`` arguments (without --out)."""
    train = write_yolo(root, "train", frames(n_train, seed, "roll_"), CLASSES)
    val = write_yolo(root, "val", frames(n_val, seed + 1, "insp_"), CLASSES)
    return ["--format", "yolo", str(train), str(val), "--classes", ",".join(CLASSES)]
