"""Per-frame statistics that the drift monitor compares with the reference, cheap enough for every frame.

Input statistics are computed on a fixed-size downscaled copy of the frame the runtime already decoded
(about 0.2 ms for a 320 x 320 frame): the trainer computes the same numbers on the training images,
so both sides must call these functions, never a copy of them. Output statistics summarise a frame's
detections; they take plain numpy arrays so this module depends on no other part of the runtime.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import cv2
import numpy as np

from edge_runtime.errors import DataError

# Bump when any statistic changes meaning: a reference built with another version is refused on load.
FEATURES_VERSION = 1
# Input statistics are computed on a FEATURE_SIDE x FEATURE_SIDE copy, so sharpness does not depend on
# the camera resolution and the cost is fixed.
FEATURE_SIDE = 128

INPUT_FEATURES: tuple[str, ...] = (
    "brightness",  # mean luma (0..255)
    "contrast",  # standard deviation of luma
    "sharpness",  # variance of the Laplacian of luma (focus, blur, motion)
    "saturation",  # mean HSV saturation (0..255): colour cast, washed-out lighting
    "mean_b",  # per-channel means: the colour balance of the lighting
    "mean_g",
    "mean_r",
)
OUTPUT_FEATURES: tuple[str, ...] = (
    "score_max",  # highest detection score in the frame, 0 when nothing was detected
    "score_mean",  # mean score of the frame's detections, NaN when there are none (skipped by detectors)
    "n_detections",  # detections per frame
)
NG_KEY = "ng"  # 1.0 when the frame's verdict was NG


def class_key(class_id: int) -> str:
    """Feature key of the per-frame count of one class."""
    return f"class_{class_id}"


@dataclass(frozen=True)
class CategoricalGroup:
    """Per-frame counts that the monitor sums over the window and compares as one categorical law.

    With ``complement`` the group is an indicator: one more category counts 1 - sum(keys) per frame
    (the OK frames of the NG flag).
    """

    name: str
    keys: tuple[str, ...]
    labels: tuple[str, ...]
    complement: bool = False


@dataclass(frozen=True)
class FeatureLayout:
    """Which keys of a frame's feature dict are compared as distributions and which as categories."""

    continuous: tuple[str, ...]
    categorical: tuple[CategoricalGroup, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        out = list(self.continuous)
        for group in self.categorical:
            out.extend(group.keys)
        return tuple(out)


def feature_layout(num_classes: int, class_names: Sequence[str] | None = None) -> FeatureLayout:
    """The layout for a model with ``num_classes`` classes (labels default to the class keys)."""
    names = list(class_names) if class_names is not None else [class_key(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise DataError(f"feature layout: {len(names)} class names given for {num_classes} classes; pass one name per class.")
    classes = CategoricalGroup("class_mix", tuple(class_key(i) for i in range(num_classes)), tuple(names))
    ng = CategoricalGroup("ng_rate", (NG_KEY,), ("ok", "ng"), complement=True)
    return FeatureLayout(INPUT_FEATURES + OUTPUT_FEATURES, (classes, ng) if num_classes > 0 else (ng,))


def _downscale(image: np.ndarray) -> np.ndarray:
    """A FEATURE_SIDE x FEATURE_SIDE copy, fast for any input size.

    cv2's area resize is fast only at exactly half size (320 -> 128 directly costs 0.6 ms), so: a large
    frame is first decimated to a short side of 2 x FEATURE_SIDE (nearest pixels, cheap), halved with area
    averaging while it stays at least twice the target, then resized linearly to the exact square.
    The same steps run on the trainer and on the box, so both compute the same numbers.
    """
    side = FEATURE_SIDE
    h, w = image.shape[:2]
    if min(h, w) >= 4 * side:
        scale = 2 * side / min(h, w)
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_NEAREST)
        h, w = image.shape[:2]
    while min(h, w) >= 2 * side:
        h, w = h - h % 2, w - w % 2
        image = cv2.resize(image[:h, :w], (w // 2, h // 2), interpolation=cv2.INTER_AREA)
        h, w = image.shape[:2]
    if h != side or w != side:
        image = cv2.resize(image, (side, side), interpolation=cv2.INTER_LINEAR)
    return image


def input_features(image_bgr: np.ndarray) -> dict[str, float]:
    """Brightness, contrast, sharpness and colour of a decoded uint8 frame (BGR, BGRA or grey)."""
    if not isinstance(image_bgr, np.ndarray) or image_bgr.size == 0:
        raise DataError(
            f"drift features: expected a decoded image as a non-empty numpy array, got {type(image_bgr).__name__}"
            f"{'' if not isinstance(image_bgr, np.ndarray) else ' of shape ' + str(image_bgr.shape)}; "
            "pass the frame the runtime decoded (cv2.imread / VideoCapture.read)."
        )
    if image_bgr.dtype != np.uint8:
        raise DataError(
            f"drift features: expected a uint8 image, got dtype {image_bgr.dtype}; "
            "convert with cv2.convertScaleAbs or np.clip(...).astype(np.uint8) first."
        )
    channels = 1 if image_bgr.ndim == 2 else (image_bgr.shape[2] if image_bgr.ndim == 3 else -1)
    if channels not in (1, 3, 4):
        raise DataError(
            f"drift features: expected an H x W grey or H x W x 3 BGR image, got shape {image_bgr.shape}."
        )
    small = _downscale(image_bgr)
    if small.ndim == 3 and small.shape[2] == 1:
        small = small[:, :, 0]
    if channels == 4:
        small = cv2.cvtColor(small, cv2.COLOR_BGRA2BGR)
    if small.ndim == 2:
        grey = small
        mean_b = mean_g = mean_r = float(grey.mean())
        saturation = 0.0
    else:
        grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
        mean_b, mean_g, mean_r, _ = cv2.mean(small)
        saturation = cv2.mean(cv2.cvtColor(small, cv2.COLOR_BGR2HSV))[1]
    mean, std = cv2.meanStdDev(grey)
    _, lap_std = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_16S))
    return {
        "brightness": float(mean[0, 0]),
        "contrast": float(std[0, 0]),
        "sharpness": float(lap_std[0, 0]) ** 2,
        "saturation": float(saturation),
        "mean_b": float(mean_b),
        "mean_g": float(mean_g),
        "mean_r": float(mean_r),
    }


def output_features(
    detections_scores: np.ndarray | Sequence[float],
    class_ids: np.ndarray | Sequence[int],
    num_classes: int,
    verdict_ng: bool,
) -> dict[str, float]:
    """Score summary, detections per frame, per-class counts and the NG flag of one frame.

    Pass the detections the runtime decided on (after NMS, ROI and minimum area), with whatever score
    floor the runtime uses; the trainer must use the same floor when it builds the reference.
    """
    scores = np.asarray(detections_scores, dtype=np.float64).ravel()
    ids = np.asarray(class_ids).ravel()
    if scores.size != ids.size:
        raise DataError(
            f"drift features: {scores.size} detection scores but {ids.size} class ids; pass one class id per detection."
        )
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        if not np.all(np.equal(np.mod(ids, 1), 0)):
            raise DataError(f"drift features: class ids must be whole numbers, got {ids[:5].tolist()}.")
        ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        raise DataError(
            f"drift features: class id {int(ids.max() if ids.max() >= num_classes else ids.min())} is outside "
            f"0..{num_classes - 1}; num_classes must be the bundle's class count."
        )
    if scores.size and not np.all(np.isfinite(scores)):
        raise DataError("drift features: a detection score is NaN or infinite; check the backend's output.")
    out: dict[str, float] = {
        "score_max": float(scores.max()) if scores.size else 0.0,
        "score_mean": float(scores.mean()) if scores.size else math.nan,
        "n_detections": float(scores.size),
    }
    counts = np.bincount(ids.astype(np.int64), minlength=num_classes) if ids.size else np.zeros(num_classes)
    for i in range(num_classes):
        out[class_key(i)] = float(counts[i])
    out[NG_KEY] = 1.0 if verdict_ng else 0.0
    return out


def frame_features(
    image_bgr: np.ndarray,
    detections_scores: np.ndarray | Sequence[float],
    class_ids: np.ndarray | Sequence[int],
    num_classes: int,
    verdict_ng: bool,
) -> dict[str, float]:
    """All statistics of one frame: :func:`input_features` and :func:`output_features` in one dict."""
    out = input_features(image_bgr)
    out.update(output_features(detections_scores, class_ids, num_classes, verdict_ng))
    return out


def check_frame(features: Mapping[str, float], keys: Sequence[str], where: str) -> None:
    """Refuse a feature dict that lacks a key the layout needs (names the first missing key)."""
    for key in keys:
        if key not in features:
            raise DataError(
                f"{where}: feature '{key}' is missing (got {sorted(features)[:12]}); build every frame's "
                "features with edge_runtime.drift.frame_features and the bundle's class count."
            )
