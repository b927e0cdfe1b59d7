"""What the inspection loop leaves on the box's disk: JSON lines, annotated NG images, a rolling CSV summary.

Layout under ``out_dir`` (one file or folder per UTC day, days older than ``keep_days`` deleted, so months
of running do not fill the disk)::

    predictions/2026-11-22.jsonl     one JSON line per frame (the same record as ``predict``), flushed per line
    ng/2026-11-22/<name>-<n>.jpg     NG frames with boxes, labels, ROI and verdict drawn
    summary/2026-11-22.csv           one row per ``summary_interval_s``: counts, NG rate, latency, drift state

A write that fails (full disk, read-only mount) is logged (at most once a minute) and counted in
``write_errors``; it never stops inspection. The inspection loop calls :meth:`LocalLog.record` from its output
writer thread (:class:`edge_runtime.pipeline.OutputWriter`), which drops annotated images (never JSON lines)
when the disk falls behind; such a frame's line has ``"ng_image": null`` and ``"ng_image_dropped": true``.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

import cv2
import numpy as np

from edge_runtime.draw import draw_detections
from edge_runtime.fileio import atomic_write_bytes
from edge_runtime.inspection import FrameRecord, FrameStats
from edge_runtime.settings import ReportSettings

log = logging.getLogger("defectkit.local_log")

SUMMARY_FIELDS = ("window_start", "window_end", "bundle_version", "frames", "ok", "ng", "errors", "ng_rate",
                  "latency_ms_p50", "latency_ms_p95", "drift_state")


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _safe_name(source: str) -> str:
    stem = Path(source.split("#", 1)[0]).stem or "frame"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:60]


class LocalLog:
    """Writes the loop's outputs; ``record(...)`` per frame, ``close()`` at the end (flushes and fsyncs)."""

    def __init__(self, out_dir: str | Path, classes: Sequence[str], *, save_ng: bool = True, keep_days: int = 30,
                 summary_interval_s: float = ReportSettings.interval_s, jpeg_quality: int = 90, clock=time.time) -> None:
        self.out_dir = Path(out_dir)
        self.classes = list(classes)
        self.save_ng, self.keep_days = save_ng, keep_days
        self.summary_interval_s, self.jpeg_quality = summary_interval_s, jpeg_quality
        self._clock = clock
        self._jsonl: Optional[TextIO] = None
        self._jsonl_day = ""
        self.lines = 0
        self.ng_images = 0
        self.write_errors = 0
        self._last_error_log = -math.inf
        self._window_start = clock()
        self._window = FrameStats()
        for sub in ("predictions", "ng", "summary"):
            (self.out_dir / sub).mkdir(parents=True, exist_ok=True)
        self._prune()

    # ------------------------------------------------------------------------------------------ per frame
    def record(self, rec: FrameRecord, image: Optional[np.ndarray] = None, roi: Optional[Sequence[float]] = None,
               image_dropped: bool = False) -> None:
        """One frame: its JSON line, its annotated image if NG, its counts in the summary window.
        ``image_dropped``: the NG image was dropped upstream (disk behind); the line says so."""
        now = self._clock()
        self._roll_summary(now, rec.bundle_version, rec.drift_state)
        self._window.record(rec)
        line = rec.to_json()
        if rec.is_ng and self.save_ng and image is not None and rec.detections is not None:
            line["ng_image"] = self._save_ng(rec, image, roi, now)
        elif image_dropped and rec.is_ng and self.save_ng:
            line["ng_image"] = None
            line["ng_image_dropped"] = True
        self._write_line(line, now)

    def _write_line(self, rec: dict[str, Any], now: float) -> None:
        try:
            day = _day(now)
            if self._jsonl is None or day != self._jsonl_day:
                self._close_jsonl()
                self._jsonl = open(self.out_dir / "predictions" / f"{day}.jsonl", "a", encoding="utf-8")
                self._jsonl_day = day
                self._prune()
            self._jsonl.write(json.dumps(rec) + "\n")
            self._jsonl.flush()  # a reader (tail -f, a PLC bridge) sees every line at once
            self.lines += 1
        except OSError as exc:
            self._failed("a prediction line", exc)

    def _save_ng(self, rec: FrameRecord, image: np.ndarray, roi: Optional[Sequence[float]], now: float) -> Optional[str]:
        try:
            drawn = draw_detections(image, rec.detections, list(rec.classes), rec.decision, roi)
            ok, buf = cv2.imencode(".jpg", drawn, [int(cv2.IMWRITE_JPEG_QUALITY), self.jpeg_quality])
            if not ok:
                raise OSError("JPEG encoding failed")
            path = self.out_dir / "ng" / _day(now) / f"{_safe_name(rec.source)}-{rec.index}.jpg"
            atomic_write_bytes(path, buf.tobytes())
            self.ng_images += 1
            return str(path)
        except OSError as exc:
            self._failed("an NG image", exc)
            return None

    # ------------------------------------------------------------------------------------------ summary
    def _roll_summary(self, now: float, bundle_version: str, drift_state: str) -> None:
        if now - self._window_start >= self.summary_interval_s:
            self.flush_summary(bundle_version, drift_state, now)

    def flush_summary(self, bundle_version: str = "", drift_state: str = "none", now: Optional[float] = None) -> None:
        """Close the current summary window into one CSV row (also called at shutdown and at a model swap)."""
        now = self._clock() if now is None else now
        if self._window.frames == 0:
            self._window_start = now
            return
        c = self._window.counts(reset=True)
        row = {
            "window_start": _iso(self._window_start), "window_end": _iso(now), "bundle_version": bundle_version,
            "frames": c.frames, "ok": c.ok, "ng": c.ng, "errors": c.errors, "ng_rate": round(c.ng_rate, 4),
            "latency_ms_p50": "" if c.latency_ms_p50 is None else c.latency_ms_p50,
            "latency_ms_p95": "" if c.latency_ms_p95 is None else c.latency_ms_p95,
            "drift_state": drift_state,
        }
        path = self.out_dir / "summary" / f"{_day(now)}.csv"
        try:
            new = not path.exists()
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
            with open(path, "a", encoding="utf-8", newline="") as fh:
                fh.write(buf.getvalue())
                fh.flush()
                os.fsync(fh.fileno())
            if self._jsonl is not None:
                os.fsync(self._jsonl.fileno())  # once a window: the JSON lines up to here survive a power cut
        except OSError as exc:
            self._failed("a summary row", exc)
        self._window_start = now

    # ------------------------------------------------------------------------------------------ housekeeping
    def _prune(self) -> None:
        """Delete day files and folders older than keep_days (the names sort by date)."""
        if self.keep_days <= 0:
            return
        cutoff = (datetime.fromtimestamp(self._clock(), tz=timezone.utc) - timedelta(days=self.keep_days)).strftime("%Y-%m-%d")
        for sub in ("predictions", "ng", "summary"):
            folder = self.out_dir / sub
            try:
                entries = list(folder.iterdir())
            except OSError:
                continue
            for entry in entries:
                if entry.name[:10] < cutoff and entry.name[:4].isdigit():
                    try:
                        if entry.is_dir():
                            shutil.rmtree(entry)
                        else:
                            entry.unlink()
                    except OSError as exc:
                        self._failed(f"removing old output {entry}", exc)

    def _failed(self, what: str, exc: OSError) -> None:
        self.write_errors += 1
        now = time.monotonic()
        if now - self._last_error_log >= 60.0:
            self._last_error_log = now
            log.error("cannot write %s under %s (%s); inspection continues (%d output write errors so far)",
                      what, self.out_dir, exc, self.write_errors)

    def _close_jsonl(self) -> None:
        if self._jsonl is not None:
            try:
                self._jsonl.flush()
                os.fsync(self._jsonl.fileno())
                self._jsonl.close()
            except OSError as exc:
                self._failed("the end of the prediction file", exc)
            self._jsonl = None

    def current_jsonl(self) -> Path:
        return self.out_dir / "predictions" / f"{_day(self._clock())}.jsonl"

    def close(self, bundle_version: str = "", drift_state: str = "none") -> None:
        self.flush_summary(bundle_version, drift_state)
        self._close_jsonl()
