"""Hostile image files on the box: an image bomb is refused by its header before decoding and quarantined,
garbage and truncated JPEGs are skipped, a file the process died decoding twice is quarantined; the real box
keeps running, inspects the next good image, and its peak RSS stays far below what decoding the bomb costs."""
from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_runtime.image_guard import MAX_PIXELS, check_header
from edge_runtime.sources import FolderSource, WatchedFolderSource, decode_bytes
from tests.edgebox import ROOT
from tests.runkit import make_bundle, make_keys, red_image

pytestmark = pytest.mark.timeout(300)


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 8-bit greyscale PNG of zeros: about 0.39 MB on disk, 1.2 GB as the BGR image OpenCV makes of it."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte + one row of zeros
    idat = b"".join([comp.compress(row) for _ in range(height)] + [comp.flush()])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return png_bomb()


def garbage_jpeg(seed: int) -> bytes:
    """JPEG start and end markers around seeded random bytes (passes the truncation check, not the decoder)."""
    rng = random.Random(seed)
    return b"\xff\xd8\xff\xe0" + bytes(rng.randrange(256) for _ in range(5000)) + b"\xff\xd9"


def _good(red: int = 200, seed: int = 0, ext: str = ".png") -> bytes:
    return cv2.imencode(ext, red_image(red, seed))[1].tobytes()


def test_header_sizes_of_every_format_and_the_bomb_is_refused_before_decoding(bomb):
    assert 300_000 < len(bomb) < 500_000  # the 0.39 MB file of the report
    for ext in (".png", ".jpg", ".bmp", ".tiff", ".webp"):
        data = cv2.imencode(ext, np.zeros((37, 53, 3), np.uint8))[1].tobytes()
        h = check_header(data)
        assert (h.width, h.height, h.error, h.refused) == (53, 37, None, False), ext
    h = check_header(bomb)
    assert (h.fmt, h.width, h.height, h.refused) == ("png", 20000, 20000, True)
    assert "20000x20000" in h.error and "MAX_PIXELS" in h.error
    image, error = decode_bytes(bomb)
    assert image is None and error == h.error
    # a progressive JPEG (SOF2) after an EXIF-sized APP1 segment is sized too; 0x0 and unknown formats are refused
    jpg = _good(ext=".jpg")
    app1 = b"\xff\xe1" + struct.pack(">H", 30002) + bytes(30000)
    h = check_header(jpg[:2] + app1 + jpg[2:].replace(b"\xff\xc0", b"\xff\xc2", 1))
    assert (h.width, h.height, h.error) == (128, 96, None)
    zero = bytearray(_good()); zero[16:24] = bytes(8)
    assert check_header(bytes(zero)).error == "PNG header without a usable image size (corrupt)"
    assert decode_bytes(b"P6\n20000 20000\n255\n" + bytes(64))[1] == "not a decodable image (corrupt or unknown format)"
    # just under / over the limit
    assert not check_header(png_bomb(100, 100), max_pixels=10_000).refused
    assert check_header(png_bomb(100, 101), max_pixels=10_000).refused
    assert MAX_PIXELS == 40_000_000


def test_folder_source_refuses_the_bomb_and_reads_the_next_image(tmp_path, bomb):
    (tmp_path / "a_bomb.png").write_bytes(bomb)
    (tmp_path / "b_good.png").write_bytes(_good())
    frames = list(FolderSource(tmp_path).frames(threading.Event()))
    assert frames[0].image is None and "refused before decoding" in frames[0].error
    assert frames[1].image.shape == (96, 128, 3)
    assert (tmp_path / "a_bomb.png").exists()  # a one-shot folder run reports it, it does not move the user's file


def _oldest_first(folder: Path, names: list[str]) -> None:
    for k, name in enumerate(names):  # the watched folder reads oldest first
        os.utime(folder / name, ns=(1_600_000_000_000_000_000 + k * 10**9,) * 2)


# Peak RSS from VmHWM of this process's own address space: getrusage's ru_maxrss also keeps the high-water mark
# of the address space replaced at exec (the pytest parent's, 2 GB late in a full suite run), so it is not the box's.
_BOX = """
import json, sys
from edge_runtime.cli import main
rc = main(sys.argv[1:])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print("RESULT " + json.dumps({"rc": rc, "maxrss_mb": int(hwm) / 1024}))
"""


def test_the_box_quarantines_an_image_bomb_and_inspects_the_next_good_image_with_bounded_rss(tmp_path, bomb):
    keys = make_keys(tmp_path)
    bundle = make_bundle(tmp_path, keys)
    watch = tmp_path / "camera"
    watch.mkdir()
    (watch / "p1_bomb.png").write_bytes(bomb)
    (watch / "p2_garbage.jpg").write_bytes(garbage_jpeg(seed=7))
    (watch / "p3_truncated.jpg").write_bytes(_good(ext=".jpg")[:400] + b"\xff\xd9")
    (watch / "p4_good.png").write_bytes(_good(220, seed=3))
    _oldest_first(watch, ["p1_bomb.png", "p2_garbage.jpg", "p3_truncated.jpg", "p4_good.png"])
    out = tmp_path / "out"
    args = ["run", "--bundle", str(bundle), "--public-key", str(keys.public), "--source", str(watch), "--watch",
            "--settle-ms", "50", "--max-frames", "4", "--device-id", "box-1", "--out", str(out),
            "--state-dir", str(tmp_path / "state"), "--metrics-port", "-1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _BOX, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["rc"] == 0
    (pred,) = sorted((out / "predictions").glob("*.jsonl"))
    lines = [json.loads(line) for line in pred.read_text().splitlines()]
    by_name = {Path(rec["source"]).name: rec for rec in lines}
    assert set(by_name) == {"p1_bomb.png", "p2_garbage.jpg", "p3_truncated.jpg", "p4_good.png"}
    assert "refused before decoding" in json.dumps(by_name["p1_bomb.png"])
    assert by_name["p4_good.png"].get("verdict") in ("OK", "NG"), by_name["p4_good.png"]  # inspected
    for bad in ("p2_garbage.jpg", "p3_truncated.jpg"):
        assert by_name[bad].get("verdict") not in ("OK", "NG")
    # the bomb left the watched folder (a restart cannot trip on it) and says why
    assert not (watch / "p1_bomb.png").exists()
    assert (watch / "quarantine" / "p1_bomb.png").read_bytes() == bomb
    assert "20000x20000" in (watch / "quarantine" / "p1_bomb.png.reason.txt").read_text()
    assert not list(watch.glob(".*.decoding"))  # no marker left behind by a clean run
    # decoding the bomb needs 1.2 GB for the BGR image alone; the whole box (model, ONNX Runtime) stays far below
    print("box peak RSS MB", result["maxrss_mb"], by_name["p4_good.png"])
    assert result["maxrss_mb"] < 700, result


_WATCH = """
import json, sys, threading
from pathlib import Path
from edge_runtime.sources import WatchedFolderSource
src = WatchedFolderSource(Path(sys.argv[1]), settle_ms=20, poll_s=0.01)
want = int(sys.argv[2])
seen = []
for frame in src.frames(threading.Event()):
    if frame is None:
        continue
    seen.append({"name": Path(frame.source).name, "ok": frame.image is not None, "error": frame.error})
    if len(seen) >= want:
        break
print("RESULT " + json.dumps({"frames": seen, "quarantined": src.quarantined}), flush=True)
"""


def _watch_child(folder: Path, want: int, trace: Path, pause: bool) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DEFECTKIT_CRASHPOINT_TRACE": str(trace)}
    if pause:
        env["DEFECTKIT_CRASHPOINT_PAUSE"] = "watch-decode"
    else:
        env.pop("DEFECTKIT_CRASHPOINT_PAUSE", None)
    return subprocess.Popen([sys.executable, "-c", _WATCH, str(folder), str(want)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_while_decoding(folder: Path, trace: Path) -> None:
    """Start the watcher, let it reach the decoder on the first file, and kill -9 it there (a decoder crash)."""
    paused = Path(f"{trace}.paused")
    if paused.exists():
        paused.unlink()
    child = _watch_child(folder, 1, trace, pause=True)
    try:
        for _ in range(600):  # bounded: the child writes the file when it blocks in the decoder's window
            if paused.exists() or child.poll() is not None:
                break
            threading.Event().wait(0.05)
        assert paused.exists(), child.communicate(timeout=10)
        assert [p.name for p in folder.glob(".*.decoding")] == [".a_crasher.png.decoding"]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)


def test_a_file_the_process_died_decoding_twice_is_quarantined(tmp_path):
    folder = tmp_path / "camera"
    folder.mkdir()
    (folder / "a_crasher.png").write_bytes(_good(90, seed=1))
    (folder / "b_good.png").write_bytes(_good(200, seed=2))
    _oldest_first(folder, ["a_crasher.png", "b_good.png"])
    trace = tmp_path / "trace.txt"
    _kill_while_decoding(folder, trace)  # crash 1
    _kill_while_decoding(folder, trace)  # crash 2: the marker counted the first one
    assert "crashes\": 1" in (folder / ".a_crasher.png.decoding").read_text()
    child = _watch_child(folder, 2, trace, pause=False)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err[-2000:]
    result = json.loads(out.split("RESULT ", 1)[1])
    first, second = result["frames"]
    assert first["name"] == "a_crasher.png" and not first["ok"] and "died 2 times" in first["error"]
    assert second == {"name": "b_good.png", "ok": True, "error": None}
    assert result["quarantined"] == 1
    assert (folder / "quarantine" / "a_crasher.png").exists() and not (folder / "a_crasher.png").exists()
    assert "died 2 times" in (folder / "quarantine" / "a_crasher.png.reason.txt").read_text()
    assert not list(folder.glob(".*.decoding"))


def test_one_crash_then_a_clean_decode_clears_the_count(tmp_path):
    folder = tmp_path / "camera"
    folder.mkdir()
    (folder / "a_crasher.png").write_bytes(_good(90, seed=1))
    trace = tmp_path / "trace.txt"
    _kill_while_decoding(folder, trace)
    child = _watch_child(folder, 1, trace, pause=False)
    out, err = child.communicate(timeout=120)
    result = json.loads(out.split("RESULT ", 1)[1])
    assert result["frames"] == [{"name": "a_crasher.png", "ok": True, "error": None}]
    assert result["quarantined"] == 0 and not list(folder.glob(".*.decoding"))
    assert not (folder / "quarantine").exists()


def test_watched_folder_in_process_quarantines_bomb_and_keeps_going(tmp_path, bomb):
    (tmp_path / "a.png").write_bytes(bomb)
    (tmp_path / "b.png").write_bytes(_good())
    _oldest_first(tmp_path, ["a.png", "b.png"])
    src = WatchedFolderSource(tmp_path, settle_ms=10, poll_s=0.01, after="move")
    got = []
    for frame in src.frames(threading.Event()):
        if frame is not None:
            got.append(frame)
            if len(got) == 2:
                break
    assert got[0].image is None and "refused before decoding" in got[0].error
    assert got[1].image.shape == (96, 128, 3)
    assert sorted(p.name for p in (tmp_path / "quarantine").iterdir()) == ["a.png", "a.png.reason.txt"]
    assert [p.name for p in (tmp_path / "done").iterdir()] == ["b.png"]  # the good one went the normal way
