"""Sources that read files: image folder, watched folder (never half-written files), video file; decoding."""
from __future__ import annotations

import os
import threading
import time

import cv2
import numpy as np
import pytest

from edge_runtime.errors import UserInputError
from edge_runtime.sources import (CameraSource, FolderSource, VideoSource, WatchedFolderSource, decode_bytes,
                                  is_temp_name, open_source)
from tests.runkit import red_image

pytestmark = pytest.mark.timeout(60)


def _png(red: int, seed: int = 0) -> bytes:
    return cv2.imencode(".png", red_image(red, seed))[1].tobytes()


def _jpg(red: int, seed: int = 0) -> bytes:
    return cv2.imencode(".jpg", red_image(red, seed))[1].tobytes()


def test_decode_refuses_truncated_jpeg_and_png_that_opencv_would_accept():
    jpg, png = _jpg(200), _png(200)
    assert decode_bytes(jpg)[0].shape == (96, 128, 3)
    # OpenCV decodes a JPEG cut in half without an error (grey rows): the runtime must not inspect that
    half = jpg[: len(jpg) * 2 // 3]
    assert cv2.imdecode(np.frombuffer(half, np.uint8), cv2.IMREAD_COLOR) is not None
    assert decode_bytes(half) == (None, "truncated JPEG (no end-of-image marker)")
    assert decode_bytes(png[:-20]) == (None, "truncated PNG (no IEND chunk)")
    assert decode_bytes(b"") == (None, "empty file")
    assert decode_bytes(b"GIF? no, garbage" * 10) == (None, "not a decodable image (corrupt or unknown format)")
    assert decode_bytes(jpg + b"\x00" * 16)[0] is not None  # zero padding after the end marker is fine


def test_folder_source_yields_every_image_once_in_order_and_flags_bad_ones(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.png").write_bytes(_png(10))
    (tmp_path / "b" / "c.jpg").write_bytes(_jpg(20))
    (tmp_path / "b" / "d.jpg").write_bytes(_jpg(30)[:100])
    (tmp_path / "notes.txt").write_text("not an image")
    frames = list(FolderSource(tmp_path).frames(threading.Event()))
    assert [(f.source.rsplit("/", 1)[1], f.index, f.image is None) for f in frames] == [
        ("a.png", 0, False), ("c.jpg", 1, False), ("d.jpg", 2, True)]
    assert frames[2].error.startswith("truncated JPEG") and frames[0].decode_ms > 0
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="no images found in"):
        FolderSource(tmp_path / "empty")


def _collect(source, stop, out, limit):
    for frame in source.frames(stop):
        if frame is not None:
            out.append(frame)
            if len(out) >= limit:
                stop.set()


def test_watched_folder_never_reads_a_half_written_file(tmp_path):
    """A slow writer (a camera over a network share) writes a PNG in chunks with pauses shorter than the
    settle time: the source must wait for the complete file, and decode it whole."""
    # pauses of 0.1 s against a settle time of 1.5 s: a loaded machine may stretch a pause many times over
    # before the source could take the half-written file for complete
    src = WatchedFolderSource(tmp_path, settle_ms=1500, poll_s=0.02)
    stop, got = threading.Event(), []
    reader = threading.Thread(target=_collect, args=(src, stop, got, 2))
    reader.start()
    data = _png(180, 1)
    path = tmp_path / "slow.png"
    with open(path, "wb") as fh:
        for i in range(0, len(data), len(data) // 6 + 1):
            fh.write(data[i:i + len(data) // 6 + 1])
            fh.flush()
            time.sleep(0.1)
    assert got == []  # nothing read while the writer was busy
    (tmp_path / "fast.jpg").write_bytes(_jpg(40, 2))
    reader.join(10)
    stop.set()
    assert [f.source.rsplit("/", 1)[1] for f in got] == ["slow.png", "fast.jpg"]
    assert np.array_equal(got[0].image, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))
    assert got[0].error is None and got[1].index == 1


def test_watched_folder_ignores_temporary_names_until_renamed_and_rereads_rewritten_files(tmp_path):
    src = WatchedFolderSource(tmp_path, settle_ms=50, poll_s=0.01, tick_s=0.05)
    stop = threading.Event()
    gen = src.frames(stop)
    for name in (".cam_0001.png", "cam_0001.png.part", "cam_0001.png.tmp", "~cam.png", "cam.png~"):
        assert is_temp_name(name)
        (tmp_path / name).write_bytes(_png(90))
    (tmp_path / "readme.txt").write_text("x")
    assert next(gen) is None and next(gen) is None  # only idle ticks: nothing complete yet
    os.replace(tmp_path / "cam_0001.png.part", tmp_path / "cam_0001.png")
    frame = next(f for f in gen if f is not None)
    assert frame.source.endswith("/cam_0001.png") and frame.image is not None
    assert next(gen) is None  # not read twice
    time.sleep(0.02)
    (tmp_path / "cam_0001.png").write_bytes(_png(200, 5))  # the camera overwrote it: a new part
    again = next(f for f in gen if f is not None)
    assert again.source.endswith("/cam_0001.png") and again.index == 1
    stop.set()
    assert list(gen) == []


@pytest.mark.parametrize("after", ["move", "delete"])
def test_watched_folder_moves_or_deletes_what_it_read(tmp_path, after):
    src = WatchedFolderSource(tmp_path, settle_ms=0, poll_s=0.01, after=after)
    (tmp_path / "p1.jpg").write_bytes(_jpg(10))
    (tmp_path / "p2.jpg").write_bytes(b"\xff\xd8\xff broken")
    stop, got = threading.Event(), []
    _collect(src, stop, got, 2)
    assert [f.image is None for f in got] == [False, True]  # the broken one is yielded with its error, then handled
    assert sorted(p.name for p in tmp_path.iterdir()) == (["done"] if after == "move" else [])
    if after == "move":
        assert sorted(p.name for p in (tmp_path / "done").iterdir()) == ["p1.jpg", "p2.jpg"]


def test_watched_folder_stops_at_once_on_the_stop_event(tmp_path):
    src = WatchedFolderSource(tmp_path, poll_s=0.5, tick_s=10)
    stop = threading.Event()
    t = threading.Thread(target=lambda: list(src.frames(stop)))
    t.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    stop.set()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - t0 < 1.0


def test_video_file_source_reads_every_frame(tmp_path):
    path = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (128, 96))
    for i in range(12):
        writer.write(red_image(20 * i, i))
    writer.release()
    src = open_source(str(path))
    assert isinstance(src, VideoSource)
    frames = list(src.frames(threading.Event()))
    assert len(frames) == 12 and frames[-1].source.endswith("line.avi#11") and frames[5].image.shape == (96, 128, 3)
    assert src.status == "ended"
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(UserInputError, match="cannot be opened by OpenCV"):
        list(open_source(str(bad)).frames(threading.Event()))


def test_open_source_picks_the_kind_and_explains_what_it_accepts(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(1))
    assert isinstance(open_source(str(tmp_path)), FolderSource)
    assert isinstance(open_source(str(tmp_path), watch=True), WatchedFolderSource)
    cam = open_source("2")
    assert isinstance(cam, CameraSource) and cam.spec == 2 and cam.name == "camera:2"
    rtsp = open_source("rtsp://op:s3cret@10.0.0.7:554/stream1")
    assert isinstance(rtsp, CameraSource) and rtsp.name == "rtsp://op:***@10.0.0.7:554/stream1"  # no password in logs
    with pytest.raises(UserInputError, match=r"source '.*nope' does not exist\. Pass a folder of images"):
        open_source(str(tmp_path / "nope"))
    with pytest.raises(UserInputError, match=r"is a \.png file, not a video"):
        open_source(str(tmp_path / "a.png"))
    with pytest.raises(UserInputError, match="after='archive' must be keep, delete or move"):
        WatchedFolderSource(tmp_path, after="archive")
