"""Refuse image bombs by their header, before any decoder allocates a pixel; quarantine what keeps crashing.

A 0.39 MB PNG of zeros can announce 20000x20000 pixels: OpenCV allocates the whole 1.2 GB BGR image (and
more while decoding), over the service's ``MemoryMax``, the kernel kills the box, systemd restarts it, the
file is still in the watched folder, and the box crash-loops (reverting a good bundle during probation).
So every file is sized from its header first, with the standard library only:

* PNG ``IHDR``, JPEG ``SOFn`` (any of the 13 frame types, after any APPn/EXIF segments), BMP
  ``BITMAPINFOHEADER``/``BITMAPCOREHEADER``, TIFF's first IFD (ImageWidth/ImageLength), WebP
  ``VP8 ``/``VP8L``/``VP8X``.
* A header announcing more than :data:`MAX_PIXELS` pixels is refused (:class:`HeaderCheck.refused`): it is never
  decoded. A format not in that list is not decoded either (OpenCV would read PPM, HDR, EXR... of any size).

:data:`MAX_PIXELS` lives here (a constant, passed as ``max_pixels`` to the sources): 40 MP, i.e. 120 MB once
decoded as BGR, more than any industrial line camera in use (a 31 MP sensor is 6464x4852) and about 400x the
largest model input the kit exports (640x640); well under the unit's ``MemoryMax=1500M`` with a model loaded.

:class:`DecodeMarkers` covers what a header cannot show (a decoder bug, a crafted stream that kills the
process): a marker file is written before a file is decoded and removed after; a marker found at start means
the process died while decoding that file (one crash). A file with two crashes is quarantined, not decoded.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

log = logging.getLogger("defectkit.image_guard")

MAX_PIXELS = 40_000_000
MAX_DECODE_CRASHES = 2  # a file the process died decoding this many times is quarantined
QUARANTINE_DIR = "quarantine"  # inside the watched folder
MARKER_SUFFIX = ".decoding"  # ".<name>.decoding" beside the file while it is decoded (hidden: never read as an image)

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_NO_LENGTH = {0x01, 0xD8} | set(range(0xD0, 0xD8))


@dataclass
class HeaderCheck:
    """What the header says: ``fmt`` (png | jpeg | bmp | tiff | webp | None for unknown), ``width``/``height``
    (None if not found), ``error`` (why the file must not be decoded) and ``refused`` (True for a size refusal:
    the file goes to quarantine)."""

    fmt: Optional[str]
    width: Optional[int] = None
    height: Optional[int] = None
    error: Optional[str] = None
    refused: bool = False


def _png(data: bytes) -> Tuple[Optional[int], Optional[int]]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None, None
    return struct.unpack(">II", data[16:24])


def _jpeg(data: bytes) -> Tuple[Optional[int], Optional[int]]:
    i, n = 2, len(data)
    while i + 1 < n:
        if data[i] != 0xFF:
            return None, None  # not at a marker: corrupt
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker in _JPEG_NO_LENGTH:
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None, None
        if i + 2 > n:
            break
        length = struct.unpack(">H", data[i:i + 2])[0]
        if length < 2:
            return None, None
        if marker in _JPEG_SOF:
            if i + 7 > n:
                break
            height, width = struct.unpack(">HH", data[i + 3:i + 7])
            return width, height
        i += length
    return None, None


def _bmp(data: bytes) -> Tuple[Optional[int], Optional[int]]:
    if len(data) < 26:
        return None, None
    dib = struct.unpack("<I", data[14:18])[0]
    if dib == 12:
        return struct.unpack("<HH", data[18:22])
    width, height = struct.unpack("<ii", data[18:26])
    return abs(width), abs(height)


def _tiff(data: bytes) -> Tuple[Optional[int], Optional[int]]:
    end = "<" if data[:2] == b"II" else ">"
    if len(data) < 8:
        return None, None
    off = struct.unpack(end + "I", data[4:8])[0]
    if off + 2 > len(data):
        return None, None
    count = struct.unpack(end + "H", data[off:off + 2])[0]
    dims: Dict[int, int] = {}
    for k in range(count):
        e = off + 2 + 12 * k
        if e + 12 > len(data):
            break
        tag, typ = struct.unpack(end + "HH", data[e:e + 4])
        if tag in (256, 257):
            if typ == 3:  # SHORT
                dims[tag] = struct.unpack(end + "H", data[e + 8:e + 10])[0]
            elif typ == 4:  # LONG
                dims[tag] = struct.unpack(end + "I", data[e + 8:e + 12])[0]
    return dims.get(256), dims.get(257)


def _webp(data: bytes) -> Tuple[Optional[int], Optional[int]]:
    if len(data) < 30:
        return None, None
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = struct.unpack("<I", data[21:25])[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    return None, None


def sniff(data: bytes) -> Optional[str]:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


_READERS = {"png": _png, "jpeg": _jpeg, "bmp": _bmp, "tiff": _tiff, "webp": _webp}


def check_header(data: bytes, max_pixels: int = MAX_PIXELS) -> HeaderCheck:
    """Size an encoded image from its header (standard library only, never decodes pixels)."""
    fmt = sniff(data)
    if fmt is None:
        return HeaderCheck(None, error="not a decodable image (corrupt or unknown format)")
    try:
        width, height = _READERS[fmt](data)
    except (struct.error, IndexError):
        width = height = None
    if not width or not height:
        return HeaderCheck(fmt, width, height, error=f"{fmt.upper()} header without a usable image size (corrupt)")
    if width * height > max_pixels:
        return HeaderCheck(fmt, width, height, refused=True, error=(
            f"refused before decoding: the {fmt.upper()} header announces {width}x{height} pixels "
            f"({width * height / 1e6:.1f} MP), over the box's limit of {max_pixels / 1e6:.1f} MP "
            f"(edge_runtime/image_guard.py MAX_PIXELS); an image bomb or a wrong camera setting"))
    return HeaderCheck(fmt, width, height)


def quarantine(path: Path, qdir: Path, reason: str) -> Optional[Path]:
    """Move ``path`` into ``qdir`` (a free name) with ``<name>.reason.txt`` beside it; None if it cannot be moved."""
    from edge_runtime.fileio import atomic_write_text

    try:
        qdir.mkdir(parents=True, exist_ok=True)
        dest = qdir / path.name
        k = 1
        while dest.exists():
            dest = qdir / f"{path.stem}.{k}{path.suffix}"
            k += 1
        os.replace(path, dest)
    except OSError as exc:
        log.error("cannot quarantine %s into %s (%s): it stays where it is and is skipped while the box runs",
                  path, qdir, exc.strerror or exc)
        return None
    try:
        atomic_write_text(dest.with_name(dest.name + ".reason.txt"),
                          f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {path} quarantined by the defectkit edge box:\n"
                          f"{reason}\n")
    except OSError as exc:
        log.warning("quarantined %s but cannot write its reason file (%s)", dest, exc.strerror or exc)
    log.error("quarantined %s -> %s: %s", path, dest, reason)
    return dest


class DecodeMarkers:
    """``<folder>/.<name>.decoding`` exists while ``<name>`` is being decoded (with the crashes counted so far).

    Markers found at start belong to a process that died while decoding: each counts as one crash for its
    file (the count is kept only while that same file, by size and modification time, is still there)."""

    def __init__(self, folder: Path, max_crashes: int = MAX_DECODE_CRASHES) -> None:
        self.dir = Path(folder)
        self.max_crashes = max_crashes
        self.crashes: Dict[str, Tuple[int, int, int]] = {}  # name -> (size, mtime_ns, crashes)
        self.usable = True
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            names = []
        except OSError as exc:
            log.warning("cannot read decode markers in %s (%s)", self.dir, exc.strerror or exc)
            names = []
        for marker in names:
            if not (marker.startswith(".") and marker.endswith(MARKER_SUFFIX)):
                continue
            try:
                doc = json.loads((self.dir / marker).read_text(encoding="utf-8"))
                name, size, mtime_ns = str(doc["name"]), int(doc["size"]), int(doc["mtime_ns"])
                crashes = int(doc.get("crashes", 0)) + 1
            except (OSError, ValueError, KeyError, TypeError):
                continue
            self.crashes[name] = (size, mtime_ns, crashes)
            log.warning("the runtime died while decoding %s (crash %d of %d before it is quarantined)",
                        name, crashes, max_crashes)

    def crash_count(self, name: str, size: int, mtime_ns: int) -> int:
        entry = self.crashes.get(name)
        return entry[2] if entry is not None and entry[:2] == (size, mtime_ns) else 0

    def _path(self, name: str) -> Path:
        return self.dir / f".{name}{MARKER_SUFFIX}"

    def begin(self, name: str, size: int, mtime_ns: int) -> None:
        """Write the marker. No fsync: it must survive the death of the process (the page cache does), not a
        power cut (then nothing was decoding a bomb); a marker torn by a crash while writing it is ignored."""
        if not self.usable:
            return
        doc = {"name": name, "size": size, "mtime_ns": mtime_ns, "crashes": self.crash_count(name, size, mtime_ns),
               "pid": os.getpid(), "since": time.time()}
        try:
            self._path(name).write_text(json.dumps(doc), encoding="utf-8")
        except OSError as exc:
            self.usable = False
            log.warning("cannot write decode markers in %s (%s): a file that crashes the decoder will not be "
                        "quarantined automatically", self.dir, exc.strerror or exc)

    def end(self, name: str) -> None:
        self.crashes.pop(name, None)
        if not self.usable:
            return
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove decode marker of %s (%s)", name, exc.strerror or exc)

    def forget(self, name: str) -> None:
        self.end(name)


__all__ = ["MAX_PIXELS", "MAX_DECODE_CRASHES", "HeaderCheck", "check_header", "quarantine", "DecodeMarkers"]
