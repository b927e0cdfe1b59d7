"""The one pre-processing of the kit: the trainer's evaluation and the edge box run the same steps.

It reproduces PaddleDetection's PP-YOLOE TestReader (``Decode -> Resize{keep_ratio: false} ->
NormalizeImage{is_scale: true} -> Permute``) without importing ppdet, and :func:`ppdet_test_transforms`
gives the trainer that reader's configuration built from the same :class:`InputSpec`, so the two sides
cannot drift apart (tests compare both on real images).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import cv2
import numpy as np

from edge_runtime.errors import ConfigError, DataError
from edge_runtime.modelspec import InputSpec


def as_bgr(image: np.ndarray, where: str = "image") -> np.ndarray:
    """Accept what cameras and cv2 give (H,W,3 BGR; grey H,W or H,W,1; BGRA) and return H,W,3 uint8 BGR."""
    if not isinstance(image, np.ndarray):
        raise DataError(f"{where}: expected a numpy image as cv2.imread returns it, got {type(image).__name__}.")
    if image.dtype != np.uint8:
        raise DataError(f"{where}: expected 8-bit pixels (uint8), got {image.dtype}. Convert with cv2.convertScaleAbs.")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"{where}: expected an H x W x 3 BGR image, got shape {image.shape}.")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise DataError(f"{where}: empty image of shape {image.shape}.")
    return image


def preprocess(image_bgr: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    """BGR uint8 image -> (image [1,3,h,w] float32, scale_factor [1,2] float32 = [[h/H, w/W]]).

    Steps, in ppdet's order: colour to ``spec.color``, stretch-resize to (w, h) with ``spec.interp``,
    ``* scale``, ``- mean``, ``/ std``, HWC -> CHW. The per-pixel arithmetic (:func:`normalize`) depends only
    on the channel and the 8-bit value, so it is computed once per spec for the 256 values of each channel
    and applied as a lookup table (``cv2.LUT``, plane by plane straight into the CHW array): the same floats
    bit for bit, with a tenth of the CPU and no full-size temporaries, and OpenCV releases the GIL while it
    runs, so the edge loop's inference thread is not held up by its reader thread.
    """
    image = as_bgr(image_bgr)
    src_h, src_w = image.shape[:2]
    dst_h, dst_w = spec.size
    if (src_h, src_w) != (dst_h, dst_w):
        image = cv2.resize(image, (dst_w, dst_h), interpolation=spec.cv2_interp)
    tables = _tables(spec)
    planes = cv2.split(image)  # B, G, R
    order = (2, 1, 0) if spec.color == "RGB" else (0, 1, 2)  # an exact channel swap, as cvtColor BGR2RGB is
    chw = np.empty((1, 3, dst_h, dst_w), dtype=np.float32)
    for c, src in enumerate(order):
        cv2.LUT(planes[src], tables[c], dst=chw[0, c])
    scale_factor = np.array([[dst_h / src_h, dst_w / src_w]], dtype=np.float32)
    return chw, scale_factor


def normalize(hwc: np.ndarray, spec: InputSpec) -> np.ndarray:
    """ppdet's NormalizeImage on an H,W,3 uint8 image already in ``spec.color`` order: float32 multiply by
    the scale, float64 mean/std applied in place (float32 result). The definition the tables are built from."""
    out = hwc.astype(np.float32)
    out *= np.float32(spec.scale)
    if any(spec.mean):
        out -= np.asarray(spec.mean, dtype=np.float64)[None, None, :]
    if any(s != 1.0 for s in spec.std):
        out /= np.asarray(spec.std, dtype=np.float64)[None, None, :]
    return out


@functools.lru_cache(maxsize=16)
def _tables(spec: InputSpec) -> tuple[np.ndarray, ...]:
    """One [1,256] float32 table per output channel: :func:`normalize` of every 8-bit value."""
    values = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # [1,256,3]
    table = normalize(values, spec)[0]  # [256,3]
    return tuple(np.ascontiguousarray(table[:, c]).reshape(1, 256) for c in range(3))


def model_feeds(image_bgr: np.ndarray, spec: InputSpec, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The feed dict a model takes for one image: :func:`preprocess`, then the arrays of the model's input
    ``names`` (``image``, ``scale_factor``). The one feed builder of the kit: the box, calibration, latency,
    Paddle Lite and QAT checks all call it, so no caller can feed a model differently."""
    image, scale_factor = preprocess(image_bgr, spec)
    available = {"image": image, "scale_factor": scale_factor}
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ConfigError(f"the model asks for inputs {unknown}; the kit provides {sorted(available)}. "
                          "Re-export it with `defectkit export`.")
    return {n: available[n] for n in names}


def ppdet_test_transforms(spec: InputSpec) -> list[dict[str, Any]]:
    """PaddleDetection ``TestReader.sample_transforms`` equivalent to :func:`preprocess` for this spec.

    The trainer puts this list in its reader config (or builds the operators from it), so evaluation
    sees exactly the input the edge box computes.
    """
    if spec.color != "RGB":
        raise ConfigError("ppdet's Decode always yields RGB: a 'BGR' input spec has no TestReader equivalent.")
    if math.isclose(spec.scale, 1.0 / 255.0, rel_tol=1e-12):
        is_scale = True
    elif spec.scale == 1.0:
        is_scale = False
    else:
        raise ConfigError(
            f"input scale {spec.scale} has no ppdet NormalizeImage equivalent (it scales by 1/255 or not at all): "
            "use scale 1/255 and fold other factors into mean/std."
        )
    return [
        {"Decode": {}},
        {"Resize": {"target_size": [spec.height, spec.width], "keep_ratio": False, "interp": spec.cv2_interp}},
        {"NormalizeImage": {"mean": list(spec.mean), "std": list(spec.std), "is_scale": is_scale}},
        {"Permute": {}},
    ]
