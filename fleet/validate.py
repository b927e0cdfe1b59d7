"""What the collector accepts, beyond the wire schemas of ``edge_runtime`` (which the box validates with too).

A body is parsed with bounds (:func:`parse_bounded_json`: nesting depth, integer digits, no NaN/Infinity,
no float that overflows), then checked field by field (:func:`report_problems`,
:func:`hard_example_problems`): ids and names by ``re.fullmatch`` (``$`` also matches before a final newline,
so ``"x\\n"`` and ``"x"`` were two ids), extras only scalars, strings, numbers, maps and lists bounded, boxes
finite and ordered. Every problem names its field; the routes answer 422 with them (400 for a body that is not
bounded JSON at all). The stored body is re-serialised from the checked object, so ``GET /api/v1/reports``
only ever serves what passed here.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, List, Optional, Tuple

ID_RE = re.compile(r"[0-9a-f]{32}")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}")  # extra keys, feature and class names
MAX_INT = 2 ** 53  # exact in a JSON double, fits a 64-bit column
MAX_ABS_FLOAT = 1e300
MAX_STR = 256
MAX_FEATURES = 64
MAX_EXTRAS = 32
MAX_CLASSES = 256
MAX_DETECTIONS = 200
MAX_INT_DIGITS = 20


class BadJson(ValueError):
    """The body is not bounded JSON (too deep, a number too large, NaN/Infinity, not UTF-8)."""


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)


def _depth_ok(text: str, limit: int) -> None:
    """Refuse nesting deeper than ``limit`` before json.loads recurses into it (100k levels would blow the stack)."""
    depth = 0
    for ch in re.findall(r"[\[\]{}]", _JSON_STRING.sub('""', text)):
        if ch in "[{":
            depth += 1
            if depth > limit:
                raise BadJson(f"JSON nested deeper than {limit} levels")
        else:
            depth -= 1


def _parse_int(s: str) -> int:
    if len(s.lstrip("-")) > MAX_INT_DIGITS:
        raise BadJson(f"integer {s[:24]}… has more than {MAX_INT_DIGITS} digits")
    return int(s)


def _parse_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v) or abs(v) > MAX_ABS_FLOAT:
        raise BadJson(f"number {s[:24]} is out of range (|x| <= {MAX_ABS_FLOAT:g})")
    return v


def _parse_constant(s: str) -> Any:
    raise BadJson(f"{s} is not JSON: send finite numbers or null")


def parse_bounded_json(body: bytes, *, max_depth: int) -> Any:
    """``json.loads`` with bounds; raises :class:`BadJson` with the reason."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadJson(f"not UTF-8: {exc}") from None
    _depth_ok(text, max_depth)
    try:
        return json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except BadJson:
        raise
    except RecursionError:
        raise BadJson(f"JSON nested deeper than {max_depth} levels") from None
    except ValueError as exc:
        raise BadJson(str(exc)) from None


# ----------------------------------------------------------------------------------------------- field checks
def _s(v: Any, limit: int = MAX_STR) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _name(errs: List[str], path: str, v: Any, rx: "re.Pattern[str]" = NAME_RE, what: str = "1-64 letters, digits, "
          "'.', '_' or '-' (first a letter or digit)") -> None:
    if not (isinstance(v, str) and rx.fullmatch(v)):
        errs.append(f"{path} must be {what}, got {_s(v)}")


def _int(errs: List[str], path: str, v: Any) -> None:
    if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_INT):
        errs.append(f"{path} must be an integer in 0..2^53, got {_s(v)}")


def _scalar(errs: List[str], path: str, v: Any) -> None:
    """An extra value: null, a boolean, a bounded number or a short string without control characters."""
    if v is None or isinstance(v, bool):
        return
    if isinstance(v, int):
        if abs(v) > MAX_INT:
            errs.append(f"{path} must be within +-2^53, got {_s(v)}")
    elif isinstance(v, float):
        if not math.isfinite(v) or abs(v) > MAX_ABS_FLOAT:
            errs.append(f"{path} must be a finite number, got {_s(v)}")
    elif isinstance(v, str):
        if len(v) > MAX_STR or any(ord(c) < 32 for c in v):
            errs.append(f"{path} must be a string of at most {MAX_STR} characters without control characters")
    else:
        errs.append(f"{path} must be a number, string, boolean or null (no nested objects or lists), "
                    f"got {type(v).__name__}")


# drift.features.<categorical>: the category shares of the window and of the reference, one level deep
# (edge_runtime/drift/monitor.py writes them; the dashboard charts them)
SHARE_MAPS = ("window_shares", "ref_shares")


def _share_map(errs: List[str], path: str, v: Any) -> None:
    """A category -> share mapping: at most MAX_CLASSES + 1 keys (classes and 'none'), shares in [0, 1]."""
    if v is None:
        return
    if not isinstance(v, dict) or len(v) > MAX_CLASSES + 1:
        errs.append(f"{path} must be an object of at most {MAX_CLASSES + 1} category shares, got {_s(v)}")
        return
    for k, share in v.items():
        _name(errs, f"{path} key {_s(k)}", k, KEY_RE, "a category name of 1-64 characters")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
            errs.append(f"{path}[{_s(k)}] must be a share in [0, 1], got {_s(share)}")


def _extras(errs: List[str], path: str, obj: dict, fixed: Tuple[str, ...]) -> None:
    extra = [k for k in obj if k not in fixed]
    if len(extra) > MAX_EXTRAS:
        errs.append(f"{path} has {len(extra)} extra keys; at most {MAX_EXTRAS}")
        return
    for k in extra:
        _name(errs, f"{path} key {_s(k)}", k, KEY_RE, "1-64 letters, digits, '_', '.', ':' or '-'")
        _scalar(errs, f"{path}.{k}", obj[k])


def report_problems(obj: Any) -> List[str]:
    """The collector's checks on top of ``edge_runtime.wire_report.report_errors`` (run that first)."""
    errs: List[str] = []
    _name(errs, "id", obj.get("id"), ID_RE, "32 lowercase hex characters (uuid4().hex)")
    _name(errs, "device_id", obj.get("device_id"))
    _name(errs, "line", obj.get("line"))
    _name(errs, "bundle_version", obj.get("bundle_version"), VERSION_RE,
          "1-128 letters, digits, '.', '_', '+' or '-'")
    for k in ("window", "counts", "drift", "health"):
        if not isinstance(obj.get(k), dict):
            errs.append(f"{k} must be an object, got {_s(obj.get(k))}")
    if errs:
        return errs
    for k in ("start", "end"):
        v = obj["window"][k]
        if len(v) > 40 or v != v.strip():
            errs.append(f"window.{k} must be an ISO 8601 UTC time of at most 40 characters, got {_s(v)}")
    counts = obj["counts"]
    for k in ("frames", "ok", "ng", "errors"):
        _int(errs, f"counts.{k}", counts[k])
    extra = sorted(set(counts) - {"frames", "ok", "ng", "errors", "per_class"})
    if extra:
        errs.append(f"counts has unknown keys: {', '.join(map(_s, extra[:5]))}")
    pc = counts["per_class"]
    if len(pc) > MAX_CLASSES:
        errs.append(f"counts.per_class has {len(pc)} classes; at most {MAX_CLASSES}")
    else:
        for name, n in pc.items():
            _name(errs, f"counts.per_class key {_s(name)}", name, KEY_RE, "a class name of 1-64 characters")
            _int(errs, f"counts.per_class[{_s(name)}]", n)
    feats = obj["drift"]["features"]
    extra = sorted(set(obj["drift"]) - {"state", "features"})
    if extra:
        errs.append(f"drift has unknown keys: {', '.join(map(_s, extra[:5]))}")
    if len(feats) > MAX_FEATURES:
        errs.append(f"drift.features has {len(feats)} features; at most {MAX_FEATURES}")
    else:
        for name, f in feats.items():
            _name(errs, f"drift.features key {_s(name)}", name, KEY_RE, "a feature name of 1-64 characters")
            _extras(errs, f"drift.features[{_s(name)}]", f, ("state",) + SHARE_MAPS)
            for key in SHARE_MAPS:
                if key in f:
                    _share_map(errs, f"drift.features[{_s(name)}].{key}", f[key])
    _extras(errs, "health", obj["health"], ())
    return errs


def hard_example_problems(meta: Any) -> List[str]:
    """The collector's checks on top of ``edge_runtime.hard_examples.hard_example_errors`` (run that first)."""
    errs: List[str] = []
    _name(errs, "meta.id", meta.get("id"), ID_RE, "32 lowercase hex characters (uuid4().hex)")
    _name(errs, "meta.device_id", meta.get("device_id"))
    _name(errs, "meta.line", meta.get("line"))
    _name(errs, "meta.bundle_version", meta.get("bundle_version"), VERSION_RE,
          "1-128 letters, digits, '.', '_', '+' or '-'")
    if not isinstance(meta.get("detections"), list) or not all(isinstance(d, dict) for d in meta["detections"]):
        return errs + ["meta.detections must be a list of {class, score, box}"]
    t = meta["time"]
    if not isinstance(t, str) or len(t) > 40 or t != t.strip():
        errs.append(f"meta.time must be an ISO 8601 UTC time of at most 40 characters, got {_s(t)}")
    if isinstance(meta["max_score"], bool):
        errs.append("meta.max_score must be a number in [0, 1], got a boolean")
    for k in ("source", "verdict"):
        if k in meta:
            v = meta[k]
            if not isinstance(v, str):
                errs.append(f"meta.{k} must be a string, got {_s(v)}")
            else:
                _scalar(errs, f"meta.{k}", v)
    size = {}
    for k in ("width", "height"):
        if k in meta:
            v = meta[k]
            if not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 20000):
                errs.append(f"meta.{k} must be an integer in 1..20000, got {_s(v)}")
            else:
                size[k] = v
    dets = meta["detections"]
    if len(dets) > MAX_DETECTIONS:
        errs.append(f"meta.detections has {len(dets)} entries; at most {MAX_DETECTIONS}")
        return errs
    for i, d in enumerate(dets):
        p = f"meta.detections[{i}]"
        unknown = sorted(set(d) - {"class", "score", "box"})
        if unknown:
            errs.append(f"{p} has unknown keys: {', '.join(map(_s, unknown[:5]))}")
        _name(errs, f"{p}.class", d["class"], KEY_RE, "a class name of 1-64 characters")
        s = d["score"]
        if isinstance(s, bool) or not (isinstance(s, (int, float)) and 0 <= s <= 1):
            errs.append(f"{p}.score must be a number in [0, 1], got {_s(s)}")
        box = d["box"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
            errs.append(f"{p}.box must be 4 finite numbers [x1, y1, x2, y2], got {_s(box)}")
            continue
        x1, y1, x2, y2 = box
        if not (0 <= x1 <= x2 and 0 <= y1 <= y2):
            errs.append(f"{p}.box must have 0 <= x1 <= x2 and 0 <= y1 <= y2, got {_s(box)}")
        elif size and (x2 > size.get("width", math.inf) + 1 or y2 > size.get("height", math.inf) + 1):
            errs.append(f"{p}.box {_s(box)} lies outside the {size.get('width')}x{size.get('height')} image")
    return errs


# ----------------------------------------------------------------------------------------------- images
MAX_PIXELS = 40_000_000
MAX_SIDE = 20_000


def jpeg_size(data: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) from the first SOF marker of a JPEG, without decoding; None if there is none."""
    if not data.startswith(b"\xff\xd8"):
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        seg = int.from_bytes(data[i + 2:i + 4], "big")
        if seg < 2:
            return None
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            if i + 9 > n:
                return None
            h = int.from_bytes(data[i + 5:i + 7], "big")
            w = int.from_bytes(data[i + 7:i + 9], "big")
            return w, h
        i += 2 + seg
    return None


def jpeg_problem(data: bytes, meta: dict) -> Optional[str]:
    """Why ``data`` is not a JPEG the collector keeps (None = it decodes, within the size cap, as declared)."""
    if not data.startswith(b"\xff\xd8"):
        return "image_b64 does not hold a JPEG (no FF D8 start marker)"
    size = jpeg_size(data)
    if size is None:
        return "image_b64 is not a decodable JPEG (no frame header)"
    w, h = size
    if not (1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE and w * h <= MAX_PIXELS):
        return f"image_b64 is a {w}x{h} JPEG; the collector keeps at most {MAX_SIDE} px a side, {MAX_PIXELS} pixels"
    import cv2
    import numpy as np

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        return "image_b64 is not a decodable JPEG (OpenCV cannot decode it)"
    if (img.shape[1], img.shape[0]) != (w, h):
        return f"image_b64 decodes to {img.shape[1]}x{img.shape[0]}, its header says {w}x{h}"
    for k, v in (("width", w), ("height", h)):
        if k in meta and meta[k] != v:
            return f"meta.{k} is {meta[k]} but the JPEG is {w}x{h}"
    return None
