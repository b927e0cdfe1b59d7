"""Defect primitives shared by the bench's line generators: each draws into a float image and returns its box.

Boxes are COCO pixels (x, y, w, h), clipped to the frame; a primitive that lands mostly outside returns None
so the caller does not label what cannot be seen.
"""
from __future__ import annotations

import cv2
import numpy as np

Box = tuple[float, float, float, float]


def clip_box(x0: float, y0: float, x1: float, y1: float, w: int, h: int, min_side: float = 3.0) -> Box | None:
    """(x, y, w, h) of the part of [x0, x1] x [y0, y1] inside a w x h frame, None when too small to label."""
    x0, y0, x1, y1 = max(0.0, float(x0)), max(0.0, float(y0)), min(float(w), float(x1)), min(float(h), float(y1))
    if x1 - x0 < min_side or y1 - y0 < min_side:
        return None
    return (round(x0, 1), round(y0, 1), round(x1 - x0, 1), round(y1 - y0, 1))


def random_walk(rng: np.random.Generator, start: tuple[float, float], length: float, step: float = 4.0,
                wiggle: float = 0.35) -> np.ndarray:
    """Points of a crack-like path: a heading that drifts, ``length`` pixels long."""
    n = max(2, int(length / step))
    heading = rng.uniform(0, 2 * np.pi)
    pts = [np.array(start, dtype=float)]
    for _ in range(n):
        heading += rng.normal(0, wiggle)
        pts.append(pts[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
    return np.array(pts)


def darken_path(img: np.ndarray, pts: np.ndarray, width: int, factor: float) -> Box | None:
    """Multiply the pixels under a polyline by ``factor`` (a crack, a scratch in shadow)."""
    h, w = img.shape[:2]
    mask = np.zeros((h, w), np.float32)
    cv2.polylines(mask, [np.round(pts).astype(np.int32)], False, 1.0, thickness=width, lineType=cv2.LINE_AA)
    mask = cv2.GaussianBlur(mask, (3, 3), 0)
    m = mask[..., None] if img.ndim == 3 else mask
    img *= 1 - (1 - factor) * m
    pad = width / 2 + 1
    return clip_box(pts[:, 0].min() - pad, pts[:, 1].min() - pad, pts[:, 0].max() + pad, pts[:, 1].max() + pad, w, h)


def blend_blob(img: np.ndarray, centre: tuple[float, float], axes: tuple[float, float], angle: float,
               colour, alpha: float, softness: float, rng: np.random.Generator) -> Box | None:
    """Blend ``colour`` into an irregular soft ellipse (stains, oil spots); the box covers where it shows."""
    h, w = img.shape[:2]
    mask = np.zeros((h, w), np.float32)
    cx, cy = centre
    ax, ay = axes
    cv2.ellipse(mask, (int(cx), int(cy)), (max(1, int(ax)), max(1, int(ay))), angle, 0, 360, 1.0, -1)
    for _ in range(3):  # lobes make it irregular
        ox, oy = rng.normal(0, ax / 2), rng.normal(0, ay / 2)
        cv2.ellipse(mask, (int(cx + ox), int(cy + oy)), (max(1, int(ax * 0.6)), max(1, int(ay * 0.6))),
                    rng.uniform(0, 180), 0, 360, 1.0, -1)
    k = max(3, int(softness) | 1)
    mask = cv2.GaussianBlur(mask, (k, k), 0) * alpha
    ys, xs = np.nonzero(mask > 0.12 * alpha)
    if xs.size == 0:
        return None
    col = np.asarray(colour, dtype=np.float32)
    m = mask[..., None] if img.ndim == 3 else mask
    img[:] = img * (1 - m) + col * m
    return clip_box(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, w, h)


def pit(img: np.ndarray, centre: tuple[float, float], radius: float, depth: float, rim: float,
        light: tuple[float, float] = (-0.7, -0.7)) -> Box | None:
    """A small hole lit from one side: a dark core, a bright rim towards the light, a shadow away from it."""
    h, w = img.shape[:2]
    cx, cy = centre
    r = max(1.5, radius)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    core = np.clip(1.2 - d / r, 0, 1) ** 0.7
    ring = np.exp(-((d - r) ** 2) / (0.5 * r)) * np.clip(((xx - cx) * light[0] + (yy - cy) * light[1]) / r, 0, 1)
    gain = (1 - depth * core) * (1 + rim * ring)
    img *= gain[..., None] if img.ndim == 3 else gain
    return clip_box(cx - r - 1, cy - r - 1, cx + r + 1, cy + r + 1, w, h)


def dent(img: np.ndarray, centre: tuple[float, float], axes: tuple[float, float], angle: float,
         strength: float) -> Box | None:
    """A shallow dent: a shading gradient inside a soft ellipse (bright on one flank, dark on the other)."""
    h, w = img.shape[:2]
    cx, cy = centre
    ax, ay = axes
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = np.deg2rad(angle)
    u = ((xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)) / max(ax, 1)
    v = (-(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)) / max(ay, 1)
    r2 = u ** 2 + v ** 2
    inside = np.exp(-r2 * 2.0)
    gain = 1 + strength * inside * (u * 1.6)  # the flank towards the light is brighter
    img *= gain[..., None] if img.ndim == 3 else gain
    ys, xs = np.nonzero(inside * np.abs(u) > 0.12)
    if xs.size == 0:
        return None
    return clip_box(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, w, h)
