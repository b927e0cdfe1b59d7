"""Procedural material textures for the surfaces corpus (numpy + OpenCV only, no image files).

Why procedural: a base model that transfers to any line must have seen many materials, and the kit may
ship only what it may redistribute. Every texture here is computed from a seeded generator, so the corpus
is the same bytes on every machine and carries no third-party licence. No scikit-image or bench/ code is
used: the measuring lines in bench/ must stay unseen.

Each family is ``f(rng, h, w) -> float32 HxWx3`` in [0, 1], BGR, before lighting (:mod:`surfaces_light`).
"""
from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

Texture = Callable[[np.random.Generator, int, int], np.ndarray]


def value_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth noise in [0, 1]: a random grid of ~``cell`` px spacing, bicubically upsampled."""
    gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
    grid = rng.random((gh, gw), dtype=np.float32)
    big = cv2.resize(grid, (int(gw * cell), int(gh * cell)), interpolation=cv2.INTER_CUBIC)
    return np.clip(big[:h, :w], 0.0, 1.0)


def fbm(rng: np.random.Generator, h: int, w: int, cell: float, octaves: int = 4, gain: float = 0.5) -> np.ndarray:
    """Fractal (Perlin-like) noise: octaves of value noise, normalised to [0, 1]."""
    out = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for _ in range(octaves):
        out += amp * value_noise(rng, h, w, max(cell, 1.5))
        total += amp
        amp *= gain
        cell /= 2.0
    out /= total
    lo, hi = float(out.min()), float(out.max())
    return (out - lo) / max(hi - lo, 1e-6)


def _colour(base: tuple[float, float, float], rng: np.random.Generator, jitter: float = 0.08) -> np.ndarray:
    """A BGR colour near ``base`` (each channel jittered)."""
    return np.clip(np.array(base, np.float32) + rng.normal(0.0, jitter, 3).astype(np.float32), 0.02, 0.98)


def _tint(lum: np.ndarray, dark: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Map a luminance field to a colour ramp between two BGR colours."""
    return dark[None, None, :] + lum[..., None] * (light - dark)[None, None, :]


def _rotate(img: np.ndarray, angle: float) -> np.ndarray:
    """Rotate about the centre with reflected borders (textures have no edges)."""
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, 1.0)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _pad_square(h: int, w: int) -> int:
    return int(np.ceil(np.hypot(h, w))) + 4


def brushed_metal(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Fine streaks along one direction (anisotropic blur of white noise), steel to aluminium grey."""
    s = _pad_square(h, w)
    noise = rng.random((s, s), dtype=np.float32)
    streak = cv2.blur(noise, (int(rng.integers(25, 90)), 1))
    streak = (streak - streak.mean()) / (streak.std() + 1e-6)
    lum = 0.55 + 0.06 * streak + 0.15 * (value_noise(rng, s, s, s / 2.0) - 0.5)
    lum = _rotate(lum, float(rng.uniform(-90, 90)))
    y0, x0 = (s - h) // 2, (s - w) // 2
    grey = float(rng.uniform(0.45, 0.8))
    tone = _colour((grey + 0.03, grey, grey - 0.02), rng, 0.03)
    return np.clip(lum[y0:y0 + h, x0:x0 + w, None] * tone[None, None, :] * 1.4, 0, 1)


def wood(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Growth rings around an off-frame centre, warped by noise, with fine fibres along the grain."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = float(rng.uniform(-2 * w, 3 * w)), float(rng.uniform(-3 * h, -0.5 * h))
    r = np.hypot(xx - cx, (yy - cy) * rng.uniform(0.15, 0.4)) + 40.0 * fbm(rng, h, w, 80.0, 3)
    rings = 0.5 + 0.5 * np.sin(r / rng.uniform(4.0, 12.0))
    rings = rings ** rng.uniform(1.0, 3.0)
    fibres = cv2.blur(rng.random((h, w), dtype=np.float32), (1, 15))
    lum = 0.65 * rings + 0.35 * fibres
    dark = _colour((0.12, 0.22, 0.35), rng, 0.05)
    light = _colour((0.45, 0.62, 0.78), rng, 0.06)
    return np.clip(_tint(lum, dark, light), 0, 1)


def woven_fabric(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Plain weave: warp and weft threads alternating over and under, each thread shaded across."""
    p = float(rng.uniform(4.0, 11.0))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ix, iy = np.floor(xx / p), np.floor(yy / p)
    fx, fy = (xx / p) % 1.0, (yy / p) % 1.0
    over = ((ix + iy) % 2) == 0
    shade = np.where(over, np.sin(np.pi * fx), np.sin(np.pi * fy)) ** 0.6
    lum = 0.35 + 0.55 * shade + 0.1 * (value_noise(rng, h, w, p * 6) - 0.5)
    lum = _rotate(lum, float(rng.choice([0.0, 45.0, rng.uniform(-20, 20)])))
    base = _colour(tuple(rng.uniform(0.15, 0.85, 3)), rng, 0.0)
    return np.clip(lum[..., None] * base[None, None, :] * 1.2, 0, 1)


def concrete(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Cement grey with cloudy fbm and faint 1 px aggregate speckle (hard negatives for pinholes)."""
    lum = 0.55 + 0.25 * (fbm(rng, h, w, rng.uniform(40, 120), 5) - 0.5)
    speck = rng.random((h, w), dtype=np.float32)
    lum = lum - 0.12 * (speck > 0.995) + 0.08 * (speck < 0.004)
    lum += rng.normal(0.0, 0.03, (h, w)).astype(np.float32)
    grey = float(rng.uniform(0.7, 1.2))
    tone = _colour((0.62, 0.63, 0.62), rng, 0.03) * grey
    return np.clip(lum[..., None] * tone[None, None, :] * 1.5, 0, 1)


def orange_peel(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Painted or moulded plastic: one colour with a fine bumpy relief lit from one side."""
    bumps = cv2.GaussianBlur(rng.random((h, w), dtype=np.float32), (0, 0), rng.uniform(1.5, 3.5))
    gy, gx = np.gradient(bumps)
    a = rng.uniform(0, 2 * np.pi)
    relief = (np.cos(a) * gx + np.sin(a) * gy) / (np.abs(gx).mean() + 1e-6)
    lum = 0.75 + 0.04 * relief + 0.06 * (value_noise(rng, h, w, 150) - 0.5)
    base = _colour(tuple(rng.uniform(0.1, 0.9, 3)), rng, 0.0)
    return np.clip(lum[..., None] * base[None, None, :] * 1.25, 0, 1)


def glaze(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Ceramic or glass glaze: smooth, glossy, with slow colour pooling and tiny bubbles."""
    pool = fbm(rng, h, w, rng.uniform(100, 250), 3)
    c1 = _colour(tuple(rng.uniform(0.3, 0.95, 3)), rng, 0.0)
    c2 = np.clip(c1 * rng.uniform(0.6, 0.9), 0, 1)
    img = _tint(pool, c2, c1)
    bubbles = (rng.random((h, w), dtype=np.float32) > 0.9993).astype(np.float32)
    bubbles = cv2.GaussianBlur(bubbles, (0, 0), 0.7) * 0.5
    return np.clip(img + bubbles[..., None], 0, 1)


def knurled(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Diamond knurl on machined steel: two crossed ridge sets, lit from one side."""
    p = float(rng.uniform(6.0, 14.0))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.deg2rad(rng.uniform(25, 65))
    u = (xx * np.cos(a) + yy * np.sin(a)) / p
    v = (xx * np.cos(a) - yy * np.sin(a)) / p
    height = np.minimum(np.abs((u % 1.0) - 0.5), np.abs((v % 1.0) - 0.5))
    gy, gx = np.gradient(height)
    lum = 0.5 + 4.0 * (gx + gy) + 0.08 * (value_noise(rng, h, w, 60) - 0.5)
    grey = float(rng.uniform(0.5, 0.8))
    return np.clip(np.repeat(lum[..., None], 3, axis=2) * grey * 1.3, 0, 1).astype(np.float32)


def felt_paper(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Non-woven textile, felt or paper: random short fibres over a cloudy base."""
    canvas = np.zeros((h, w), np.float32)
    n = int(h * w / rng.uniform(60, 200))
    x0 = rng.uniform(0, w, n)
    y0 = rng.uniform(0, h, n)
    ang = rng.uniform(0, np.pi, n)
    ln = rng.uniform(4, 14, n)
    val = rng.uniform(0.05, 0.2, n)
    for x, y, t, l, v in zip(x0, y0, ang, ln, val):
        p1 = (int(x), int(y))
        p2 = (int(x + l * np.cos(t)), int(y + l * np.sin(t)))
        cv2.line(canvas, p1, p2, float(v), 1, cv2.LINE_AA)
    lum = 0.6 + 0.2 * (fbm(rng, h, w, 90, 4) - 0.5) + canvas - canvas.mean()
    base = _colour(tuple(rng.uniform(0.5, 0.95, 3)), rng, 0.0)
    return np.clip(lum[..., None] * base[None, None, :] * 1.3, 0, 1)


def granite(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Polished stone: grains of three or four minerals (quantised noise), each its own colour."""
    grain = fbm(rng, h, w, rng.uniform(6, 16), 3)
    k = int(rng.integers(3, 5))
    edges = np.quantile(grain, np.linspace(0, 1, k + 1)[1:-1])
    idx = np.digitize(grain, edges)
    palette = np.stack([_colour(tuple(rng.uniform(0.1, 0.9, 3)), rng, 0.0) for _ in range(k)])
    img = palette[idx] * (0.85 + 0.3 * value_noise(rng, h, w, 4)[..., None])
    return np.clip(img, 0, 1).astype(np.float32)


def leather_rubber(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Leather or textured rubber: a cellular grain of creases around raised pebbles."""
    cells = value_noise(rng, h, w, rng.uniform(5, 12))
    creases = np.abs(cells - 0.5)
    creases = 1.0 - np.exp(-creases * rng.uniform(6, 14))
    lum = 0.4 + 0.5 * creases + 0.1 * (value_noise(rng, h, w, 120) - 0.5)
    base = _colour(tuple(rng.choice([(0.08, 0.08, 0.09), (0.12, 0.25, 0.45), (0.2, 0.2, 0.2), (0.1, 0.15, 0.3)])),
                   rng, 0.04)
    return np.clip(lum[..., None] * base[None, None, :] * 1.8, 0, 1)


def cast_sandblasted(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Cast or sand-blasted metal: fine isotropic grain, matt, slightly mottled."""
    grain = cv2.GaussianBlur(rng.random((h, w), dtype=np.float32), (0, 0), rng.uniform(0.6, 1.2))
    grain = (grain - grain.mean()) / (grain.std() + 1e-6)
    lum = 0.55 + 0.05 * grain + 0.12 * (fbm(rng, h, w, 90, 3) - 0.5)
    grey = float(rng.uniform(0.55, 1.0))
    tone = _colour((0.58, 0.58, 0.6), rng, 0.03) * grey
    return np.clip(lum[..., None] * tone[None, None, :] * 1.6, 0, 1)


def carbon_twill(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Carbon-fibre or composite 2x2 twill: diagonal steps of tows, dark and glossy."""
    p = float(rng.uniform(5, 10))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ix, iy = np.floor(xx / p), np.floor(yy / p)
    fx, fy = (xx / p) % 1.0, (yy / p) % 1.0
    over = ((ix + iy) % 4) < 2
    shade = np.where(over, np.sin(np.pi * fy), np.sin(np.pi * fx)) ** 0.8
    lum = 0.1 + 0.35 * shade
    return np.clip(np.repeat(lum[..., None], 3, axis=2) * _colour((1.0, 1.0, 1.0), rng, 0.05), 0, 1).astype(np.float32)


# Material families, in a fixed order (the plan draws from it by index: reordering changes the corpus).
FAMILIES: dict[str, Texture] = {
    "brushed_metal": brushed_metal,
    "wood": wood,
    "woven_fabric": woven_fabric,
    "concrete": concrete,
    "orange_peel": orange_peel,
    "glaze": glaze,
    "knurled": knurled,
    "felt_paper": felt_paper,
    "granite": granite,
    "leather_rubber": leather_rubber,
    "cast_sandblasted": cast_sandblasted,
    "carbon_twill": carbon_twill,
}
# Families whose surfaces are shiny enough to show a specular band.
GLOSSY = frozenset({"brushed_metal", "glaze", "orange_peel", "knurled", "carbon_twill", "granite"})
