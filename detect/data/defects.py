"""The six PKU-Market-PCB defect types, painted into a board's masks before it is rendered.

Each planner looks at the board and returns a :class:`Plan` (the defect's tight box and a function
that paints it) or ``None`` when it found no place; nothing is painted until the caller accepts the
box (it must not overlap another defect). Shapes are chosen to be unlike every normal feature:
a pad without a hole, round notches in a trace edge, a gap across a trace, a bridge between two
parallel traces, a thin triangle sticking out of a trace, an irregular copper blob on bare mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .board import Board, Trace, fill_circle, fill_poly

DEFECT_CLASSES = ("missing_hole", "mouse_bite", "open_circuit", "short", "spur", "spurious_copper")

Box = tuple  # (x0, y0, x1, y1) in pixels, tight around the defect


@dataclass
class Plan:
    box: Box
    paint: Callable[[], None]


def _box_of(points: np.ndarray) -> Box:
    p = np.asarray(points, float).reshape(-1, 2)
    return (float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()), float(p[:, 1].max()))


def _point_on_trace(board: Board, rng: np.random.Generator, need: float, traces: list[Trace] | None = None):
    """A point on a straight part of a trace, at least ``need`` px from pads and joints."""
    traces = traces if traces is not None else board.traces
    if not traces:
        return None
    tr = traces[int(rng.integers(len(traces)))]
    segs = [seg for seg in tr.segments()]
    k, p0, u, n, length = segs[int(rng.integers(len(segs)))]
    last = len(tr.points) - 2
    pad_r = max((p.radius for p in board.pads if np.allclose(p.center, tr.points[0])), default=tr.thickness)
    lo = need + (pad_r + 3 * board.scale if k == 0 else tr.thickness)
    hi = length - need - (pad_r + 3 * board.scale if k == last else tr.thickness)
    if hi <= lo:
        return None
    return tr, k, p0 + u * rng.uniform(lo, hi), u, n


def _free_along(board: Board, start: np.ndarray, direction: np.ndarray, dist: float, half_width: float) -> bool:
    """True if no copper or silk lies in the strip from ``start`` along ``direction`` for ``dist`` px."""
    side = np.array([-direction[1], direction[0]])
    for t in np.arange(0.0, dist + 1e-6, 1.0):
        for o in (-half_width, 0.0, half_width):
            x, y = np.round(start + direction * t + side * o).astype(int)
            if not (0 <= x < board.width and 0 <= y < board.height) or board.occupied[y, x]:
                return False
    return True


def plan_missing_hole(board: Board, rng: np.random.Generator) -> Optional[Plan]:
    pads = [p for p in board.pads if p.has_hole and p.radius >= 5.0 * board.scale]
    if not pads:
        return None
    pad = pads[int(rng.integers(len(pads)))]
    r = pad.radius

    def paint() -> None:
        pad.has_hole = False

    return Plan((pad.center[0] - r, pad.center[1] - r, pad.center[0] + r, pad.center[1] + r), paint)


def plan_mouse_bite(board: Board, rng: np.random.Generator) -> Optional[Plan]:
    s = board.scale
    found = _point_on_trace(board, rng, need=12 * s)
    if found is None:
        return None
    tr, _, p, u, n = found
    t = tr.thickness
    rn = max(rng.uniform(0.5, 0.65) * t, 3.0 * s)
    count = int(rng.integers(2, 4))
    step = 2.1 * rn
    side = rng.choice([-1.0, 1.0])  # one edge only: bites on both edges would look like an open circuit
    depth_shift = rng.uniform(0.0, 0.2) * rn
    centers = []
    for i in range(count):
        along = (i - (count - 1) / 2) * step + rng.uniform(-0.15, 0.15) * rn
        centers.append((p + u * along + n * side * (t / 2 + depth_shift), rn * rng.uniform(0.9, 1.1)))
    extent = (count - 1) / 2 * step + rn
    box = _box_of([p + u * extent + n * t / 2, p - u * extent - n * t / 2, p + u * extent - n * t / 2, p - u * extent + n * t / 2])

    def paint() -> None:
        for c, r in centers:
            fill_circle(board.copper, c, r, 0)

    return Plan(box, paint)


def plan_open_circuit(board: Board, rng: np.random.Generator) -> Optional[Plan]:
    s = board.scale
    found = _point_on_trace(board, rng, need=10 * s)
    if found is None:
        return None
    tr, _, p, u, n = found
    t = tr.thickness
    gap = rng.uniform(6.0, 11.0) * s
    tilt = rng.uniform(-0.35, 0.35)  # a slanted cut
    across = n + u * tilt
    half = t / 2 + 1.0 * s
    j = rng.uniform(-0.6, 0.6, 4) * s  # ragged cut edges
    quad = np.array([
        p - u * gap / 2 + across * half + u * j[0],
        p + u * gap / 2 + across * half + u * j[1],
        p + u * gap / 2 - across * half + u * j[2],
        p - u * gap / 2 - across * half + u * j[3],
    ])
    box = _box_of(np.vstack([quad, p + n * t / 2, p - n * t / 2]))

    def paint() -> None:
        fill_poly(board.copper, quad, 0)

    return Plan(box, paint)


def plan_short(board: Board, rng: np.random.Generator) -> Optional[Plan]:
    s = board.scale
    bundles: dict[int, list[Trace]] = {}
    for tr in board.traces:
        bundles.setdefault(tr.bundle, []).append(tr)
    firsts = [tr for trs in bundles.values() for tr in trs if any(o.index == tr.index + 1 for o in trs)]
    found = _point_on_trace(board, rng, need=8 * s, traces=firsts)
    if found is None:
        return None
    tr, _, p, u, n = found
    t = tr.thickness
    width = rng.uniform(4.0, 8.0) * s
    a, b = p + n * (t / 2 - 1.0), p + n * (tr.pitch - t / 2 + 1.0)
    j = rng.uniform(-0.25, 0.25, 4) * width
    quad = np.array([a - u * (width / 2 + j[0]), a + u * (width / 2 + j[1]), b + u * (width / 2 + j[2]), b - u * (width / 2 + j[3])])
    box = _box_of(np.vstack([quad, p - n * t / 2, p + n * (tr.pitch + t / 2)]))

    def paint() -> None:
        fill_poly(board.copper, quad, 255)
        board.mark(board.copper)

    return Plan(box, paint)


def plan_spur(board: Board, rng: np.random.Generator) -> Optional[Plan]:
    s = board.scale
    found = _point_on_trace(board, rng, need=6 * s)
    if found is None:
        return None
    tr, _, p, u, n = found
    t = tr.thickness
    side = rng.choice([-1.0, 1.0])
    length = rng.uniform(10.0, 17.0) * s
    angle = rng.uniform(-0.5, 0.5)
    d = n * side * np.cos(angle) + u * np.sin(angle)
    base = p + n * side * (t / 2 - 1.0)
    if not _free_along(board, p + n * side * (t / 2 + 2.0 * s), d, length + 5.0 * s, 3.0 * s):
        return None
    half_base = rng.uniform(2.0, 3.2) * s
    tri = np.array([base - u * half_base, base + u * half_base, base + d * length])
    box = _box_of(np.vstack([tri, p]))  # from the trace centre to the tip

    def paint() -> None:
        fill_poly(board.copper, tri, 255)
        board.mark(board.copper)

    return Plan(box, paint)


def plan_spurious_copper(board: Board, rng: np.random.Generator) -> Optional[Plan]:
    s = board.scale
    radius = rng.uniform(6.0, 13.0) * s
    c = rng.uniform([12 * s, 12 * s], [board.width - 12 * s, board.height - 12 * s])
    k = int(rng.integers(7, 12))
    angles = np.sort(rng.uniform(0, 2 * np.pi, k))
    radii = radius * rng.uniform(0.45, 1.0, k)
    blob = c + np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1)
    foot = np.zeros_like(board.occupied)
    fill_circle(foot, c, radius + 5.0 * s)
    if not board.is_free(foot, margin=2 * s):
        return None

    def paint() -> None:
        fill_poly(board.copper, blob, 255)
        board.mark(foot)

    return Plan(_box_of(blob), paint)


PLANNERS: dict[str, Callable[[Board, np.random.Generator], Optional[Plan]]] = {
    "missing_hole": plan_missing_hole,
    "mouse_bite": plan_mouse_bite,
    "open_circuit": plan_open_circuit,
    "short": plan_short,
    "spur": plan_spur,
    "spurious_copper": plan_spurious_copper,
}


def finish_box(box: Box, board: Board, margin: float = 3.0, min_side: float = 16.0) -> Box:
    """Add a small margin, enforce a minimum side (scaled with the board), clip to the image."""
    s = board.scale
    x0, y0, x1, y1 = box[0] - margin * s, box[1] - margin * s, box[2] + margin * s, box[3] + margin * s
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, min_side * s), max(y1 - y0, min_side * s)
    x0, x1 = max(0.0, cx - w / 2), min(float(board.width), cx + w / 2)
    y0, y1 = max(0.0, cy - h / 2), min(float(board.height), cy + h / 2)
    return (x0, y0, x1, y1)


def _overlaps(a: Box, b: Box, pad: float) -> bool:
    return not (a[2] + pad <= b[0] or b[2] + pad <= a[0] or a[3] + pad <= b[1] or b[3] + pad <= a[1])


def add_defects(board: Board, rng: np.random.Generator, wanted: list[str], attempts: int = 40) -> list[tuple[str, Box]]:
    """Paint the wanted defects where they fit; returns (class name, final box) for each one placed."""
    placed: list[tuple[str, Box]] = []
    for name in wanted:
        planner = PLANNERS[name]
        for _ in range(attempts):
            plan = planner(board, rng)
            if plan is None:
                continue
            box = finish_box(plan.box, board)
            if any(_overlaps(box, other, 3.0 * board.scale) for _, other in placed):
                continue
            plan.paint()
            placed.append((name, box))
            break
    return placed
