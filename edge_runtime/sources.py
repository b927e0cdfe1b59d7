"""Where frames come from: an image folder, a watched folder, a video file, a camera or an RTSP stream.

Every source yields :class:`Frame` objects and, while it waits for the next one, ``None`` about once per
``tick_s`` so the inspection loop can still send reports and look for updates on an idle line. A frame
that cannot be decoded (corrupt, truncated) is yielded with ``image=None`` and ``error`` set: the loop
logs and skips it. Every wait goes through the ``stop`` event, so SIGTERM ends a source at once.

A camera or stream that drops is released and reopened with exponential backoff (full jitter, capped);
inspection resumes by itself when the camera is back.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import cv2
import numpy as np

from edge_runtime.crashpoints import crashpoint
from edge_runtime.errors import UserInputError
from edge_runtime.image_guard import MAX_PIXELS, QUARANTINE_DIR, DecodeMarkers, check_header, quarantine
from edge_runtime.predict import IMAGE_SUFFIXES, list_images

log = logging.getLogger("defectkit.sources")

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".webm", ".h264", ".h265", ".ts")
# Names writers use while a file is not complete yet: never read these.
TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".filepart", ".swp", ".writing", ".lock")


SETTLE_MS = 300.0  # a watched file is read once unchanged this long (RunOptions.settle_ms, --settle-ms)


@dataclass
class Frame:
    """One captured image. ``image`` is None when it could not be decoded (``error`` says why)."""

    source: str
    index: int
    image: Optional[np.ndarray]
    error: Optional[str] = None
    decode_ms: float = 0.0
    time: float = field(default_factory=time.time)


def decode_bytes(data: bytes, name: str = "", max_pixels: int = MAX_PIXELS) -> tuple[Optional[np.ndarray], Optional[str]]:
    """Decode an encoded image; (None, reason) for an empty, corrupt, truncated or oversized one."""
    image, error, _refused = decode_checked(data, name, max_pixels)
    return image, error


def decode_checked(data: bytes, name: str = "",
                   max_pixels: int = MAX_PIXELS) -> tuple[Optional[np.ndarray], Optional[str], bool]:
    """(image, error, refused): ``refused`` is True when the header announced more than ``max_pixels`` pixels
    (never decoded: :mod:`edge_runtime.image_guard`). A format the header reader does not know is not decoded.

    OpenCV decodes a truncated JPEG without complaint (the missing rows come out grey), so a JPEG must end
    with its end-of-image marker and a PNG with its IEND chunk before it is decoded."""
    if not data:
        return None, "empty file", False
    truncated = _truncated(data)
    if truncated:
        return None, truncated, False
    header = check_header(data, max_pixels)
    if header.error:
        return None, header.error, header.refused
    image, error = _decode(data, name)
    return image, error, False


def _truncated(data: bytes) -> Optional[str]:
    head = data[:4]
    if head[:3] == b"\xff\xd8\xff" and not data.rstrip(b"\0\r\n ")[-2:] == b"\xff\xd9":
        return "truncated JPEG (no end-of-image marker)"
    if head == b"\x89PNG" and b"IEND" not in data[-16:]:
        return "truncated PNG (no IEND chunk)"
    return None


def _decode(data: bytes, name: str) -> tuple[Optional[np.ndarray], Optional[str]]:
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:
        return None, f"cannot decode {name or 'image'}: {exc}"
    if image is None:
        return None, "not a decodable image (corrupt or unknown format)"
    return image, None


def read_image_file(path: Path, max_pixels: int = MAX_PIXELS) -> tuple[Optional[np.ndarray], Optional[str]]:
    image, error, _refused = read_image_checked(path, max_pixels)
    return image, error


def read_image_checked(path: Path, max_pixels: int = MAX_PIXELS,
                       before_decode: Optional[Callable[[], None]] = None) -> tuple[Optional[np.ndarray], Optional[str], bool]:
    """Read and decode one file: (image, error, refused by its header). ``before_decode`` runs after the header
    check, right before the decoder (the watched folder writes its "decoding" marker there)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"cannot read: {exc.strerror or exc}", False
    if not data:
        return None, "empty file", False
    truncated = _truncated(data)
    if truncated:
        return None, truncated, False
    header = check_header(data, max_pixels)
    if header.error:
        return None, header.error, header.refused
    if before_decode is not None:
        before_decode()
    image, error = _decode(data, path.name)
    return image, error, False


class Source(ABC):
    """``frames(stop)`` yields Frame (or None while idle) until the source ends or ``stop`` is set."""

    kind: str = "?"
    tick_s: float = 1.0

    def __init__(self, name: str) -> None:
        self.name = name
        self.status = "ready"  # shown in /healthz: ready | running | waiting | disconnected | ended

    @abstractmethod
    def frames(self, stop: threading.Event) -> Iterator[Optional[Frame]]:
        ...

    def close(self) -> None:
        """Release devices and files (the loop calls it on shutdown)."""


class FolderSource(Source):
    """Every image of a folder (recursive, sorted) once; ``exclude`` keeps the runtime's own outputs out."""

    kind = "folder"

    def __init__(self, folder: str | Path, exclude: Optional[Path] = None, max_pixels: int = MAX_PIXELS) -> None:
        super().__init__(str(folder))
        self.files = list_images(Path(folder), exclude=exclude)
        self.max_pixels = max_pixels

    def frames(self, stop: threading.Event) -> Iterator[Optional[Frame]]:
        self.status = "running"
        for i, path in enumerate(self.files):
            if stop.is_set():
                break
            t0 = time.perf_counter()
            image, error = read_image_file(path, self.max_pixels)  # oversized: refused by its header, not moved
            yield Frame(str(path), i, image, error, (time.perf_counter() - t0) * 1e3)
        self.status = "ended"


def is_temp_name(name: str) -> bool:
    """Names a writer uses before the file is complete (renamed into place later)."""
    lower = name.lower()
    return lower.startswith((".", "~")) or lower.endswith(TEMP_SUFFIXES) or lower.endswith("~")


class WatchedFolderSource(Source):
    """Images that appear in a folder while the runtime runs (a camera or PLC writes them).

    A file is read only once its size and modification time have not changed for ``settle_ms`` (so a file
    still being written is never read half), and never while it has a temporary name (``.tmp``, ``.part``,
    leading ``.`` or ``~``...): writers that rename into place are picked up at once after ``settle_ms``.
    ``after`` = "keep" (remember it), "delete", or "move" (into ``done_dir``). A file rewritten later (new
    size or time) is read again. Files present at start are read too (they arrived while it was down).

    Hostile files (:mod:`edge_runtime.image_guard`): one whose header announces more than ``max_pixels`` pixels
    is never decoded and is moved to ``quarantine_dir`` (default ``<folder>/quarantine``) with a
    ``<name>.reason.txt``; a hidden marker ``<folder>/.<name>.decoding`` exists while a file is decoded,
    so a file the process died decoding twice is quarantined at the next start instead of killing it again.
    Either yields a frame with ``error`` set (the loop counts it as skipped); ``quarantined`` counts them.
    """

    kind = "watch"

    def __init__(self, folder: str | Path, settle_ms: float = SETTLE_MS, poll_s: float = 0.05, after: str = "keep",
                 done_dir: Optional[Path] = None, tick_s: float = 1.0, max_pixels: int = MAX_PIXELS,
                 quarantine_dir: Optional[Path] = None) -> None:
        super().__init__(str(folder))
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserInputError(f"watched folder '{folder}' does not exist: create it or pass the folder the camera writes to")
        if after not in ("keep", "delete", "move"):
            raise UserInputError(f"watched folder: after={after!r} must be keep, delete or move")
        self.settle_s, self.poll_s, self.after, self.tick_s = settle_ms / 1e3, poll_s, after, tick_s
        self.done_dir = Path(done_dir) if done_dir else self.folder / "done"
        if after == "move":
            self.done_dir.mkdir(parents=True, exist_ok=True)
        self._seen: dict[str, tuple[int, int, float]] = {}  # name -> (size, mtime_ns, stable since)
        self._done: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) already read (after="keep")
        self.index = 0
        self.max_pixels = max_pixels
        self.quarantine_dir = Path(quarantine_dir) if quarantine_dir else self.folder / QUARANTINE_DIR
        self.markers = DecodeMarkers(self.folder)  # counts the crashes left behind by a dead process
        self.quarantined = 0

    def _scan(self) -> list[tuple[float, str, Path]]:
        """Files whose size and time have been stable for settle_s, oldest first."""
        now = time.monotonic()
        ready, present = [], set()
        try:
            entries = list(os.scandir(self.folder))
        except OSError as exc:
            log.warning("watched folder %s cannot be listed (%s); retrying", self.folder, exc.strerror)
            return []
        for entry in entries:
            name = entry.name
            if is_temp_name(name) or os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
                continue
            try:
                st = entry.stat()
            except OSError:  # vanished between listing and stat
                continue
            if not entry.is_file():
                continue
            present.add(name)
            key = (st.st_size, st.st_mtime_ns)
            if self._done.get(name) == key:
                continue
            prev = self._seen.get(name)
            if prev is None or prev[:2] != key:
                self._seen[name] = (key[0], key[1], now)
                continue
            if key[0] > 0 and now - prev[2] >= self.settle_s:
                ready.append((st.st_mtime, name, Path(entry.path)))
        for gone in set(self._seen) - present:
            del self._seen[gone]
        for gone in set(self._done) - present:
            del self._done[gone]
        return sorted(ready)

    def _finish(self, name: str, path: Path, quarantine_reason: Optional[str] = None) -> None:
        entry = self._seen.pop(name, None)
        if quarantine_reason is not None:
            self.quarantined += 1
            if quarantine(path, self.quarantine_dir, quarantine_reason) is None and entry is not None:
                self._done[name] = entry[:2]  # cannot move it: at least never decode it again in this process
            return
        try:
            if self.after == "delete":
                path.unlink()
            elif self.after == "move":
                os.replace(path, self.done_dir / name)
            elif entry is not None:
                self._done[name] = entry[:2]
        except OSError as exc:
            log.warning("watched folder: cannot %s %s (%s); it is remembered instead", self.after, path, exc.strerror)
            if entry is not None:
                self._done[name] = entry[:2]

    def _read(self, name: str, path: Path) -> tuple[Optional[np.ndarray], Optional[str], Optional[str]]:
        """(image, error, quarantine reason or None) for one settled file."""
        entry = self._seen.get(name)
        size, mtime_ns = (entry[0], entry[1]) if entry is not None else (-1, -1)
        crashes = self.markers.crash_count(name, size, mtime_ns)
        if crashes >= self.markers.max_crashes:
            self.markers.forget(name)
            why = (f"the runtime died {crashes} times while decoding this file (a decoder crash or out of memory): "
                   "quarantined instead of decoded again")
            return None, why, why

        def begin() -> None:
            self.markers.begin(name, size, mtime_ns)
            crashpoint("watch-decode")

        try:
            image, error, refused = read_image_checked(path, self.max_pixels, before_decode=begin)
        finally:
            self.markers.end(name)
        return image, error, (error if refused else None)

    def frames(self, stop: threading.Event) -> Iterator[Optional[Frame]]:
        self.status = "waiting"
        last_tick = time.monotonic()
        while not stop.is_set():
            ready = self._scan()
            for _mtime, name, path in ready:
                if stop.is_set():
                    return
                self.status = "running"
                t0 = time.perf_counter()
                image, error, why = self._read(name, path)
                frame = Frame(str(path), self.index, image, error, (time.perf_counter() - t0) * 1e3)
                self.index += 1
                self._finish(name, path, why)
                yield frame
                last_tick = time.monotonic()
            if not ready:
                self.status = "waiting"
                if time.monotonic() - last_tick >= self.tick_s:
                    last_tick = time.monotonic()
                    yield None
                stop.wait(self.poll_s)


def _open_capture(spec: Any, factory: Callable[..., Any], open_timeout_ms: int, read_timeout_ms: int) -> Any:
    """cv2.VideoCapture with open/read timeouts where OpenCV supports them (a dead RTSP host must not hang)."""
    if factory is cv2.VideoCapture and isinstance(spec, str) and hasattr(cv2, "CAP_PROP_OPEN_TIMEOUT_MSEC"):
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(open_timeout_ms), cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(read_timeout_ms)]
        return factory(spec, cv2.CAP_ANY, params)
    return factory(spec)


class VideoSource(Source):
    """Every frame of a video file once (a frame that fails to decode ends the file, as OpenCV reports it)."""

    kind = "video"

    def __init__(self, path: str | Path, capture_factory: Callable[..., Any] = cv2.VideoCapture) -> None:
        super().__init__(str(path))
        self.path = Path(path)
        if not self.path.is_file():
            raise UserInputError(f"video file '{path}' does not exist")
        self._factory = capture_factory
        self._cap = None

    def frames(self, stop: threading.Event) -> Iterator[Optional[Frame]]:
        self._cap = self._factory(str(self.path))
        if self._cap is None or not self._cap.isOpened():
            raise UserInputError(f"video file '{self.path}' cannot be opened by OpenCV (unknown codec or damaged file)")
        self.status = "running"
        index = 0
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                ok, image = self._cap.read()
                if not ok or image is None:
                    break
                yield Frame(f"{self.path}#{index}", index, image, None, (time.perf_counter() - t0) * 1e3)
                index += 1
        finally:
            self.close()
            self.status = "ended"

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class CameraSource(Source):
    """A camera index (``0``) or a stream URL (``rtsp://...``) through cv2.VideoCapture, forever.

    After ``max_failures`` consecutive failed reads (or a failed open) the capture is released and reopened
    after ``backoff_base * 2**n`` seconds (full jitter, at most ``backoff_cap``); ``None`` ticks keep the loop
    alive meanwhile. ``drops`` and ``reconnects`` count what happened (shown in /metrics and reports).
    ``capture_factory`` is cv2.VideoCapture; tests pass a fake camera.
    """

    kind = "camera"

    def __init__(self, spec: int | str, capture_factory: Callable[..., Any] = cv2.VideoCapture,
                 backoff_base: float = 0.5, backoff_cap: float = 30.0, max_failures: int = 3,
                 open_timeout_ms: int = 5000, read_timeout_ms: int = 5000, tick_s: float = 1.0,
                 rng: Optional[random.Random] = None) -> None:
        super().__init__(f"camera:{spec}" if isinstance(spec, int) else _redact(str(spec)))
        self.spec = spec
        self._factory = capture_factory
        self.backoff_base, self.backoff_cap, self.max_failures = backoff_base, backoff_cap, max_failures
        self.open_timeout_ms, self.read_timeout_ms, self.tick_s = open_timeout_ms, read_timeout_ms, tick_s
        self._rng = rng or random.Random()
        self._cap = None
        self.drops = 0
        self.reconnects = 0
        self.index = 0

    def _backoff(self, attempt: int) -> float:
        return self._rng.uniform(0.5, 1.0) * min(self.backoff_cap, self.backoff_base * 2 ** attempt)

    def _wait(self, seconds: float, stop: threading.Event) -> Iterator[None]:
        end = time.monotonic() + seconds
        while not stop.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            stop.wait(min(left, self.tick_s))
            yield None

    def _open(self) -> bool:
        try:
            cap = _open_capture(self.spec, self._factory, self.open_timeout_ms, self.read_timeout_ms)
        except Exception as exc:  # a driver error must not end a months-long run: treat as "not available"
            log.warning("%s: cannot open (%s)", self.name, exc)
            return False
        if cap is None or not cap.isOpened():
            if cap is not None:
                cap.release()
            return False
        self._cap = cap
        return True

    def frames(self, stop: threading.Event) -> Iterator[Optional[Frame]]:
        attempt = 0
        while not stop.is_set():
            if self._cap is None:
                if not self._open():
                    self.status = "disconnected"
                    delay = self._backoff(attempt)
                    log.warning("%s is not available; retrying in %.1f s (attempt %d)", self.name, delay, attempt + 1)
                    attempt += 1
                    yield from self._wait(delay, stop)
                    continue
                if self.index or attempt:
                    self.reconnects += 1
                    log.info("%s reconnected after %d attempt(s)", self.name, attempt)
                attempt, failures = 0, 0
                self.status = "running"
            t0 = time.perf_counter()
            try:
                ok, image = self._cap.read()
            except Exception as exc:  # same: a failing driver is a dropped camera
                ok, image = False, None
                log.warning("%s: read failed (%s)", self.name, exc)
            if ok and image is not None and getattr(image, "size", 0):
                failures = 0
                frame = Frame(f"{self.name}#{self.index}", self.index, image, None, (time.perf_counter() - t0) * 1e3)
                self.index += 1
                yield frame
                continue
            failures += 1
            if failures >= self.max_failures:
                self.drops += 1
                self.status = "disconnected"
                log.warning("%s dropped (%d failed reads); reconnecting", self.name, failures)
                self.close()
                delay = self._backoff(0)
                attempt = 1
                yield from self._wait(delay, stop)
        self.close()

    def close(self) -> None:
        if self._cap is not None:
            try:
                self._cap.release()
            except Exception:  # releasing a dead device can fail; nothing left to do with it
                pass
            self._cap = None


def _redact(url: str) -> str:
    """rtsp://user:password@host/... -> rtsp://user:***@host/... (logs and reports never hold a password)."""
    if "://" in url and "@" in url.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = url.split("://", 1)
        cred, host = rest.split("@", 1)
        user = cred.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url


def open_source(spec: str, *, watch: bool = False, exclude: Optional[Path] = None, settle_ms: float = SETTLE_MS,
                after: str = "keep", capture_factory: Callable[..., Any] = cv2.VideoCapture) -> Source:
    """A source from the ``--source`` text: a folder (``watch`` = keep watching it), a video file, a camera
    index (``0``) or a stream URL (``rtsp://``, ``http://``)."""
    text = str(spec).strip()
    if text.isdigit():
        return CameraSource(int(text), capture_factory)
    if "://" in text:
        return CameraSource(text, capture_factory)
    path = Path(text)
    if path.is_dir():
        if watch:
            return WatchedFolderSource(path, settle_ms=settle_ms, after=after)
        return FolderSource(path, exclude=exclude)
    if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        return VideoSource(path, capture_factory)
    if path.is_file():
        raise UserInputError(f"source '{spec}' is a {path.suffix or 'suffix-less'} file, not a video "
                             f"({', '.join(VIDEO_SUFFIXES)}); for images pass their folder")
    raise UserInputError(f"source '{spec}' does not exist. Pass a folder of images (add --watch to keep watching "
                         "it), a video file, a camera index such as 0, or a stream URL such as rtsp://host/stream")
