"""Defects of the surfaces corpus, chosen for transfer: the shapes most lines' defects are made of.

crack (hair-line 1-2 px, branching), pinhole (2-6 px dot), scratch (long and thin), dent (a bump lit from one
side), stain (large, soft-edged) and chip (missing material showing what is underneath). Each is drawn as a
small patch (an alpha footprint and a way to change the pixels under it); the box is the tight bounding box
of the footprint above :data:`BOX_ALPHA`, so a box never holds a pixel the defect did not touch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from .surfaces_textures import fbm

SURFACE_CLASSES: tuple[str, ...] = ("crack", "pinhole", "scratch", "dent", "stain", "chip")
BOX_ALPHA = 0.25  # footprint level that counts as defect for the box (soft stains fade out below it)
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), image pixels


@dataclass
class Mark:
    """One defect patch at (x, y): its footprint and the pixel change it makes."""

    x: int
    y: int
    alpha: np.ndarray  # ph x pw float in [0, 1]
    paint: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (roi, alpha, under) -> new roi

    def box(self) -> Box | None:
        ys, xs = np.nonzero(self.alpha >= BOX_ALPHA * max(float(self.alpha.max()), 1e-6))
        if len(xs) == 0:
            return None
        return self.x + int(xs.min()), self.y + int(ys.min()), self.x + int(xs.max()) + 1, self.y + int(ys.max()) + 1

    def apply(self, img: np.ndarray, under: np.ndarray) -> None:
        ph, pw = self.alpha.shape
        sl = (slice(self.y, self.y + ph), slice(self.x, self.x + pw))
        img[sl] = np.clip(self.paint(img[sl], self.alpha, under[sl]), 0.0, 1.0)


def _darken(k: float):
    return lambda roi, a, under: roi * (1.0 - k * a[..., None])


def _lighten(k: float):
    return lambda roi, a, under: roi + (1.0 - roi) * (k * a[..., None])


def _place(rng: np.random.Generator, h: int, w: int, ph: int, pw: int) -> tuple[int, int] | None:
    if ph >= h or pw >= w:
        return None
    return int(rng.integers(0, w - pw + 1)), int(rng.integers(0, h - ph + 1))


def _place_points(rng: np.random.Generator, h: int, w: int, pts: np.ndarray):
    """A canvas just large enough for the points (3 px margin) placed in the frame: ``(at, lo, (ph, pw))`` with
    ``lo`` the points' offset into the canvas, or None when it does not fit."""
    lo = np.floor(pts.min(0)) - 3
    size = np.ceil(pts.max(0) - lo) + 4
    pw, ph = int(size[0]), int(size[1])
    at = _place(rng, h, w, ph, pw)
    return None if at is None else (at, lo, (ph, pw))


def _walk(rng: np.random.Generator, start: np.ndarray, angle: float, length: float, wiggle: float) -> np.ndarray:
    """A random-walk polyline of 2 px steps whose direction drifts by ``wiggle`` rad per step."""
    pts, p, a = [start], start.astype(np.float64), angle
    for _ in range(max(2, int(length / 2.0))):
        a += rng.normal(0.0, wiggle)
        p = p + 2.0 * np.array([np.cos(a), np.sin(a)])
        pts.append(p)
    return np.array(pts)


def crack(rng: np.random.Generator, h: int, w: int, s: float) -> Mark | None:
    """Hair-line crack: a wandering 1-2 px dark line with up to three branches."""
    length = rng.uniform(40, 220) * s
    main = _walk(rng, np.zeros(2), rng.uniform(0, 2 * np.pi), length, rng.uniform(0.08, 0.3))
    lines = [main]
    for _ in range(int(rng.choice([0, 1, 1, 2, 3]))):
        at = main[int(rng.integers(len(main) // 4, len(main)))]
        d = main[-1] - main[0]
        base = np.arctan2(d[1], d[0]) + rng.choice([-1, 1]) * rng.uniform(0.35, 1.0)
        lines.append(_walk(rng, at, base, length * rng.uniform(0.2, 0.5), 0.25))
    placed = _place_points(rng, h, w, np.concatenate(lines))
    if placed is None:
        return None
    at, lo, (ph, pw) = placed
    alpha = np.zeros((ph, pw), np.float32)
    thick = 1 if rng.random() < 0.65 else 2
    for ln in lines:
        cv2.polylines(alpha, [np.round(ln - lo).astype(np.int32)], False, 1.0, thick, cv2.LINE_AA)
    return Mark(at[0], at[1], alpha, _darken(rng.uniform(0.45, 0.85)))


def pinhole(rng: np.random.Generator, h: int, w: int, s: float) -> Mark | None:
    """Pin-hole or pore: a dark 2-6 px dot, sometimes with a bright rim."""
    r = float(rng.uniform(1.0, 3.0))
    n = int(2 * r + 7)
    alpha = np.zeros((n, n), np.float32)
    c = n / 2.0 - 0.5
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    d = np.hypot(xx - c, yy - c)
    alpha[:] = np.clip(r + 0.5 - d, 0.0, 1.0)
    rim = np.clip(1.2 - np.abs(d - r - 1.0), 0.0, 1.0) * (alpha < 0.5) * (0.35 if rng.random() < 0.5 else 0.0)
    at = _place(rng, h, w, n, n)
    if at is None:
        return None
    k = rng.uniform(0.55, 0.9)
    core = alpha.copy()
    footprint = np.maximum(core, rim / max(float(rim.max()), 1e-6)).astype(np.float32)  # the rim is in the box
    return Mark(at[0], at[1], footprint,
                lambda roi, a, under: (roi * (1.0 - k * core[..., None])) + (1.0 - roi) * rim[..., None] * 0.6)


def scratch(rng: np.random.Generator, h: int, w: int, s: float) -> Mark | None:
    """Scratch: a long, nearly straight 1-3 px line, bright (metal) or dark, sometimes broken."""
    length = rng.uniform(60, 320) * s
    a = rng.uniform(0, np.pi)
    p0 = np.zeros(2)
    p2 = length * np.array([np.cos(a), np.sin(a)])
    mid = (p0 + p2) / 2 + rng.normal(0, 0.06 * length, 2)
    t = np.linspace(0, 1, max(8, int(length / 3)))[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * mid + t ** 2 * p2
    placed = _place_points(rng, h, w, pts)
    if placed is None:
        return None
    at, lo, (ph, pw) = placed
    alpha = np.zeros((ph, pw), np.float32)
    cv2.polylines(alpha, [np.round(pts - lo).astype(np.int32)], False, 1.0, int(rng.choice([1, 1, 2, 3])), cv2.LINE_AA)
    if rng.random() < 0.3:  # intermittent: the tool skipped
        alpha *= (fbm(rng, ph, pw, 12.0, 2) > 0.35).astype(np.float32)
    paint = _lighten(rng.uniform(0.35, 0.8)) if rng.random() < 0.5 else _darken(rng.uniform(0.3, 0.7))
    return Mark(at[0], at[1], alpha, paint)


def dent(rng: np.random.Generator, h: int, w: int, s: float) -> Mark | None:
    """Dent or bump: an elliptical depression lit from one side (bright rim on one side, shadow on the other)."""
    ax, ay = rng.uniform(5, 28) * s, rng.uniform(5, 28) * s
    n = int(2.6 * max(ax, ay)) + 6
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) - n / 2.0
    t = rng.uniform(0, np.pi)
    u = (xx * np.cos(t) + yy * np.sin(t)) / ax
    v = (-xx * np.sin(t) + yy * np.cos(t)) / ay
    bump = np.exp(-1.5 * (u * u + v * v)).astype(np.float32)
    gy, gx = np.gradient(bump)
    la = rng.uniform(0, 2 * np.pi)
    shade = (np.cos(la) * gx + np.sin(la) * gy)
    shade = shade / (np.abs(shade).max() + 1e-6) * rng.uniform(0.35, 0.7) - 0.12 * bump
    alpha = np.clip(np.abs(shade) / (np.abs(shade).max() + 1e-6), 0, 1).astype(np.float32)
    at = _place(rng, h, w, n, n)
    if at is None:
        return None
    return Mark(at[0], at[1], alpha, lambda roi, a, under: roi * (1.0 + shade[..., None]))


_STAIN_TINTS = ((0.10, 0.20, 0.30), (0.05, 0.05, 0.05), (0.35, 0.55, 0.65), (0.85, 0.85, 0.85), (0.15, 0.35, 0.25))


def stain(rng: np.random.Generator, h: int, w: int, s: float) -> Mark | None:
    """Stain, residue or discolouration: a large soft irregular patch of another tint, maybe ring-edged."""
    rx, ry = rng.uniform(15, 80) * s, rng.uniform(15, 80) * s
    n_y, n_x = int(2.4 * ry) + 4, int(2.4 * rx) + 4
    yy, xx = np.mgrid[0:n_y, 0:n_x].astype(np.float32)
    e = ((xx - n_x / 2) / rx) ** 2 + ((yy - n_y / 2) / ry) ** 2
    field = np.exp(-e) * (0.55 + 0.9 * fbm(rng, n_y, n_x, max(rx, ry) / 2.0, 3))
    soft = np.clip((field - 0.45) / rng.uniform(0.1, 0.35), 0.0, 1.0).astype(np.float32)
    if rng.random() < 0.35:  # coffee ring: darker edge
        soft = np.clip(soft + 0.8 * soft * (1 - soft) * 4 * 0.5, 0, 1)
    at = _place(rng, h, w, n_y, n_x)
    if at is None or soft.max() < 0.5:
        return None
    tint = np.array(_STAIN_TINTS[int(rng.integers(len(_STAIN_TINTS)))], np.float32) + rng.normal(0, 0.05, 3)
    k = rng.uniform(0.3, 0.65)
    return Mark(at[0], at[1], soft, lambda roi, a, under: roi * (1 - k * a[..., None]) + tint * (k * a[..., None]))


def chip(rng: np.random.Generator, h: int, w: int, s: float, edge: tuple[int, int] | None = None) -> Mark | None:
    """Chip or missing material: an irregular polygon showing what lies beneath (the background at a part's
    edge, else a raw substrate colour), with a thin lit rim."""
    r = rng.uniform(5, 35) * s
    k = int(rng.integers(5, 10))
    ang = np.sort(rng.uniform(0, 2 * np.pi, k))
    rad = r * rng.uniform(0.45, 1.0, k)
    n = int(2 * r) + 6
    pts = np.stack([n / 2 + rad * np.cos(ang), n / 2 + rad * np.sin(ang)], 1)
    alpha = np.zeros((n, n), np.float32)
    cv2.fillPoly(alpha, [np.round(pts * 4).astype(np.int32)], 1.0, cv2.LINE_AA, shift=2)
    if edge is not None:
        x, y = edge[0] - n // 2, edge[1] - n // 2
        if x < 0 or y < 0 or x + n > w or y + n > h:
            return None
        at = (x, y)
    else:
        at = _place(rng, h, w, n, n)
    if at is None:
        return None
    rim_k = rng.uniform(0.2, 0.5)  # lit broken edge, inside the footprint (the box stays tight)
    raw = np.array(rng.choice([(0.15, 0.15, 0.15), (0.8, 0.8, 0.78), (0.35, 0.4, 0.45)]), np.float32)
    use_under = edge is not None

    def paint(roi, a, under):
        fill = under if use_under else np.broadcast_to(raw * rng_shade, roi.shape)
        rim = np.clip(a - cv2.erode(a, np.ones((3, 3), np.uint8)), 0, 1)[..., None] * rim_k
        out = roi * (1 - a[..., None]) + fill * a[..., None]
        return out + rim * (1 - out)

    rng_shade = (0.9 + 0.2 * fbm(rng, n, n, 6.0, 2))[..., None]
    return Mark(at[0], at[1], alpha, paint)


DRAWERS = {"crack": crack, "pinhole": pinhole, "scratch": scratch, "dent": dent, "stain": stain, "chip": chip}
