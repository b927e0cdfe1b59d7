"""Builds the wire reports of :mod:`edge_runtime.wire_report` from the inspection loop's frames.

Kept apart from the schema module so that the schema (what the collector and the box agree on) imports the
standard library only; this builder needs the loop's frame records and statistics.
"""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any, List, Mapping, Optional

from .errors import UserInputError
from .inspection import FrameRecord, FrameStats
from .wire_report import NAME_RE, Counts, Drift, Health, Report, Window, utc_iso


class ReportBuilder:
    """Counts frames over one window and turns them into a :class:`Report`; thread-safe.

    The inspection loop hands each :class:`~edge_runtime.inspection.FrameRecord` to :meth:`record` and calls
    :meth:`build` at the report interval or at once on an alarm; ``build`` starts the next window. Counts and
    latency percentiles come from a :class:`~edge_runtime.inspection.FrameStats` (the same definition as the
    local CSV summary and /metrics), over the last ``max_latency_samples`` frames so memory stays flat.
    """

    def __init__(self, *, device_id: str, line: str, bundle_version: str, spool_dir: str | Path | None = None,
                 max_latency_samples: int = 10000, clock=time.time) -> None:
        for key, val in (("device_id", device_id), ("line", line)):
            if not NAME_RE.fullmatch(str(val)):
                raise UserInputError(f"{key} {val!r} is not usable: use 1-64 letters, digits, '.', '_' or '-'")
        self.device_id, self.line, self.bundle_version = device_id, line, bundle_version
        # which variant of the bundle runs and its measured speed (edge_runtime.variant_choice.health_fields): in
        # every report's health, as extra keys (the wire schema's top level is fixed; health takes extra scalars)
        self.variant_health: dict[str, Any] = {}
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None
        self._clock = clock
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._stats = FrameStats(max_latency_samples)
        self._window_start = clock()

    def record(self, rec: FrameRecord) -> None:
        """One frame of the loop, inspected or not."""
        self._stats.record(rec)

    def record_frame(self, *, ng: bool, classes: List[str] | tuple = (), latency_ms: float | None = None) -> None:
        """One inspected image given by its parts: verdict, class names of the counted detections, latency."""
        self._stats.add("NG" if ng else "OK", latency_ms, classes)

    def record_error(self) -> None:
        """A frame that could not be inspected (corrupt, truncated, backend failure)."""
        self._stats.add(None)

    def build(self, *, drift: Drift | Mapping[str, Mapping[str, Any]] | None = None, spool: Any = None,
              spool_dropped: int = 0, spool_pending: int = 0, health_extra: Mapping[str, Any] | None = None,
              alarm: bool | None = None, bundle_version: str | None = None) -> Report:
        """Close the current window into a Report (alarm defaults to drift.state == 'alarm').

        With ``spool`` (an :class:`edge_runtime.spool.Spool`) the spool counters are read from it:
        items dropped by the size cap since the previous report, and items still waiting.
        """
        health_extra = {**self.variant_health, **dict(health_extra or {})}
        if spool is not None:
            spool_dropped = spool.take_dropped()
            dead_dropped = spool.take_dead_dropped()
            st = spool.stats()
            spool_pending = st.pending
            health_extra = {"spool_dead_letter": st.dead_letter, "spool_dropped_total": st.dropped_total,
                            "spool_dead_dropped": dead_dropped, **dict(health_extra or {})}
        if drift is not None and not isinstance(drift, Drift):
            drift = Drift.from_features(drift)
        drift = drift or Drift()
        if bundle_version:
            self.bundle_version = bundle_version
        with self._lock:
            now = self._clock()
            window, start = self._stats.counts(reset=True), self._window_start
            self._window_start = now
        counts = Counts(frames=window.frames, ok=window.ok, ng=window.ng, errors=window.errors,
                        per_class=dict(window.per_class))
        health = Health(
            uptime_s=round(time.monotonic() - self._started, 3),
            latency_ms_p50=window.latency_ms_p50, latency_ms_p95=window.latency_ms_p95,
            spool_dropped=int(spool_dropped), spool_pending=int(spool_pending),
            disk_free_mb=self._disk_free_mb(), extra=dict(health_extra or {}),
        )
        report = Report(
            device_id=self.device_id, line=self.line, bundle_version=self.bundle_version,
            window=Window(start=utc_iso(start), end=utc_iso(max(now, start))), counts=counts, drift=drift,
            health=health, alarm=(drift.state == "alarm") if alarm is None else (bool(alarm) or drift.state == "alarm"),
        )
        report.to_dict()  # validate now: the caller learns of a bad drift dict here, not at the collector
        return report

    def _disk_free_mb(self) -> Optional[float]:
        if self.spool_dir is None:
            return None
        try:
            return round(shutil.disk_usage(self.spool_dir).free / 2**20, 1)
        except OSError:
            return None
