"""One inspected frame as a typed record, and the one place frames are counted and latency percentiles computed.

The inspection loop (:mod:`edge_runtime.run`) builds one :class:`FrameRecord` per frame and hands the same
object to every consumer: the local log (JSON line, NG image, CSV summary), the wire report builder and the
metrics server. None of them re-parses a dict. Each consumer counts its own window (a CSV row, a report
window, the process lifetime) with a :class:`FrameStats`, so frames / OK / NG / errors and the p50 / p95
latency follow one definition everywhere:

- a frame is OK or NG when it was inspected, an error when it was not (undecodable, backend failure);
  ``ok + ng + errors == frames``;
- its latency is ``FrameRecord.latency_ms``: the sum of its stage times, decode to report;
- percentiles interpolate linearly between the closest ranks (numpy's default), rounded to 3 decimals.
"""
from __future__ import annotations

import collections
import math
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Deque, Dict, Mapping, Optional, Sequence

if TYPE_CHECKING:  # annotations only: the report builder and /metrics use this module without numpy
    from edge_runtime.decision import Verdict
    from edge_runtime.postprocess import Detections

VERDICTS = ("OK", "NG")


@dataclass(frozen=True)
class FrameRecord:
    """What the loop decided about one frame. ``verdict`` is None when the frame was not inspected
    (``error`` says why); ``stages_ms`` are the per-stage times, ``latency_ms`` their sum."""

    index: int  # the frame id within its source
    source: str
    time: str  # ISO 8601 UTC of the capture
    bundle_version: str
    classes: tuple = ()  # the model's class names (class id order)
    detections: Optional[Detections] = None  # everything the model found (after NMS)
    decision: Optional[Verdict] = None  # OK / NG, the reason and which detections count; None = not inspected
    error: Optional[str] = None
    height: int = 0
    width: int = 0
    stages_ms: Mapping[str, float] = field(default_factory=dict)
    drift_state: str = "none"

    @property
    def verdict(self) -> Optional[str]:
        return None if self.decision is None else self.decision.verdict

    @property
    def inspected(self) -> bool:
        return self.verdict in VERDICTS

    @property
    def is_ng(self) -> bool:
        return self.verdict == "NG"

    @property
    def latency_ms(self) -> float:
        return float(sum(self.stages_ms.values()))

    @property
    def counted_classes(self) -> tuple:
        """Class names of the detections behind the verdict, one per detection."""
        if self.decision is None:
            return ()
        return tuple(self.classes[c] for c in self.decision.counted.class_ids.tolist() if 0 <= c < len(self.classes))

    def detection_records(self) -> list[dict[str, Any]]:
        """The wire form of the detections (``class_id``, ``class``, ``score``, ``box``)."""
        return [] if self.detections is None else self.detections.to_records(list(self.classes))

    def to_json(self) -> dict[str, Any]:
        """The JSON line of the local log (the same fields as ``predict`` writes)."""
        out: dict[str, Any] = {"time": self.time, "source": self.source, "index": self.index,
                               "bundle_version": self.bundle_version}
        if not self.inspected:
            out["error"] = self.error or "not inspected"
            return out
        latency = {k: round(v, 3) for k, v in self.stages_ms.items()}
        latency["total"] = round(self.latency_ms, 3)
        out.update({
            "height": self.height, "width": self.width,
            "detections": [{**r, "counted": bool(c)} for r, c in zip(self.detection_records(), self.decision.mask.tolist())],
            "verdict": self.verdict, "reason": self.decision.reason, "drift_state": self.drift_state,
            "latency_ms": latency,
        })
        return out


def percentile(sorted_values: Sequence[float], q: float) -> Optional[float]:
    """The q-quantile (0..1) of ascending values, linear between closest ranks; None without values."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_values) - 1)
    return round(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo), 3)


@dataclass(frozen=True)
class FrameCounts:
    """A snapshot of a :class:`FrameStats` window."""

    frames: int = 0
    ok: int = 0
    ng: int = 0
    errors: int = 0
    per_class: Mapping[str, int] = field(default_factory=dict)
    latency_ms_p50: Optional[float] = None
    latency_ms_p95: Optional[float] = None

    @property
    def ng_rate(self) -> float:
        return self.ng / max(1, self.ok + self.ng)


class FrameStats:
    """Counts frames, verdicts, per-class detections and keeps the last ``max_samples`` latencies; thread-safe.

    Memory stays flat over months: percentiles use the most recent ``max_samples`` inspected frames."""

    def __init__(self, max_samples: int = 10000) -> None:
        self.max_samples = max_samples
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        self._frames = self._ok = self._ng = self._errors = 0
        self._per_class: Dict[str, int] = {}
        self._lat: Deque[float] = collections.deque(maxlen=self.max_samples)

    def add(self, verdict: Optional[str], latency_ms: Optional[float] = None, classes: Sequence[str] = ()) -> None:
        """One frame: "OK", "NG" or None (not inspected); the counted detections' class names; its latency."""
        with self._lock:
            self._frames += 1
            if verdict not in VERDICTS:
                self._errors += 1
                return
            if verdict == "NG":
                self._ng += 1
            else:
                self._ok += 1
            for name in classes:
                self._per_class[name] = self._per_class.get(name, 0) + 1
            if latency_ms is not None:
                self._lat.append(float(latency_ms))

    def record(self, rec: FrameRecord) -> None:
        self.add(rec.verdict, rec.latency_ms if rec.inspected else None, rec.counted_classes)

    @property
    def frames(self) -> int:
        return self._frames

    def counts(self, reset: bool = False) -> FrameCounts:
        """The window so far (and start a new one when ``reset``)."""
        with self._lock:
            lat = sorted(self._lat)
            snap = FrameCounts(frames=self._frames, ok=self._ok, ng=self._ng, errors=self._errors,
                               per_class=dict(self._per_class), latency_ms_p50=percentile(lat, 0.5),
                               latency_ms_p95=percentile(lat, 0.95))
            if reset:
                self._clear()
        return snap
