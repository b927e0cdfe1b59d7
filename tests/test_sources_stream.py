"""A real network camera stream: MJPEG over HTTP served on loopback by ffmpeg (Debian's package), read by the
box's CameraSource through a real cv2.VideoCapture. No fake capture: this is the path a line camera takes.

ffmpeg's HTTP server (``-listen 1``) serves one client and exits, so a test never probes the port: the source
itself retries until the server is up (what the box does when it starts before the camera), and a second
server on the same URL stands in for a camera that comes back after a network cut.
"""
from __future__ import annotations

import random
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_runtime.sources import CameraSource, open_source

FFMPEG = shutil.which("ffmpeg")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _still(path: Path, colour: tuple[int, int, int]) -> Path:
    """A 320x240 frame: black with a coloured square at (60..160, 40..140); JPEG keeps colours near enough."""
    img = np.zeros((240, 320, 3), np.uint8)
    cv2.rectangle(img, (60, 40), (160, 140), colour, -1)
    cv2.imwrite(str(path), img)
    return path


def _serve(image: Path, url: str, seconds: int = 60) -> subprocess.Popen:
    """ffmpeg streaming ``image`` as MJPEG at 10 fps on ``url`` (one client), for at most ``seconds``."""
    assert FFMPEG, "ffmpeg is missing: `make test` installs it (scripts/host_deps.sh); it serves the real stream"
    return subprocess.Popen([FFMPEG, "-hide_banner", "-loglevel", "error", "-re", "-loop", "1", "-framerate", "10",
                             "-i", str(image), "-t", str(seconds), "-f", "mpjpeg", "-q:v", "3", "-listen", "1", url],
                            stdin=subprocess.DEVNULL)


def _take(source: CameraSource, stop: threading.Event, n: int) -> list:
    """The next ``n`` real frames (None ticks skipped); gives up only when the source ends."""
    frames = []
    for frame in source.frames(stop):
        if frame is not None:
            frames.append(frame)
            if len(frames) == n:
                break
    return frames


def test_mjpeg_stream_from_a_real_server_is_read_and_decoded(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}/camera.mjpg"
    server = _serve(_still(tmp_path / "red.png", (0, 0, 255)), url)
    try:
        source = open_source(url)
        assert isinstance(source, CameraSource)
        source._rng = random.Random(0)  # seeded reconnect jitter
        source.backoff_base, source.tick_s = 0.05, 0.05
        stop = threading.Event()
        frames = _take(source, stop, 15)
        stop.set()
        source.close()
    finally:
        server.kill()
        server.wait()
    assert len(frames) == 15
    assert [f.index for f in frames] == list(range(15))
    img = frames[-1].image
    assert img.shape == (240, 320, 3)
    inside, outside = img[90, 110].astype(int), img[200, 280].astype(int)
    assert inside[2] > 200 and inside[0] < 60 and inside[1] < 60, f"square pixel {inside} is not red"
    assert outside.max() < 40, f"background pixel {outside} is not black"


def test_stream_source_reconnects_when_the_camera_comes_back(tmp_path: Path) -> None:
    """The server goes away mid-stream (a network cut) and a new one serves the same URL: the source counts
    the drop, reconnects and delivers the new camera's frames, with frame indices continuing."""
    url = f"http://127.0.0.1:{_free_port()}/camera.mjpg"
    first = _serve(_still(tmp_path / "red.png", (0, 0, 255)), url)
    source = CameraSource(url, backoff_base=0.05, backoff_cap=0.2, max_failures=2, tick_s=0.05,
                          open_timeout_ms=2000, read_timeout_ms=2000, rng=random.Random(0))
    stop = threading.Event()
    frames = source.frames(stop)
    second = None
    try:
        before = []
        for frame in frames:
            if frame is not None:
                before.append(frame)
                if len(before) == 5:
                    break
        first.kill()
        first.wait()
        second = _serve(_still(tmp_path / "green.png", (0, 255, 0)), url)
        after, ticks = None, 0
        for frame in frames:
            if frame is None:
                ticks += 1  # the source is waiting to reconnect; a broken reconnect must fail, not hang
                if ticks > 400:
                    break
            elif frame.image[90, 110, 1] > 200 and frame.image[90, 110, 2] < 60:
                after = frame
                break
        stop.set()
    finally:
        source.close()
        for proc in (first, second):
            if proc is not None:
                proc.kill()
                proc.wait()
    assert after is not None, "no frame of the second (green) camera arrived"
    assert source.reconnects >= 1
    assert after.index > before[-1].index
