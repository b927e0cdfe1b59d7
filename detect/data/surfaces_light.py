"""Lighting and camera effects of the surfaces corpus: what differs between two stations seeing the same part.

Applied after the defects are painted (a real camera sees the defect under the same light), as a
per-pixel gain and offset only, so no pixel moves and the boxes stay tight.
"""
from __future__ import annotations

import numpy as np


def lighting_gain(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Multiplicative light field: a linear gradient in a random direction times a vignette."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    t = ((xx - w / 2) * np.cos(a) + (yy - h / 2) * np.sin(a)) / max(h, w)
    gain = 1.0 + rng.uniform(0.0, 0.8) * t
    if rng.random() < 0.6:
        cx, cy = w * rng.uniform(0.3, 0.7), h * rng.uniform(0.3, 0.7)
        r2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / float(max(h, w) ** 2)
        gain *= 1.0 - rng.uniform(0.2, 0.9) * r2
    return (gain * rng.uniform(0.75, 1.2)).astype(np.float32)


def specular_band(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Additive soft highlight stripe across the frame (a line light on a glossy part)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, np.pi)
    d = (xx - w * rng.uniform(0.1, 0.9)) * np.cos(a) + (yy - h * rng.uniform(0.1, 0.9)) * np.sin(a)
    width = rng.uniform(0.03, 0.15) * max(h, w)
    return (rng.uniform(0.15, 0.5) * np.exp(-0.5 * (d / width) ** 2)).astype(np.float32)


def light(img: np.ndarray, rng: np.random.Generator, glossy: bool) -> np.ndarray:
    """The lit, noisy camera frame (float [0, 1] in, float [0, 1] out)."""
    h, w = img.shape[:2]
    out = img * lighting_gain(rng, h, w)[..., None]
    if glossy and rng.random() < 0.6:
        out = out + specular_band(rng, h, w)[..., None]
    gamma = rng.uniform(0.8, 1.25)
    out = np.clip(out, 0.0, 1.0) ** gamma
    sigma = rng.uniform(0.0, 0.025)
    if sigma > 0.004:
        out = out + rng.normal(0.0, sigma, out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0)
