"""Synthetic board frames and model outputs for drift tests and the cost benchmark (not used at run time).

One board design (fixed layout seed) as a line would produce it, photographed with per-frame realism:
exposure and colour-temperature jitter, a few pixels of position jitter, sensor noise, defects drawn as
dark spots and scratches. The "model outputs" are drawn to match: true defects with confident scores
and low-score false positives. A :class:`SynthStyle` with other numbers makes a shifted line
(darker, blurred, a new defect look).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import cv2
import numpy as np

from edge_runtime.drift.features import frame_features, output_features
from edge_runtime.settings import RuntimeSettings


@dataclass(frozen=True)
class SynthStyle:
    """How a stream looks; the defaults are the in-distribution line."""

    gain: float = 1.0  # exposure multiplier
    gain_jitter: float = 0.03  # per-frame standard deviation of the exposure
    blur_sigma: float = 0.0  # Gaussian blur (out of focus)
    noise_sigma: float = 4.0  # sensor noise in grey levels
    defect_rate: float = 0.6  # mean true defects per frame (Poisson)
    defect_score: tuple[float, float] = (9.0, 2.0)  # Beta(a, b) of a true defect's score
    class_probs: tuple[float, ...] = (0.5, 0.3, 0.2)
    false_pos_rate: float = 1.5  # mean low-score detections per frame
    score_threshold: float = RuntimeSettings.score_threshold  # a detection at or above this makes the frame NG


IN_DISTRIBUTION = SynthStyle()
SHIFTED = SynthStyle(gain=0.6, blur_sigma=2.0, defect_rate=1.2, defect_score=(3.0, 3.0),
                     class_probs=(0.1, 0.2, 0.7), false_pos_rate=3.0)


@dataclass
class SynthFrame:
    image: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    ng: bool


@dataclass
class _Layout:
    pads: list[tuple[int, int, int, int]] = field(default_factory=list)
    chips: list[tuple[int, int, int, int]] = field(default_factory=list)
    traces: list[tuple[int, int, int, int]] = field(default_factory=list)


def _board_layout(size: int, seed: int = 0) -> _Layout:
    rng = np.random.default_rng(seed)
    lay = _Layout()
    for _ in range(4):
        x, y = rng.integers(20, size - 90, 2)
        lay.chips.append((int(x), int(y), int(x + rng.integers(30, 70)), int(y + rng.integers(20, 50))))
    for gx in range(24, size - 10, 32):
        for gy in range(24, size - 10, 48):
            if rng.random() < 0.6:
                lay.pads.append((gx, gy, gx + 8, gy + 5))
    for _ in range(14):
        x1, y1, x2, y2 = (int(v) for v in rng.integers(0, size, 4))
        lay.traces.append((x1, y1, x2, y1) if rng.random() < 0.5 else (x1, y1, x1, y2))
    return lay


class BoardStream:
    """A camera on one board line; each call to :meth:`next` is a new frame with its model outputs."""

    def __init__(self, style: SynthStyle = IN_DISTRIBUTION, seed: int = 0, size: int = 320):
        self.style = style
        self.size = size
        self.rng = np.random.default_rng(seed)
        self.layout = _board_layout(size)
        # a bank of sensor noise, cropped at a random offset per frame (drawing fresh noise costs ~3 ms)
        self._noise = (self.rng.normal(0.0, 1.0, (size + 64, size + 64, 3)) * style.noise_sigma).astype(np.int16)

    def _draw_board(self) -> np.ndarray:
        s = self.size
        img = np.empty((s, s, 3), np.uint8)
        img[:] = (40, 105, 35)  # solder-mask green (BGR)
        dx, dy = (int(v) for v in self.rng.integers(-3, 4, 2))
        for x1, y1, x2, y2 in self.layout.traces:
            cv2.line(img, (x1 + dx, y1 + dy), (x2 + dx, y2 + dy), (70, 150, 190), 2)
        for x1, y1, x2, y2 in self.layout.pads:
            cv2.rectangle(img, (x1 + dx, y1 + dy), (x2 + dx, y2 + dy), (185, 185, 180), -1)
        for x1, y1, x2, y2 in self.layout.chips:
            cv2.rectangle(img, (x1 + dx, y1 + dy), (x2 + dx, y2 + dy), (25, 25, 28), -1)
            cv2.putText(img, "U1", (x1 + dx + 4, y2 + dy - 6), cv2.FONT_HERSHEY_PLAIN, 0.8, (200, 200, 200), 1)
        return img

    def next(self) -> SynthFrame:
        st, rng, s = self.style, self.rng, self.size
        img = self._draw_board()
        n_true = int(rng.poisson(st.defect_rate))
        n_fp = int(rng.poisson(st.false_pos_rate))
        classes = rng.choice(len(st.class_probs), size=n_true, p=np.asarray(st.class_probs) / sum(st.class_probs))
        for c in classes:  # the defects the "model" finds are drawn into the image
            x, y = (int(v) for v in rng.integers(10, s - 10, 2))
            if c == 0:
                cv2.circle(img, (x, y), int(rng.integers(3, 7)), (20, 30, 20), -1)
            elif c == 1:
                cv2.line(img, (x, y), (x + int(rng.integers(-25, 25)), y + int(rng.integers(-25, 25))), (210, 220, 210), 1)
            else:
                cv2.ellipse(img, (x, y), (int(rng.integers(4, 10)), 3), float(rng.uniform(0, 180)), 0, 360, (60, 60, 110), -1)
        if st.blur_sigma > 0:
            img = cv2.GaussianBlur(img, (0, 0), st.blur_sigma)
        gains = st.gain * rng.normal(1.0, st.gain_jitter) * rng.normal(1.0, 0.015, 3)  # exposure, colour temperature
        ox, oy = (int(v) for v in rng.integers(0, 64, 2))
        out = img.astype(np.float32) * gains.astype(np.float32) + self._noise[oy:oy + s, ox:ox + s]
        image = np.clip(out, 0, 255).astype(np.uint8)
        true_scores = rng.beta(*st.defect_score, size=n_true)
        fp_scores = 0.01 + 0.5 * rng.beta(1.2, 8.0, size=n_fp)
        scores = np.concatenate([true_scores, fp_scores])
        ids = np.concatenate([classes, rng.integers(0, len(st.class_probs), n_fp)]).astype(np.int64)
        return SynthFrame(image, scores, ids, bool(np.any(scores >= st.score_threshold)))


def synthetic_features(n: int, seed: int, style: SynthStyle = IN_DISTRIBUTION, size: int = 320) -> Iterator[dict[str, float]]:
    """``n`` frames of :func:`frame_features` from a :class:`BoardStream`."""
    stream = BoardStream(style, seed, size)
    k = len(style.class_probs)
    for _ in range(n):
        f = stream.next()
        yield frame_features(f.image, f.scores, f.class_ids, k, f.ng)


def feature_dicts(n: int, seed: int = 0, num_classes: int = 2) -> Iterator[dict[str, float]]:
    """``n`` feature dicts without images (fast): independent numbers shaped like :func:`frame_features`."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        k = int(rng.poisson(1.0))
        scores = rng.uniform(0.05, 1.0, k)
        f = {"brightness": rng.normal(100, 5), "contrast": rng.normal(20, 2), "sharpness": rng.gamma(9, 90),
             "saturation": rng.normal(150, 3), "mean_b": rng.normal(40, 2), "mean_g": rng.normal(100, 3),
             "mean_r": rng.normal(42, 2)}
        f.update(output_features(scores, rng.integers(0, num_classes, k), num_classes, bool(np.any(scores >= RuntimeSettings.score_threshold))))
        yield f
