"""The inspection loop of the edge box: frames in, OK/NG out, drift watched, reports spooled and sent.

A pipeline over the box's cores (:mod:`edge_runtime.pipeline`): the reader thread takes frame n+1 from the
source, decodes and pre-processes it (and computes its image drift features) while the inference thread runs
the model on frame n, this thread runs ``post -> decide -> drift -> report`` on frame n-1 and the writer
thread writes the JSON line, NG image and CSV summary of the frames before. Queues are bounded; every output keeps the source's frame order. Post-
processing is sized to the decision: candidates scoring below ``min(lowest decision threshold, hard-example
band low)`` are dropped before NMS (:data:`Inspector.min_score`), with the detections above it identical to
the full NMS's. Everything else that may block lives elsewhere too: the uplink thread sends the spool to the
collector, the update worker loads a new bundle beside the running one (the swap happens between two
frames), the metrics server answers scrapes. SIGTERM/SIGINT set the stop event: the source stops being read,
the frames already taken are inspected and written, then the last report, the outputs and the spool are
flushed and the threads stopped.
"""
from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from edge_runtime.decision import Verdict, decide
from edge_runtime.drift import DriftMonitor, frame_features, input_features, output_features
from edge_runtime.hard_examples import HardExampleSampler
from edge_runtime.fileio import atomic_write_json
from edge_runtime.inspection import FrameRecord
from edge_runtime.local_log import LocalLog
from edge_runtime.pipeline import END, FrameReader, InferenceStage, OutputWriter, Prepared
from edge_runtime.report_builder import ReportBuilder
from edge_runtime.wire_report import utc_iso
from edge_runtime.runconfig import RunOptions, add_run_arguments, options_from_args
from edge_runtime.settings import BoxSettings
from edge_runtime.metrics_server import MetricsServer, RuntimeMetrics
from edge_runtime.sources import Frame, Source, open_source
from edge_runtime.spool import Spool, SpoolError
from edge_runtime.bundle_manager import FAILED_KINDS, BundleManager, LoadedModel
from edge_runtime.update_channel import UpdateChannel
from edge_runtime.uplink import Uplink, UplinkThread
from edge_runtime.variant_choice import health_fields

log = logging.getLogger("defectkit.run")

EFFECTIVE_SETTINGS = "effective_settings.json"  # in the state dir: what the running bundle runs on, and why


def drift_features_of(image: np.ndarray, verdict: Verdict, num_classes: int) -> dict[str, float]:
    """The drift statistics of one inspected frame. Output statistics use the detections behind the
    verdict (after class thresholds, minimum area and ROI): the trainer builds drift_reference.json with
    this same function on the training images, so both sides count the same detections."""
    counted = verdict.counted
    return frame_features(image, counted.scores, counted.class_ids, num_classes, verdict.is_ng)


@dataclass
class RunSummary:
    frames: int = 0
    ok: int = 0
    ng: int = 0
    errors: int = 0
    reports: int = 0
    swaps: int = 0
    bundle_version: str = ""
    backend: str = ""
    predictions: Optional[Path] = None
    stopped_by: str = "source ended"
    spool_errors: int = 0
    extra: dict = field(default_factory=dict)

    def line(self) -> str:
        return (f"{self.frames} frames: {self.ng} NG, {self.ok} OK, {self.errors} skipped; {self.reports} reports "
                f"spooled; bundle {self.bundle_version} on {self.backend}; {self.stopped_by}; "
                f"predictions in {self.predictions}")


class _RateLimitedLog:
    """At most one log line per ``period_s`` per key, with the count of what was suppressed."""

    def __init__(self, period_s: float = 30.0) -> None:
        self.period_s = period_s
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-1e18, 0))
        if now - last >= self.period_s:
            extra = f" ({suppressed} similar messages suppressed)" if suppressed else ""
            log.warning(msg + extra, *args)
            self._last[key] = (now, 0)
        else:
            self._last[key] = (last, suppressed + 1)


class Inspector:
    """``Inspector(options).run()`` until the source ends, ``max_frames`` or :meth:`stop`."""

    READ_AHEAD = 2  # frames decoded and pre-processed ahead of inference
    MAX_PENDING_IMAGES = 8  # NG images waiting for the disk before new ones are dropped
    MAX_PENDING_LINES = 10000  # JSON lines waiting for the disk before the loop waits (never dropped)
    STOP_GRACE_S = 10.0  # after a stop, how long a source blocked in a read may take to end

    def __init__(self, options: RunOptions, metrics: Optional[RuntimeMetrics] = None,
                 sink_wrapper: Optional[Callable[[LocalLog], Any]] = None,
                 drop_late_frames: Optional[bool] = None) -> None:
        """``sink_wrapper``: wraps the local log the writer thread writes to (tests: a deliberately slow disk).
        ``drop_late_frames``: a frame that finds the read-ahead queue full is dropped (counted) instead of
        making the source wait; default: for a camera (live) source only. False replays a scripted camera
        frame by frame."""
        self.opts = options
        self.drop_late_frames = drop_late_frames
        self.sink_wrapper = sink_wrapper
        self.reader: Optional[FrameReader] = None
        self.inference: Optional[InferenceStage] = None
        self.writer: Optional[OutputWriter] = None
        self.min_score: Optional[float] = None  # the pre-NMS floor of the running bundle's settings
        self._last_pipeline_counts: dict[str, int] = {}
        self.stop_event = threading.Event()
        self.metrics = metrics or RuntimeMetrics()
        self.summary = RunSummary()
        self.frame_hooks: list[Callable[[dict[str, Any]], None]] = []  # called per frame with the stage timings
        self.settings: Optional[BoxSettings] = None  # the current bundle's settings with the overrides on top
        self.periodic_ms = 0.0  # time spent in periodic work (reports spooled, metrics, updates): bench/edge_loop.py
        self.model: Optional[LoadedModel] = None
        self.monitor: Optional[DriftMonitor] = None
        self.source: Optional[Source] = None
        self.spool: Optional[Spool] = None
        self.uplink: Optional[Uplink] = None
        self._uplink_thread: Optional[UplinkThread] = None
        self._server: Optional[MetricsServer] = None
        self.channel: Optional[UpdateChannel] = None
        self._channel_thread: Optional[threading.Thread] = None
        self._rl = _RateLimitedLog()
        self._frames_in_window = 0
        self._inflight_events: dict[str, int] = {}  # report id -> newest update-event seq it carried
        self._inflight_lock = threading.Lock()
        self.manager = BundleManager(options.state_dir, options.public_key, backend=options.backend,
                                     threads=options.threads, max_crashes=options.max_crashes,
                                     selftest_all=options.selftest_all, settings_layers=options.settings_layers,
                                     line=options.line, limits=options.archive_limits, variant=options.variant)

    def stop(self) -> None:
        self.stop_event.set()

    # ------------------------------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        o = self.opts
        if o.metrics_port >= 0:
            self._server = MetricsServer(self.metrics, o.metrics_host, o.metrics_port).start()
        model = self.manager.start(o.bundle)  # verified, self-tested, its settings resolved with the overrides
        s = model.settings.settings
        self.spool = Spool(o.state_dir / "spool.db", max_bytes=int(s.report.spool_max_mb * 2**20))
        self.builder = ReportBuilder(device_id=o.device_id, line=model.manifest.line,
                                     bundle_version=model.version, spool_dir=o.state_dir)
        self.outputs = LocalLog(o.out_dir, model.manifest.classes, save_ng=o.save_ng, keep_days=o.keep_days,
                                summary_interval_s=s.report.interval_s)
        sink = self.sink_wrapper(self.outputs) if self.sink_wrapper else self.outputs
        self.writer = OutputWriter(sink, max_images=self.MAX_PENDING_IMAGES, max_lines=self.MAX_PENDING_LINES).start()
        self._activate(model)
        if o.collector:
            # short timeouts: a hung collector delays only the uplink thread, and shutdown by a few seconds
            self.uplink = Uplink(o.collector, o.device_id, o.token or "", self.spool, connect_timeout=3.0,
                                 read_timeout=5.0, ca_file=o.ca_file, insecure_http=o.insecure_http)
            self.uplink.on_ack = self._report_acknowledged
            self._uplink_thread = UplinkThread(self.uplink, interval_s=o.uplink_interval_s).start()
        if o.collector and o.targets_public_key:
            self.channel = UpdateChannel(o.collector, o.device_id, o.token or "", o.targets_public_key, self.manager,
                                         hardware_target=o.hardware_target, max_length=o.archive_limits_download,
                                         ca_file=o.ca_file, insecure_http=o.insecure_http)
            self._channel_thread = threading.Thread(target=self._channel_loop, name="defectkit-update-channel",
                                                    daemon=True)
            self._channel_thread.start()
        elif o.collector:
            log.warning("update channel off: give --targets-public-key (the fleet's targets key) to take updates "
                        "from %s; bundles dropped into %s are still installed", o.collector, self.manager.inbox)
        kwargs = {} if o.capture_factory is None else {"capture_factory": o.capture_factory}
        self.source = open_source(o.source, watch=o.watch, exclude=o.out_dir, settle_ms=o.settle_ms,
                                  after=o.watch_after, **kwargs)
        self.metrics.source = {"kind": self.source.kind, "name": self.source.name, "status": self.source.status}
        self._last_report = self._last_periodic = time.monotonic()
        self._last_update_poll = 0.0
        self._refresh_metrics()

    def _activate(self, model: LoadedModel) -> None:
        """Make ``model`` the one that inspects (at start and at a swap): fresh drift window, new version."""
        self.model = model
        s = self.settings = model.settings.settings
        self.monitor = DriftMonitor(model.reference, s.drift)
        self.sampler = HardExampleSampler(s.report.hard_example_low, s.report.hard_example_high,
                                          s.report.hard_examples_per_hour)
        self.min_score = decision_floor(s)
        self.spool.max_bytes = int(s.report.spool_max_mb * 2**20)
        self.outputs.summary_interval_s = s.report.interval_s
        self.builder.bundle_version = model.version
        self.builder.variant_health = health_fields(model.choice)  # which variant runs: in every report's health
        self.outputs.classes = list(model.manifest.classes)
        self._classes = list(model.manifest.classes)
        self._active_since = time.monotonic()
        self._frames_since_swap = 0
        self._drift_state = "none"
        self.summary.bundle_version, self.summary.backend = model.version, model.backend
        self.metrics.set_bundle(model.manifest.line, model.version, model.backend)
        self.metrics.flag(selftest=model.selftest.line())
        self._publish_settings(model)
        log.info("inspecting with bundle %s %s on %s", model.manifest.line, model.version, model.backend)

    def _publish_settings(self, model: LoadedModel) -> None:
        """The effective settings and the source of each value: in /healthz and in state/effective_settings.json."""
        shown = {"bundle_version": model.version, **model.settings.to_dict(),
                 "variant": model.choice.to_dict() if model.choice else None}  # the timed choice, and why
        self.metrics.set_settings(shown)
        try:
            atomic_write_json(self.opts.state_dir / EFFECTIVE_SETTINGS, shown)
        except OSError as exc:
            self._rl.warning("settings", "cannot write %s (%s)", EFFECTIVE_SETTINGS, exc)

    def _channel_loop(self) -> None:
        while not self.stop_event.is_set():
            self.channel.poll()
            if self.stop_event.wait(self.opts.update_poll_s):
                break

    def _report_acknowledged(self, item) -> None:
        """The collector has a report: the update events it carried need not go out again."""
        with self._inflight_lock:
            seq = self._inflight_events.pop(item.key, None)
        if seq is not None:
            self.manager.ack_events(seq)

    # ------------------------------------------------------------------------------------------ the loop
    def run(self) -> RunSummary:
        try:
            self._setup()
            self.metrics.state = "running"
            self.reader = FrameReader(self.source, self.stop_event, self._prepare, depth=self.READ_AHEAD,
                                      live=self.source.kind == "camera" if self.drop_late_frames is None else self.drop_late_frames,
                                      limit=self.opts.max_frames).start()
            self.inference = InferenceStage(self.reader, self._infer, depth=self.READ_AHEAD).start()
            stop_seen: Optional[float] = None
            while True:
                item = self.inference.get(timeout=0.5)
                if item is END:
                    break
                if item is None and self.stop_event.is_set():  # a source stuck in a read must not hold SIGTERM up
                    stop_seen = stop_seen or time.monotonic()
                    if time.monotonic() - stop_seen > self.STOP_GRACE_S:
                        log.warning("the source did not stop within %.0f s; leaving it", self.STOP_GRACE_S)
                        break
                if item is not None:
                    self._inspect(item)
                t_periodic = time.perf_counter()
                self._periodic()
                self.periodic_ms += (time.perf_counter() - t_periodic) * 1e3
            for stage in (self.reader, self.inference):
                if stage.error is not None:
                    raise stage.error
            if self.reader.limit_reached:
                self.summary.stopped_by = f"max frames ({self.opts.max_frames}) reached"
            elif self.stop_event.is_set():
                self.summary.stopped_by = "stopped by signal"
        finally:
            self._shutdown()
        return self.summary

    def _prepare(self, frame: Frame) -> Prepared:
        """Reader thread: pre-processing and the image drift features of one decoded frame."""
        item = Prepared(frame, times_ms={"pre": 0.0, "drift_input": 0.0})
        model = self.model
        if frame.image is None or model is None:
            return item
        try:
            t0 = time.perf_counter()
            item.feeds, item.model = model.detector.prepare(frame.image), model
            t1 = time.perf_counter()
            item.input_features = input_features(frame.image)
            item.times_ms = {"pre": (t1 - t0) * 1e3, "drift_input": (time.perf_counter() - t1) * 1e3}
        except Exception as exc:  # an image the pre-processing cannot take: the loop skips the frame
            item.error = f"pre-processing failed: {exc}"
        return item

    def _infer(self, item: Prepared) -> Prepared:
        """Inference thread: the running bundle's model on one prepared frame (errors mark the frame)."""
        model = self.model
        if item.frame.image is None or item.error or model is None:
            return item
        try:
            feeds = item.feeds
            if item.model is not model:  # prepared for the bundle before a swap
                t = time.perf_counter()
                feeds = model.detector.prepare(item.frame.image)
                item.times_ms["pre"] = (time.perf_counter() - t) * 1e3
            t0 = time.perf_counter()
            item.outputs = model.detector.infer(feeds)
            item.times_ms["infer"] = (time.perf_counter() - t0) * 1e3
            item.model = model
        except Exception as exc:  # one frame the backend cannot run (odd size, backend hiccup): skip it, go on
            item.error = f"inference failed: {exc}"
        return item

    def _inspect(self, item: Prepared) -> None:
        frame = item.frame
        self.metrics.begin_frame()
        self.summary.frames += 1
        self._frames_since_swap += 1
        self._frames_in_window += 1
        if frame.image is None:
            self._skip(frame, frame.error or "not decodable")
            return
        if item.error:
            self._skip(frame, item.error)
            return
        image = frame.image
        detector = self.model.detector
        in_feats, drift_in_ms = item.input_features, item.times_ms.get("drift_input", 0.0)
        try:
            if item.model is not self.model or item.outputs is None:  # inferred by the bundle before a swap
                item.model = None
                item = self._infer(item)
                if item.error:
                    self._skip(frame, item.error)
                    return
            pre_ms, infer_ms, outputs = item.times_ms.get("pre", 0.0), item.times_ms.get("infer", 0.0), item.outputs
            t_post = time.perf_counter()
            dets = detector.postprocess(outputs, self.min_score)
            t_decide = time.perf_counter()
        except Exception as exc:  # one frame the backend cannot run (odd size, backend hiccup): skip it, go on
            self._skip(frame, f"inference failed: {exc}")
            return
        verdict = decide(dets, self._classes, self.settings.runtime)
        t0 = time.perf_counter()
        counted = verdict.counted
        feats = dict(in_feats) if in_feats is not None else input_features(image)
        feats.update(output_features(counted.scores, counted.class_ids, len(self._classes), verdict.is_ng))
        state = self.monitor.update(feats)
        t1 = time.perf_counter()
        self._offer_hard_example(image, dets, frame, verdict)
        t2 = time.perf_counter()
        rec = FrameRecord(
            index=frame.index, source=frame.source, time=utc_iso(frame.time), bundle_version=self.model.version,
            classes=tuple(self._classes), detections=dets, decision=verdict,
            height=int(image.shape[0]), width=int(image.shape[1]), drift_state=state,
            stages_ms={"decode": frame.decode_ms, "pre": round(pre_ms, 3), "infer": round(infer_ms, 3),
                       "post": round((t_decide - t_post) * 1e3, 3), "drift": drift_in_ms + (t1 - t0) * 1e3,
                       "report": (t2 - t1) * 1e3},
        )
        self._deliver(rec, image)
        if state == "alarm" and self._drift_state != "alarm":
            log.warning("drift alarm on bundle %s: %s", self.model.version, self._alarm_features())
            self._send_report()
        self._drift_state = state
        if self.frame_hooks:  # "output": this thread's share of the outputs (records handed on, metrics);
            # "drift_input": the image drift features, computed in the reader thread beside inference
            timed = {**rec.stages_ms, "output": (time.perf_counter() - t2) * 1e3, "drift_input": drift_in_ms,
                     "decide": (t0 - t_decide) * 1e3}
            for hook in self.frame_hooks:
                hook(timed)

    def _deliver(self, rec: FrameRecord, image: Optional[np.ndarray] = None) -> None:
        """The one record of a frame to every consumer: the report window, the local log (through the writer
        thread), /metrics, the summary."""
        self.builder.record(rec)
        roi = self.settings.runtime.roi if self.settings else None
        if self.writer is not None:
            self.writer.submit(rec, image, roi)
        else:
            self.outputs.record(rec, image, roi)
        self.metrics.frame(rec)
        counts = self._pipeline_counts()
        if counts != self._last_pipeline_counts:  # drops show in /metrics at once, not at the next refresh
            self._last_pipeline_counts = counts
            self.metrics.set(**counts)
        if not rec.inspected:
            self.summary.errors += 1
        elif rec.is_ng:
            self.summary.ng += 1
        else:
            self.summary.ok += 1

    def _skip(self, frame: Frame, why: str) -> None:
        self._rl.warning("skip", "skipped frame %s: %s", frame.source, why)
        self._deliver(FrameRecord(index=frame.index, source=frame.source, time=utc_iso(frame.time),
                                  bundle_version=self.model.version if self.model else "",
                                  classes=tuple(self._classes), error=why, drift_state=self._drift_state))

    def _alarm_features(self) -> str:
        snap = self.monitor.snapshot() if self.monitor else {"features": {}}
        return ", ".join(sorted(k for k, v in snap["features"].items() if v.get("state") == "alarm")) or "?"

    def _offer_hard_example(self, image: np.ndarray, dets, frame: Frame, verdict: Verdict) -> None:
        if len(dets) == 0 or self.sampler.max_per_hour == 0 or not self.sampler.in_band(float(dets.scores.max())):
            return
        records = dets.to_records(self._classes)
        try:
            self.sampler.offer(self.spool, image=image, detections=records, device_id=self.opts.device_id,
                               line=self.model.manifest.line, bundle_version=self.model.version,
                               source=frame.source, verdict=verdict.verdict)
        except SpoolError as exc:
            self._spool_failed(exc)

    # ------------------------------------------------------------------------------------------ periodic work
    def _periodic(self) -> None:
        now = time.monotonic()
        if now - self._last_report >= self.settings.report.interval_s:
            self._send_report()
        if now - self._last_periodic < 0.5:
            return
        self._last_periodic = now
        if now - self._last_update_poll >= self.opts.update_poll_s:
            self._last_update_poll = now
            self.manager.poll()
        ready = self.manager.take_ready()
        if ready is not None:
            self._swap(ready)
        o = self.opts
        if (self.manager.state.probation and self._frames_since_swap >= o.confirm_after_frames
                and now - self._active_since >= o.confirm_after_s):
            self.manager.confirm()
        self._refresh_metrics()

    def _refresh_metrics(self) -> None:
        m = self.metrics
        if self.source is not None:
            m.source = {"kind": self.source.kind, "name": self.source.name, "status": self.source.status,
                        **({"drops": self.source.drops, "reconnects": self.source.reconnects}
                           if hasattr(self.source, "drops") else {})}
        if self.monitor is not None:
            snap = self.monitor.snapshot()
            m.set_drift(self.monitor.state, {name: f["state"] for name, f in snap["features"].items()})
            m.set(drift_window_frames=snap["window_frames"])  # tops out at the drift window the monitor runs on
        if self.spool is not None:
            try:
                st = self.spool.stats()
                m.set(spool_pending=st.pending, spool_dropped_total=st.dropped_total, spool_dead_letter=st.dead_letter)
            except SpoolError as exc:
                self._spool_failed(exc)
        if self.uplink is not None:
            us = self.uplink.state
            m.set(uplink_failures=us.failures, uplink_sent_total=us.sent_total)
            m.flag(uplink_last_error=us.last_error)
        m.set(output_write_errors=self.outputs.write_errors, spool_errors=self.summary.spool_errors,
              **self._pipeline_counts())
        m.flag(**self._update_health())

    def _health_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"backend": self.model.backend if self.model else "",
                                 "output_write_errors": self.outputs.write_errors,
                                 "spool_errors": self.summary.spool_errors, **self._pipeline_counts()}
        if self.source is not None:
            extra["source_status"] = self.source.status
            for key in ("drops", "reconnects"):
                if hasattr(self.source, key):
                    extra[f"camera_{key}"] = getattr(self.source, key)
        if self.uplink is not None:
            extra["uplink_failures"] = self.uplink.state.failures
        extra.update(self._update_health())
        return extra

    def _pipeline_counts(self) -> dict[str, int]:
        """What the pipeline gave up, in /metrics and the report's health: live frames dropped at the source
        (inference behind) and annotated NG images dropped by the writer (disk behind); verdicts never."""
        return {"frames_dropped_at_source": self.reader.dropped if self.reader else 0,
                "ng_images_dropped": self.writer.images_dropped if self.writer else 0}

    def _update_health(self) -> dict[str, Any]:
        """What the fleet's rollout reads (docs/fleet.md): ``update_event`` = the newest failed / refused / reverted
        event not yet in an acknowledged report (else the newest event), so a later install or confirm never hides
        an earlier failure; ``update_event_2..4`` the next ones, ``update_events`` how many are pending,
        ``selftest`` of the running bundle, ``update_channel`` the last poll (a freeze shows here)."""
        pending = self.manager.pending_events()
        failures = [e for e in reversed(pending) if e["kind"] in FAILED_KINDS]
        ordered = failures + [e for e in reversed(pending) if e["kind"] not in FAILED_KINDS]
        out: dict[str, Any] = {"update_events": len(pending)}
        main = ordered[0] if ordered else self.manager.last_event()
        if main:
            out["update_event"] = _event_text(main)
        for i, ev in enumerate(ordered[1:4], 2):
            out[f"update_event_{i}"] = _event_text(ev)
        if self.model is not None:
            out["selftest"] = "passed" if self.model.selftest.ok else "failed"
        if self.channel is not None:
            out["update_channel"] = _clean(self.channel.status)
        return out

    def _send_report(self) -> None:
        """Close the report window and spool the report (the uplink thread sends it; an alarm wakes it)."""
        self._last_report = time.monotonic()
        self._frames_in_window = 0
        try:
            snap = self.monitor.snapshot() if self.monitor else {"features": {}}
            pending = self.manager.pending_events()
            report = self.builder.build(drift=snap["features"], spool=self.spool, health_extra=self._health_extra())
            if pending:
                with self._inflight_lock:
                    self._inflight_events[report.id] = max(e.get("seq", 0) for e in pending)
            self.spool.put("report", report.to_dict(), alarm=report.alarm)
        except SpoolError as exc:
            self._spool_failed(exc)
            return
        self.summary.reports += 1
        self.metrics.flag(spool_full=False)
        if report.alarm and self._uplink_thread is not None:
            self._uplink_thread.wake()

    def _spool_failed(self, exc: Exception) -> None:
        self.summary.spool_errors += 1
        self.metrics.set(spool_errors=self.summary.spool_errors)
        self.metrics.flag(spool_full=True, spool_error=str(exc)[:600])
        self._rl.warning("spool", "%s", exc)

    def _swap(self, new: LoadedModel) -> None:
        old = self.model  # new.settings were resolved and checked against its classes when it was loaded
        self._send_report()  # the window so far belongs to the old bundle
        if self.writer is not None:  # after the old bundle's frames already handed to the writer
            self.writer.call(self.outputs.flush_summary, old.version if old else "", self._drift_state)
        else:
            self.outputs.flush_summary(old.version if old else "", self._drift_state)
        self._activate(new)
        self.manager.commit(new)
        self.summary.swaps += 1
        log.info("swapped bundle %s -> %s", old.version if old else "-", new.version)

    # ------------------------------------------------------------------------------------------ shutdown
    def _shutdown(self) -> None:
        self.metrics.state = "stopping"
        for stage in (self.inference, self.reader):  # the loop ended on an error: stop without waiting for room
            if stage is not None and not stage.join(timeout=0):
                stage.abandon()
        if hasattr(self, "outputs"):
            self._refresh_metrics()
        if self.source is not None:
            self.source.close()
        if self.monitor is not None and self.spool is not None and self._frames_in_window:
            self._send_report()  # the last, partial window
        if self.writer is not None:
            self.writer.close()  # every record handed over is written before the files are closed
        if hasattr(self, "outputs"):
            self.outputs.close(self.model.version if self.model else "", self._drift_state if self.model else "none")
            self.summary.predictions = self.outputs.current_jsonl()
        self.stop_event.set()  # ends the update channel's loop
        if self._uplink_thread is not None:
            self._uplink_thread.stop(timeout=self.opts.exit_flush_s)
            res = self.uplink.flush(deadline=self.uplink._clock() + self.opts.exit_flush_s)  # one last, bounded try
            if res.sent:
                log.info("sent %d spooled item(s) on the way out", res.sent)
        self.manager.wait_idle(timeout=10.0)
        if self.spool is not None:
            self.spool.close()
        if self._server is not None:
            self._server.stop()
        self.manager.clean_exit()
        self.metrics.state = "stopped"


def decision_floor(settings: BoxSettings) -> Optional[float]:
    """The lowest score the box acts on: the lowest decision threshold, or the hard-example band's low end
    when hard examples are sampled; post-processing drops candidates below it before NMS."""
    floor = settings.runtime.lowest_threshold()
    if settings.report.hard_examples_per_hour > 0:
        floor = min(floor, settings.report.hard_example_low)
    return float(floor)


def _clean(text: str, limit: int = 256) -> str:
    """A health string the collector accepts: no control characters, at most 256 characters."""
    return "".join(ch if ch.isprintable() else " " for ch in text)[:limit]


def _event_text(ev: dict) -> str:
    """``"<time> <kind> <version>: <detail>"``: the form the fleet's rollout parses."""
    return _clean(f"{ev['time']} {ev['kind']} {ev.get('version') or ''}: {ev['detail']}")


# ---------------------------------------------------------------------------------------------- CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``run`` verb (``python -m edge_runtime run``)."""
    parser = subparsers.add_parser(
        "run", help="inspect frames from a folder, video or camera with a signed bundle; report to the collector",
        description="The edge box's inspection loop: verified bundle, OK/NG per frame, drift monitoring, "
        "reports spooled and sent to the collector, model updates through the inbox. SIGTERM stops it cleanly.")
    add_run_arguments(parser)
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    """Handler of ``run``: SIGTERM/SIGINT finish the current frame and flush everything; a second one kills."""
    inspector = Inspector(options_from_args(args))
    previous = {}

    def _stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: finishing the current frame, then flushing outputs and spool", signum)
        inspector.stop()
        for sig, handler in previous.items():  # a second signal takes the default way out
            signal.signal(sig, handler)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, _stop)
    try:
        summary = inspector.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(summary.line(), flush=True)
    return 0
