"""Drawing of synthetic PCB-like boards (no defects: see ``defects.py``).

A board is kept as geometry (traces, pads) plus three anti-aliased masks (copper, silkscreen,
occupancy) so that defects can cut or add copper before the final image is composed, and so the
composed image has the same texture everywhere (a cut is not a flat-coloured patch).
All randomness comes from the numpy Generator passed in: same generator state, same pixels.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

SHIFT = 4  # sub-pixel bits for cv2 drawing
ONE = 1 << SHIFT


def _pts(points: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(points, dtype=np.float64) * ONE).astype(np.int32).reshape(-1, 1, 2)


def fill_poly(mask: np.ndarray, points: np.ndarray, value: int = 255) -> None:
    cv2.fillPoly(mask, [_pts(points)], int(value), lineType=cv2.LINE_AA, shift=SHIFT)


def fill_circle(mask: np.ndarray, center, radius: float, value: int = 255) -> None:
    c = (int(round(center[0] * ONE)), int(round(center[1] * ONE)))
    cv2.circle(mask, c, max(1, int(round(radius * ONE))), int(value), -1, cv2.LINE_AA, SHIFT)


def stroke(mask: np.ndarray, p0, p1, thickness: float, value: int = 255) -> None:
    """A straight band of the given (float) thickness from p0 to p1 with square ends."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    d = p1 - p0
    n = np.array([-d[1], d[0]]) / (np.linalg.norm(d) + 1e-9) * thickness / 2
    fill_poly(mask, np.array([p0 + n, p1 + n, p1 - n, p0 - n]), value)


@dataclass
class Trace:
    """A copper track: polyline (straight and 45-degree segments), thickness, its bundle."""

    points: np.ndarray
    thickness: float
    bundle: int
    index: int
    pitch: float  # centre-to-centre distance to the next trace of the bundle

    def segments(self):
        for k in range(len(self.points) - 1):
            p0, p1 = self.points[k], self.points[k + 1]
            length = float(np.linalg.norm(p1 - p0))
            u = (p1 - p0) / length
            yield k, p0, u, np.array([-u[1], u[0]]), length


@dataclass
class Pad:
    """A round through-hole pad; ``has_hole`` False is the missing_hole defect."""

    center: np.ndarray
    radius: float
    hole_radius: float
    has_hole: bool = True


@dataclass
class Board:
    width: int
    height: int
    scale: float
    copper: np.ndarray
    silk: np.ndarray
    occupied: np.ndarray  # copper or silk, binary: where new things must not go
    traces: list[Trace] = field(default_factory=list)
    pads: list[Pad] = field(default_factory=list)
    palette: dict[str, np.ndarray] = field(default_factory=dict)

    def mark(self, mask: np.ndarray) -> None:
        np.maximum(self.occupied, (mask > 0).astype(np.uint8) * 255, out=self.occupied)

    def is_free(self, footprint: np.ndarray, margin: float) -> bool:
        """True if the footprint lies inside the board margin and touches nothing drawn yet."""
        x, y, w, h = cv2.boundingRect(footprint)
        if w == 0 or h == 0:
            return False
        if x < margin or y < margin or x + w - 1 > self.width - 1 - margin or y + h - 1 > self.height - 1 - margin:
            return False
        fp, occ = footprint[y:y + h, x:x + w], self.occupied[y:y + h, x:x + w]
        return cv2.countNonZero(cv2.bitwise_and(fp, occ)) == 0


# Solder-mask colours (OpenCV HSV hue range, saturation range, value range). "green" is the demo line;
# "varied" draws from all of them, for the base-detector corpus of `defectkit pretrain`.
MASK_STYLES: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "green": ((52, 72), (150, 225), (70, 135)),
    "blue": ((100, 122), (150, 230), (70, 140)),
    "red": ((0, 8), (150, 220), (80, 140)),
    "black": ((0, 180), (0, 60), (25, 55)),
    "purple": ((130, 150), (110, 200), (60, 120)),
    "white": ((0, 180), (0, 30), (170, 215)),
}
STYLES = ("green", "varied")


def _palette(rng: np.random.Generator, style: str = "green") -> dict[str, np.ndarray]:
    """Board-to-board variation of solder-mask, copper, hole and silkscreen colours (BGR)."""
    name = "green" if style == "green" else str(rng.choice(list(MASK_STYLES)))
    (h0, h1), (s0, s1), (v0, v1) = MASK_STYLES[name]
    hue = rng.uniform(h0, h1)
    sat = rng.uniform(s0, s1)
    val = rng.uniform(v0, v1)
    mask = cv2.cvtColor(np.uint8([[[hue, sat, val]]]), cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)
    copper = np.array([60, 130, 200], np.float32) + rng.uniform(-18, 18, 3).astype(np.float32)
    return {
        "mask": mask,
        "copper": np.clip(copper, 0, 255),
        "hole": np.full(3, rng.uniform(15, 40), np.float32),
        "silk": np.array([228, 232, 236], np.float32) + rng.uniform(-12, 8),
    }


def _offset_polyline(center: np.ndarray, off: float) -> np.ndarray:
    """Parallel polyline at signed distance ``off`` (mitred joints keep the spacing on diagonals)."""
    d = np.diff(center, axis=0)
    u = d / np.linalg.norm(d, axis=1, keepdims=True)
    n = np.stack([-u[:, 1], u[:, 0]], axis=1)
    out = [center[0] + off * n[0]]
    for j in range(1, len(center) - 1):
        m = n[j - 1] + n[j]
        m /= np.linalg.norm(m)
        out.append(center[j] + m * off / float(np.dot(m, n[j])))
    out.append(center[-1] + off * n[-1])
    return np.array(out)


def _route(rng: np.random.Generator, w: int, h: int, s: float) -> np.ndarray:
    """A bundle's centre line: straight, with a 45-degree jog, or an L with a 45-degree chamfer."""
    m = 14 * s
    kind = rng.choice(["straight", "jog", "ell"], p=[0.3, 0.4, 0.3])
    x0 = rng.uniform(m, 0.4 * w)
    x1 = rng.uniform(max(x0 + 0.35 * w, 0.6 * w), w - m)
    y = rng.uniform(m + 20 * s, h - m - 20 * s)
    if kind == "straight":
        pts = [(x0, y), (x1, y)]
    elif kind == "jog":
        jog = rng.uniform(14, 40) * s * rng.choice([-1, 1])
        xa = rng.uniform(x0 + 0.25 * (x1 - x0), x0 + 0.5 * (x1 - x0))
        pts = [(x0, y), (xa, y), (xa + abs(jog), y + jog), (x1, y + jog)]
    else:
        down = rng.choice([-1, 1])
        c = rng.uniform(10, 24) * s
        y_end = y + down * rng.uniform(0.3 * h, 0.6 * h)
        xa = x1 - c
        pts = [(x0, y), (xa, y), (x1, y + down * c), (x1, y_end)]
    pts = np.array(pts, dtype=np.float64)
    if rng.random() < 0.5:  # vertical-dominant variant
        pts = pts[:, ::-1] * np.array([w / h, h / w])
    if rng.random() < 0.5:
        pts = pts[::-1].copy()
    return pts


def _add_bundle(board: Board, rng: np.random.Generator, min_traces: int = 1) -> bool:
    s = board.scale
    n = int(rng.choice([1, 2, 3, 4], p=[0.15, 0.4, 0.3, 0.15]))
    n = max(n, min_traces)
    t = rng.uniform(5.5, 8.0) * s
    r_pad = t / 2 + rng.uniform(3.0, 4.5) * s
    gap = max(rng.uniform(8, 13) * s, 2 * r_pad + 4 * s - t)
    pitch = t + gap
    center = _route(rng, board.width, board.height, s)
    lines = [_offset_polyline(center, (i - (n - 1) / 2) * pitch) for i in range(n)]
    clear = 5 * s
    foot = np.zeros_like(board.occupied)
    for pts in lines:
        for k in range(len(pts) - 1):
            stroke(foot, pts[k], pts[k + 1], t + 2 * clear)
        for end in (pts[0], pts[-1]):
            fill_circle(foot, end, r_pad + clear)
    if not board.is_free(foot, margin=4 * s):
        return False
    bundle = max((tr.bundle for tr in board.traces), default=-1) + 1
    for i, pts in enumerate(lines):
        for k in range(len(pts) - 1):
            stroke(board.copper, pts[k], pts[k + 1], t)
            if 0 < k:
                fill_circle(board.copper, pts[k], t / 2)
        board.traces.append(Trace(pts, t, bundle, i, pitch))
        for end in (pts[0], pts[-1]):
            pad = Pad(end.copy(), r_pad, r_pad * rng.uniform(0.42, 0.55))
            fill_circle(board.copper, end, r_pad)
            board.pads.append(pad)
    board.mark(board.copper)
    return True


def _add_footprint(board: Board, rng: np.random.Generator) -> bool:
    """A row (or two rows) of through-hole pads with a silkscreen outline: a component footprint."""
    s = board.scale
    r = rng.uniform(5.0, 7.0) * s
    pitch = 2 * r + rng.uniform(5, 9) * s
    cols, rows = int(rng.integers(2, 7)), int(rng.choice([1, 2]))
    row_gap = pitch * rng.uniform(1.5, 3.0)
    wx, wy = (cols - 1) * pitch, (rows - 1) * row_gap
    vertical = rng.random() < 0.4
    x0 = rng.uniform(12 * s, board.width - 12 * s - (wy if vertical else wx))
    y0 = rng.uniform(12 * s, board.height - 12 * s - (wx if vertical else wy))
    centers = []
    for j in range(rows):
        for i in range(cols):
            a, b = i * pitch, j * row_gap
            centers.append(np.array([x0 + (b if vertical else a), y0 + (a if vertical else b)]))
    ext = np.array(centers)
    lo, hi = ext.min(0) - r - 4 * s, ext.max(0) + r + 4 * s
    foot = np.zeros_like(board.occupied)
    cv2.rectangle(foot, tuple(int(v) for v in lo - 4 * s), tuple(int(v) for v in hi + 4 * s), 255, -1)
    if not board.is_free(foot, margin=3 * s):
        return False
    hole_frac = rng.uniform(0.42, 0.55)
    for c in centers:
        fill_circle(board.copper, c, r)
        board.pads.append(Pad(c, r, r * hole_frac))
    cv2.rectangle(board.silk, tuple(int(v) for v in lo), tuple(int(v) for v in hi), 255, max(1, int(round(s))), cv2.LINE_AA)
    pin1 = lo + np.array([-2.5, -2.5]) * s
    fill_circle(board.silk, pin1, 1.5 * s)
    board.mark(board.copper)
    board.mark(foot)
    return True


def _add_label(board: Board, rng: np.random.Generator) -> bool:
    """A silkscreen reference designator such as R12 or U3."""
    s = board.scale
    text = f"{rng.choice(list('RCUDLJQ'))}{int(rng.integers(1, 40))}"
    font_scale = 0.32 * s * rng.uniform(0.9, 1.2)
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
    x = int(rng.uniform(4 * s, board.width - tw - 4 * s))
    y = int(rng.uniform(th + 4 * s, board.height - 4 * s))
    foot = np.zeros_like(board.occupied)
    pad = int(3 * s)
    cv2.rectangle(foot, (x - pad, y - th - pad), (x + tw + pad, y + pad), 255, -1)
    if not board.is_free(foot, margin=2 * s):
        return False
    cv2.putText(board.silk, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, font_scale, 255, 1, cv2.LINE_AA)
    board.mark(foot)
    return True


def _add_via(board: Board, rng: np.random.Generator) -> bool:
    s = board.scale
    r = rng.uniform(3.5, 4.5) * s
    c = rng.uniform([8 * s, 8 * s], [board.width - 8 * s, board.height - 8 * s])
    foot = np.zeros_like(board.occupied)
    fill_circle(foot, c, r + 5 * s)
    if not board.is_free(foot, margin=3 * s):
        return False
    fill_circle(board.copper, c, r)
    board.pads.append(Pad(c, r, r * 0.45))
    board.mark(board.copper)
    return True


def draw_board(rng: np.random.Generator, width: int, height: int, style: str = "green") -> Board:
    """A defect-free board: trace bundles, footprints, vias and silkscreen labels."""
    scale = min(width, height) / 320.0
    board = Board(
        width, height, scale,
        copper=np.zeros((height, width), np.uint8),
        silk=np.zeros((height, width), np.uint8),
        occupied=np.zeros((height, width), np.uint8),
        palette=_palette(rng, style),
    )
    area = width * height / (320.0 * 320.0)
    plans = [(_add_bundle, int(round(rng.integers(3, 6) * area))), (_add_footprint, int(round(rng.integers(1, 3) * area))),
             (_add_via, int(round(rng.integers(2, 6) * area))), (_add_label, int(round(rng.integers(2, 5) * area)))]
    for _ in range(40):  # the first bundle has at least two traces, so a short can always be placed
        if _add_bundle(board, rng, min_traces=2):
            break
    for add, wanted in plans:
        placed, tries = 0, 0
        while placed < wanted and tries < 12 * max(wanted, 1):
            placed += bool(add(board, rng))
            tries += 1
    return board


def _smooth_field(rng: np.random.Generator, h: int, w: int, cell: int = 40) -> np.ndarray:
    small = rng.normal(size=(h // cell + 2, w // cell + 2)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def render(board: Board, rng: np.random.Generator) -> np.ndarray:
    """Compose the BGR image: mask, copper, drill holes, silkscreen, then mild blur and noise."""
    h, w = board.height, board.width
    pal = board.palette
    img = np.empty((h, w, 3), np.float32)
    img[:] = pal["mask"]
    img *= (1.0 + 0.07 * _smooth_field(rng, h, w))[..., None]
    holes = np.zeros((h, w), np.uint8)
    for pad in board.pads:
        if pad.has_hole:
            fill_circle(holes, pad.center, pad.hole_radius)
    layers = [
        (board.copper, pal["copper"] * (1.0 + 0.05 * _smooth_field(rng, h, w, 24))[..., None]),
        (board.silk, pal["silk"]),
        (holes, pal["hole"]),
    ]
    for mask, colour in layers:
        a = (mask.astype(np.float32) / 255.0)[..., None]
        img = img * (1.0 - a) + colour * a
    img *= rng.uniform(0.85, 1.15)
    sigma = rng.uniform(0.5, 0.9) * board.scale
    img = cv2.GaussianBlur(img, (0, 0), sigma)
    img += rng.normal(0.0, rng.uniform(2.0, 5.0), img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)
