"""Hard examples: frames the model was unsure about, sampled for labelling and the next retrain.

A frame is "hard" when its highest detection score lies in a band around the decision threshold
(``low <= max score < high``): those are the parts where the verdict could have gone either way.
A sliding one-hour rate limit keeps a noisy line from filling the spool with near-duplicates.
The metadata schema and its validator live here because the collector validates with the same code.
"""
from __future__ import annotations

import collections
import time
import uuid
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence

from .errors import UserInputError
from .wire_report import NAME_RE, parse_utc, utc_iso
from .spool import Spool

SCHEMA = "defectkit.hard_example/1"
_META_KEYS = ("schema", "id", "device_id", "line", "bundle_version", "time", "max_score", "detections")
_OPTIONAL_KEYS = ("source", "width", "height", "verdict")
PRELABEL_SOURCE = "defectkit hard examples (model pre-labels)"
"""COCO ``info.description`` of a hard-example export (fleet.labelling); training refuses it while unreviewed."""


def unreviewed_prelabels(coco: Mapping[str, Any]) -> bool:
    """True for a pre-label export nobody has reviewed yet: training on it would teach the model its own output."""
    info = coco.get("info") or {}
    return info.get("description") == PRELABEL_SOURCE and info.get("reviewed") is False


class HardExampleSampler:
    """``HardExampleSampler(low, high, max_per_hour)``: which frames to keep for labelling."""

    def __init__(self, low: float, high: float, max_per_hour: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not (0.0 <= low < high <= 1.0):
            raise UserInputError(f"hard-example band [{low}, {high}) is not usable: need 0 <= low < high <= 1 "
                                 f"(e.g. threshold 0.5 -> low 0.3, high 0.7)")
        if max_per_hour < 0:
            raise UserInputError(f"hard-example max_per_hour must be >= 0, got {max_per_hour}")
        self.low, self.high, self.max_per_hour = float(low), float(high), int(max_per_hour)
        self._clock = clock
        self._taken: Deque[float] = collections.deque()
        self.sampled = 0
        self.rate_limited = 0

    def in_band(self, max_score: float) -> bool:
        return self.low <= max_score < self.high

    def should_sample(self, max_score: float) -> bool:
        """True (and counted against the rate limit) when this frame should be kept."""
        if not self.in_band(max_score):
            return False
        now = self._clock()
        while self._taken and now - self._taken[0] >= 3600.0:
            self._taken.popleft()
        if len(self._taken) >= self.max_per_hour:
            self.rate_limited += 1
            return False
        self._taken.append(now)
        self.sampled += 1
        return True

    def offer(self, spool: Spool, *, image: Any, detections: Sequence[Mapping[str, Any]], device_id: str, line: str,
              bundle_version: str, source: Optional[str] = None, verdict: Optional[str] = None,
              jpeg_quality: int = 90) -> Optional[str]:
        """Spool the frame if it is a hard example; returns its id or None. May raise SpoolFullError."""
        max_score = max((float(d["score"]) for d in detections), default=0.0)
        if not self.should_sample(max_score):
            return None
        return spool_hard_example(spool, image=image, detections=detections, device_id=device_id, line=line,
                                  bundle_version=bundle_version, source=source, verdict=verdict,
                                  jpeg_quality=jpeg_quality)


def encode_jpeg(image: Any, quality: int = 90) -> bytes:
    """JPEG bytes of a BGR uint8 image (numpy array) through OpenCV; bytes pass through unchanged."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    import cv2  # the edge box has opencv-python-headless; imported here so the spool works without it

    ok, buf = cv2.imencode(".jpg", image, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise UserInputError(f"cannot encode a frame of shape {getattr(image, 'shape', '?')} as JPEG")
    return buf.tobytes()


def spool_hard_example(spool: Spool, *, image: Any, detections: Sequence[Mapping[str, Any]], device_id: str,
                       line: str, bundle_version: str, source: Optional[str] = None, verdict: Optional[str] = None,
                       at: Optional[float] = None, jpeg_quality: int = 90) -> str:
    """Save one frame (JPEG) and its metadata to the spool; returns the hard example's id."""
    jpeg = encode_jpeg(image, jpeg_quality)
    shape = getattr(image, "shape", None)
    # a detector's box may reach past the frame (PP-YOLOE does not clip): clipped to the image, the form the
    # collector accepts (0 <= x1 <= x2 <= width, 0 <= y1 <= y2 <= height) and a labelling tool draws
    w, h = (float(shape[1]), float(shape[0])) if shape is not None else (float("inf"), float("inf"))
    dets = [{"class": str(d["class"]), "score": float(d["score"]), "box": _clip([float(v) for v in d["box"]], w, h)}
            for d in detections]
    meta: Dict[str, Any] = {
        "schema": SCHEMA, "id": uuid.uuid4().hex, "device_id": device_id, "line": line,
        "bundle_version": bundle_version, "time": utc_iso(at),
        "max_score": max((d["score"] for d in dets), default=0.0), "detections": dets,
    }
    if shape is not None:
        meta["height"], meta["width"] = int(shape[0]), int(shape[1])
    if source is not None:
        meta["source"] = str(source)
    if verdict is not None:
        meta["verdict"] = str(verdict)
    validate_hard_example_meta(meta)
    spool.put("hard_example", jpeg, key=meta["id"], meta=meta)
    return meta["id"]


def _clip(box: List[float], width: float, height: float) -> List[float]:
    x1, y1, x2, y2 = (min(max(v, 0.0), lim) for v, lim in zip(box, (width, height, width, height)))
    return [round(x1, 2), round(y1, 2), round(max(x1, x2), 2), round(max(y1, y2), 2)]


def hard_example_errors(meta: Any) -> List[str]:
    """Every way ``meta`` breaks ``defectkit.hard_example/1`` (empty = valid)."""
    if not isinstance(meta, dict):
        return [f"hard-example metadata must be a JSON object, got {type(meta).__name__}"]
    errs: List[str] = []
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        errs.append(f"missing keys: {', '.join(missing)}")
    unknown = sorted(set(meta) - set(_META_KEYS) - set(_OPTIONAL_KEYS))
    if unknown:
        errs.append(f"unknown keys: {', '.join(unknown)}")
    if meta.get("schema", SCHEMA) != SCHEMA:
        errs.append(f"schema must be {SCHEMA!r}, got {meta['schema']!r}")
    hid = meta.get("id", "0" * 32)
    if not (isinstance(hid, str) and len(hid) == 32 and all(c in "0123456789abcdef" for c in hid)):
        errs.append(f"id must be 32 lowercase hex characters, got {hid!r}")
    for key in ("device_id", "line"):
        if key in meta and not (isinstance(meta[key], str) and NAME_RE.fullmatch(meta[key])):
            errs.append(f"{key} must be 1-64 letters, digits, '.', '_' or '-', got {meta[key]!r}")
    if "time" in meta:
        try:
            parse_utc(meta["time"])
        except (TypeError, ValueError, AttributeError) as exc:
            errs.append(f"time must be ISO 8601 UTC ({exc})")
    if "max_score" in meta and not (isinstance(meta["max_score"], (int, float)) and 0 <= meta["max_score"] <= 1):
        errs.append(f"max_score must be a number in [0, 1], got {meta['max_score']!r}")
    dets = meta.get("detections", [])
    if not isinstance(dets, list):
        errs.append("detections must be a list of {class, score, box}")
    else:
        for i, d in enumerate(dets):
            if not (isinstance(d, dict) and isinstance(d.get("class"), str) and isinstance(d.get("score"), (int, float))
                    and isinstance(d.get("box"), list) and len(d["box"]) == 4):
                errs.append(f"detections[{i}] must be {{class: str, score: number, box: [x1, y1, x2, y2]}}, got {d!r}")
    return errs


def validate_hard_example_meta(meta: Any, where: str = "hard example") -> dict:
    errs = hard_example_errors(meta)
    if errs:
        raise UserInputError(f"{where} does not follow {SCHEMA}: " + "; ".join(errs))
    return meta

