"""Camera / stream source: reconnect with exponential backoff when the camera drops, clean stop.

There is no camera on this machine: a fake VideoCapture (tests/runkit.FakeCapture) stands in for one. It
plays a script of good frames, failed reads and driver exceptions, and the factory hands out one capture
per (re)open, or captures that cannot be opened, as a camera that is unplugged would.
"""
from __future__ import annotations

import random
import threading
import time

import pytest

from edge_runtime.sources import CameraSource
from tests.runkit import FakeCameraFactory, FakeCapture, red_image

pytestmark = pytest.mark.timeout(60)


def _frames(n, red=100):
    return [red_image(red, i) for i in range(n)]


def _take(source, n, stop, ticks=None):
    out = []
    for item in source.frames(stop):
        if item is None:
            if ticks is not None:
                ticks.append(time.monotonic())
            continue
        out.append(item)
        if len(out) >= n:
            break
    return out


def test_camera_drop_and_recovery_with_exponential_backoff():
    factory = FakeCameraFactory([
        FakeCapture(script=_frames(3)),  # 3 frames, then the camera drops (reads fail)
        FakeCapture(opened=False),  # unplugged: cannot open
        FakeCapture(opened=False),
        FakeCapture(script=[None, RuntimeError("driver hiccup")] + _frames(2)),  # back, two bad reads, frames
    ])
    cam = CameraSource(0, factory, backoff_base=0.05, backoff_cap=1.0, max_failures=3, tick_s=0.01,
                       rng=random.Random(0))
    stop, ticks = threading.Event(), []
    t0 = time.monotonic()
    frames = _take(cam, 5, stop, ticks)
    took = time.monotonic() - t0
    assert [f.index for f in frames] == [0, 1, 2, 3, 4] and all(f.image is not None for f in frames)
    assert [f.source for f in frames[:2]] == ["camera:0#0", "camera:0#1"]
    assert cam.drops == 1 and cam.reconnects == 1 and len(factory.opened) == 4
    assert factory.opened[0].released  # the dropped capture was released before reopening
    assert factory.opened[0].reads == 3 + 3  # three frames, then max_failures failed reads
    # waits: after the drop (1x base), then after two failed opens (2x, 4x base), each jittered in [0.5, 1]
    assert 0.5 * 0.05 * (1 + 2 + 4) <= took < 2.0
    assert len(ticks) >= 5  # the loop kept getting idle ticks while the camera was away
    stop.set()
    cam.close()
    assert factory.opened[-1].released


def test_backoff_is_capped_and_a_stop_during_backoff_returns_at_once():
    factory = FakeCameraFactory([])  # never comes back
    cam = CameraSource("rtsp://10.0.0.9/live", factory, backoff_base=1.0, backoff_cap=4.0, tick_s=0.05,
                       rng=random.Random(1))
    assert max(cam._backoff(n) for n in range(20)) <= 4.0
    assert cam._backoff(0) <= 1.0 and cam._backoff(10) >= 2.0
    stop = threading.Event()
    seen = []
    t = threading.Thread(target=lambda: seen.extend(_take(cam, 1, stop)))
    t.start()
    time.sleep(0.3)
    assert cam.status == "disconnected" and factory.specs[0] == "rtsp://10.0.0.9/live"
    t0 = time.monotonic()
    stop.set()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - t0 < 0.5 and seen == []


def test_camera_that_raises_on_open_is_retried_not_fatal():
    class Exploding(FakeCameraFactory):
        def __call__(self, spec, *args):
            if not self.opened:
                self.opened.append(None)
                raise OSError("v4l2: device busy")
            return super().__call__(spec, *args)

    factory = Exploding([FakeCapture(script=_frames(1))])
    cam = CameraSource(1, factory, backoff_base=0.01, tick_s=0.01)
    frames = _take(cam, 1, threading.Event())
    assert len(frames) == 1 and cam.reconnects == 1
