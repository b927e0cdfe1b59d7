"""The threads around the inspection loop's inference: a frame reader before it, an output writer after it.

The loop (:mod:`edge_runtime.run`) is a three-stage pipeline over the box's cores::

    reader thread          inference thread    loop thread                      writer thread
    source -> decode ->    infer               post -> decide -> drift ->       JSON line, NG image (draw +
    pre-process (+ the                         report -> metrics, periodic      JPEG), CSV summary
    image drift features)                      work (reports, updates)

- :class:`FrameReader`: a bounded queue (``depth`` frames). A file source (folder, watched folder, video)
  waits when the queue is full (back-pressure: no file is skipped). A live camera does not wait: a frame
  that finds the queue full is dropped at the source and counted (``dropped``), so memory stays flat when the
  camera is faster than inference. Frames leave in the order the source gave them.
- :class:`InferenceStage`: runs the model on the reader's frames in its own thread, so the model runs back to
  back while the loop thread post-processes and decides the previous frame (a bounded queue of ``depth`` too).
- :class:`OutputWriter`: the loop hands each frame's record to it and never waits for the disk. At most
  ``max_images`` annotated NG images wait to be written; beyond that the image of a new frame is dropped
  (counted in ``images_dropped``; its JSON line says so) and its verdict line still goes out. JSON lines are
  never dropped: at most ``max_lines`` wait; only a disk stalled that long makes the loop wait (and a live
  camera then drops frames at the source, counted) rather than lose verdicts or grow memory without bound.
  Records are written in submission order; :meth:`OutputWriter.call` runs a function (a CSV summary flush at a
  bundle swap) in that same order.

Stopping: the source ends (or the stop event is set, or ``limit`` frames were taken); the reader then puts
:data:`END` after the frames already taken, the loop inspects all of them, and :meth:`OutputWriter.close`
writes everything queued: a frame taken from the source is recorded everywhere, or it was never taken.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Optional

log = logging.getLogger("defectkit.pipeline")

END = object()  # the reader's last item: no frame follows


@dataclass
class Prepared:
    """A frame ready for inference: the source's frame, the model's feeds (for ``model``), the image drift
    features, and the reader's times (ms)."""

    frame: Any  # edge_runtime.sources.Frame
    model: Any = None  # what the feeds were prepared for (a swap between two frames makes the loop redo them)
    feeds: Optional[dict] = None
    input_features: Optional[dict] = None
    error: Optional[str] = None  # pre-processing or inference failed: the frame is skipped with this reason
    times_ms: dict = field(default_factory=dict)  # "pre", "drift_input", "infer"
    outputs: Optional[list] = None  # the model's outputs (set by the inference stage, for ``model``)


class _QueuedStage:
    """A worker thread that fills a bounded queue (at most ``depth`` items); the loop takes them with :meth:`get`.
    The reader and the inference stage differ only in what their thread does (``_run``)."""

    def __init__(self, depth: int, name: str) -> None:
        self.depth = max(1, depth)
        self.queue: "queue.Queue[Any]" = queue.Queue(maxsize=self.depth)
        self.high_water = 0  # the most items ever waiting at once (<= depth)
        self.error: Optional[BaseException] = None
        self._abandon = threading.Event()  # the loop died: do not wait for room
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def start(self):
        self._thread.start()
        return self

    def _put(self, item: Any) -> bool:
        while not self._abandon.is_set():
            try:
                self.queue.put(item, timeout=0.2)
            except queue.Full:
                continue
            self.high_water = max(self.high_water, self.queue.qsize())
            return True
        return False

    def get(self, timeout: float) -> Any:
        """The next item, :data:`END`, or None when nothing came within ``timeout`` seconds."""
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def abandon(self, join_s: float = 5.0) -> None:
        """The loop stops taking items (error path): let the thread end without waiting for room."""
        self._abandon.set()
        self._thread.join(join_s)

    def join(self, timeout: Optional[float] = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


class FrameReader(_QueuedStage):
    """Reads ``source.frames(stop)`` in its own thread into a queue of at most ``depth`` prepared frames."""

    def __init__(self, source: Any, stop: threading.Event, prepare: Callable[[Any], Prepared], *, depth: int = 2,
                 live: bool = False, limit: Optional[int] = None) -> None:
        super().__init__(depth, "defectkit-reader")
        self.source, self.stop, self.prepare = source, stop, prepare
        self.live, self.limit = live, limit
        self.taken = 0  # frames taken from the source (dropped ones included)
        self.dropped = 0  # live frames dropped because inference was behind
        self.limit_reached = False

    def _run(self) -> None:
        try:
            for frame in self.source.frames(self.stop):
                if frame is None:  # the source's idle tick: the loop wakes on its own
                    continue
                self.taken += 1
                if self.live and self.queue.full():
                    self.dropped += 1  # inference is behind: the newest frame is dropped before any work on it
                else:
                    item = self.prepare(frame)
                    if self.live:
                        try:
                            self.queue.put_nowait(item)
                            self.high_water = max(self.high_water, self.queue.qsize())
                        except queue.Full:
                            self.dropped += 1
                    elif not self._put(item):
                        return
                if self.limit is not None and self.taken - self.dropped >= self.limit:
                    self.limit_reached = True
                    break
        except BaseException as exc:  # the loop re-raises it (an unopenable video, a source bug)
            self.error = exc
        finally:
            self._put(END)


class InferenceStage(_QueuedStage):
    """Takes prepared frames from ``upstream`` (a :class:`FrameReader`), runs ``infer(item) -> item`` in its own
    thread and queues the results (at most ``depth``) in order; passes :data:`END` on."""

    def __init__(self, upstream: FrameReader, infer: Callable[[Prepared], Prepared], *, depth: int = 2) -> None:
        super().__init__(depth, "defectkit-inference")
        self.upstream, self.infer = upstream, infer

    def _run(self) -> None:
        while not self._abandon.is_set():
            item = self.upstream.get(timeout=0.2)
            if item is None:
                continue
            if item is not END:
                try:
                    item = self.infer(item)
                except BaseException as exc:  # a bug, not a backend error (those mark the item): end the run
                    self.error = exc
                    self._put(END)
                    return
            if not self._put(item) or item is END:
                return


class OutputWriter:
    """Writes frame records to ``sink`` (a :class:`edge_runtime.local_log.LocalLog`) in its own thread."""

    def __init__(self, sink: Any, *, max_images: int = 8, max_lines: int = 10000) -> None:
        self.sink = sink
        self.max_images, self.max_lines = max_images, max_lines
        self.images_dropped = 0  # annotated NG images not written because the disk was behind
        self.lines_waited = 0  # times the loop waited for the writer (only with max_lines records queued)
        self.written = 0
        self.errors = 0  # exceptions of the sink (a bug, not an OSError: LocalLog counts those itself)
        self._items: Deque[tuple] = collections.deque()
        self._pending_images = 0
        self._cond = threading.Condition()
        self._closed = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="defectkit-writer", daemon=True)

    def start(self) -> "OutputWriter":
        self._thread.start()
        return self

    @property
    def backlog(self) -> int:
        return len(self._items)

    @property
    def images_waiting(self) -> int:
        """Queued records that hold an image (at most ``max_images``: the memory a slow disk can pin)."""
        with self._cond:
            return sum(1 for item in self._items if item[0] == "rec" and item[2] is not None)

    def submit(self, rec: Any, image: Any = None, roi: Any = None) -> None:
        """One frame's outputs; returns at once (unless ``max_lines`` records are already waiting)."""
        with self._cond:
            if len(self._items) >= self.max_lines:
                self.lines_waited += 1
                log.warning("output writer %d records behind (disk stalled?): inspection waits for it", len(self._items))
                while len(self._items) >= self.max_lines and self._thread.is_alive():
                    self._cond.wait(0.5)
            dropped = False
            if image is not None and getattr(rec, "is_ng", False) and getattr(self.sink, "save_ng", True):
                if self._pending_images >= self.max_images:
                    image, dropped = None, True
                    self.images_dropped += 1
                else:
                    self._pending_images += 1
            else:  # an OK frame's image is never written: do not hold it (nor count it out) while the disk is behind
                image = None
            self._items.append(("rec", rec, image, roi, dropped))
            self._cond.notify_all()

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``fn`` in the writer thread after everything submitted so far."""
        with self._cond:
            self._items.append(("call", fn, args, kwargs, False))
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items:
                    return
                kind, a, b, c, dropped = self._items[0]
                self._busy = True
            try:
                if kind == "rec":
                    self.sink.record(a, b, c, image_dropped=dropped)
                    self.written += 1
                else:
                    a(*b, **c)
            except Exception:  # one bad record must not stop the outputs of every later frame
                self.errors += 1
                log.exception("output writer: %s failed", kind)
            finally:
                with self._cond:
                    self._items.popleft()
                    if kind == "rec" and b is not None:
                        self._pending_images -= 1
                    self._busy = False
                    self._cond.notify_all()

    def drain(self, timeout: Optional[float] = None) -> bool:
        """Wait until everything submitted has been written."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while (self._items or self._busy) and self._thread.is_alive():
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 0.5)
        return not self._items

    def close(self, timeout: Optional[float] = None) -> bool:
        """Write what is queued, then stop the thread; False if ``timeout`` ran out first."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()
