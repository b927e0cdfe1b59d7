"""The report an edge box sends back: typed inside, a fixed-schema JSON dict on the wire.

Both sides import this module: the edge box builds and spools reports with it, the collector in
``fleet/`` validates what it receives with :func:`report_errors`, so the two cannot drift apart.
The ``id`` (uuid4 hex) is the idempotency key: a report retried after a lost answer is stored once.
"""
from __future__ import annotations

import math
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, List, Mapping, Optional

from .errors import UserInputError

SCHEMA = "defectkit.report/1"
DRIFT_STATES = ("none", "warn", "alarm")
_ID_RE = re.compile(r"^[0-9a-f]{32}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""Device ids and line ids: they become folder names on the collector, so no slashes or spaces."""
_HEALTH_REQUIRED = ("uptime_s", "latency_ms_p50", "latency_ms_p95", "spool_dropped", "spool_pending", "disk_free_mb")
_TOP_KEYS = ("schema", "id", "device_id", "line", "bundle_version", "window", "counts", "drift", "health", "alarm")


class ReportSchemaError(UserInputError):
    """A report that does not follow ``defectkit.report/1``; the message lists every problem."""


def utc_iso(ts: datetime | float | None = None) -> str:
    """ISO 8601 UTC with a trailing Z (``2026-11-22T10:00:00.123Z``); floats are Unix seconds."""
    if ts is None:
        ts = time.time()
    if not isinstance(ts, datetime):
        ts = datetime.fromtimestamp(float(ts), tz=timezone.utc)
    if ts.tzinfo is None:
        raise UserInputError(f"timestamp {ts!r} has no time zone: pass an aware datetime (UTC) or Unix seconds")
    return ts.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_utc(text: str) -> datetime:
    """Inverse of :func:`utc_iso`; accepts ``Z`` or an explicit offset, refuses naive times."""
    value = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    if value.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone (expected UTC, e.g. 2026-11-22T10:00:00Z)")
    return value.astimezone(timezone.utc)


def _plain(value: Any) -> Any:
    """numpy scalars (float32, int64, bool_) -> Python numbers, so the report serialises as JSON."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str, bytes)) and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


@dataclass
class Window:
    start: str
    end: str


@dataclass
class Counts:
    frames: int = 0
    ok: int = 0
    ng: int = 0
    errors: int = 0
    per_class: Dict[str, int] = field(default_factory=dict)


@dataclass
class FeatureDrift:
    """One monitored feature; ``extra`` carries whatever else the drift monitor measured (numbers)."""

    state: str = "none"
    psi: Optional[float] = None
    ks_p: Optional[float] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: Dict[str, Any] = {"state": self.state, "psi": self.psi, "ks_p": self.ks_p}
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out


@dataclass
class Drift:
    state: str = "none"
    features: Dict[str, FeatureDrift] = field(default_factory=dict)

    @classmethod
    def from_features(cls, features: Mapping[str, Mapping[str, Any]]) -> "Drift":
        """Build from the drift monitor's per-feature verdicts; the overall state is the worst one."""
        feats = {}
        for name, raw in features.items():
            raw = {str(k): _plain(v) for k, v in dict(raw).items()}
            feats[str(name)] = FeatureDrift(
                state=str(raw.pop("state", "none")), psi=raw.pop("psi", None), ks_p=raw.pop("ks_p", None), extra=raw
            )
        worst = max((DRIFT_STATES.index(f.state) for f in feats.values() if f.state in DRIFT_STATES), default=0)
        return cls(state=DRIFT_STATES[worst], features=feats)


@dataclass
class Health:
    uptime_s: float = 0.0
    latency_ms_p50: Optional[float] = None
    latency_ms_p95: Optional[float] = None
    spool_dropped: int = 0
    spool_pending: int = 0
    disk_free_mb: Optional[float] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: Dict[str, Any] = dict(
            uptime_s=self.uptime_s, latency_ms_p50=self.latency_ms_p50, latency_ms_p95=self.latency_ms_p95,
            spool_dropped=self.spool_dropped, spool_pending=self.spool_pending, disk_free_mb=self.disk_free_mb,
        )
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out


@dataclass
class Report:
    device_id: str
    line: str
    bundle_version: str
    window: Window
    counts: Counts
    drift: Drift = field(default_factory=Drift)
    health: Health = field(default_factory=Health)
    alarm: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_dict(self) -> dict[str, Any]:
        """The wire form; validated on the way out so a bad report never reaches the spool."""
        out = {
            "schema": SCHEMA,
            "id": self.id,
            "device_id": self.device_id,
            "line": self.line,
            "bundle_version": self.bundle_version,
            "window": {"start": self.window.start, "end": self.window.end},
            "counts": {
                "frames": self.counts.frames, "ok": self.counts.ok, "ng": self.counts.ng,
                "errors": self.counts.errors, "per_class": dict(self.counts.per_class),
            },
            "drift": {"state": self.drift.state, "features": {k: v.to_dict() for k, v in self.drift.features.items()}},
            "health": self.health.to_dict(),
            "alarm": bool(self.alarm),
        }
        return validate_report(out, where=f"report {self.id}")

    @classmethod
    def from_dict(cls, obj: Any, where: str = "report") -> "Report":
        d = validate_report(obj, where=where)
        h = dict(d["health"])
        health = Health(**{k: h.pop(k) for k in _HEALTH_REQUIRED}, extra=h)
        c = d["counts"]
        return cls(
            id=d["id"], device_id=d["device_id"], line=d["line"], bundle_version=d["bundle_version"],
            window=Window(**d["window"]),
            counts=Counts(frames=c["frames"], ok=c["ok"], ng=c["ng"], errors=c["errors"], per_class=dict(c["per_class"])),
            drift=Drift(state=d["drift"]["state"], features=Drift.from_features(d["drift"]["features"]).features),
            health=health, alarm=d["alarm"],
        )


# ----------------------------------------------------------------------------------------------- validation
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _check_count(errs: List[str], path: str, v: Any) -> None:
    if not (_is_int(v) and v >= 0):
        errs.append(f"{path} must be a non-negative integer, got {v!r}")


def _check_opt_num(errs: List[str], path: str, v: Any) -> None:
    if v is not None and not _is_num(v):
        errs.append(f"{path} must be a finite number or null, got {v!r}")


def _check_state(errs: List[str], path: str, v: Any) -> None:
    if v not in DRIFT_STATES:
        errs.append(f"{path} must be one of {'|'.join(DRIFT_STATES)}, got {v!r}")


def report_errors(obj: Any) -> List[str]:
    """Every way ``obj`` breaks ``defectkit.report/1`` (empty list = valid). Used by edge and collector."""
    if not isinstance(obj, dict):
        return [f"a report must be a JSON object, got {type(obj).__name__}"]
    errs: List[str] = []
    missing = [k for k in _TOP_KEYS if k not in obj]
    if missing:
        errs.append(f"missing keys: {', '.join(missing)}")
    unknown = sorted(set(obj) - set(_TOP_KEYS))
    if unknown:
        errs.append(f"unknown keys: {', '.join(unknown)} (schema {SCHEMA} is fixed; put extra numbers in health)")
    if "schema" in obj and obj["schema"] != SCHEMA:
        errs.append(f"schema must be {SCHEMA!r}, got {obj['schema']!r}")
    if "id" in obj and not (isinstance(obj["id"], str) and _ID_RE.fullmatch(obj["id"])):
        errs.append(f"id must be 32 lowercase hex characters (uuid4().hex), got {obj['id']!r}")
    for key in ("device_id", "line"):
        if key in obj and not (isinstance(obj[key], str) and NAME_RE.fullmatch(obj[key])):
            errs.append(f"{key} must be 1-64 characters of letters, digits, '.', '_' or '-', got {obj[key]!r}")
    if "bundle_version" in obj and not (isinstance(obj["bundle_version"], str) and 0 < len(obj["bundle_version"]) <= 128):
        errs.append(f"bundle_version must be a non-empty string, got {obj['bundle_version']!r}")
    _window_errors(errs, obj.get("window"))
    _counts_errors(errs, obj.get("counts"))
    _drift_errors(errs, obj.get("drift"))
    _health_errors(errs, obj.get("health"))
    if "alarm" in obj:
        if not isinstance(obj["alarm"], bool):
            errs.append(f"alarm must be true or false, got {obj['alarm']!r}")
        elif isinstance(obj.get("drift"), dict) and obj["drift"].get("state") == "alarm" and not obj["alarm"]:
            errs.append("alarm must be true when drift.state is 'alarm'")
    return errs


def _window_errors(errs: List[str], w: Any) -> None:
    if w is None:
        return
    if not isinstance(w, dict) or set(w) != {"start", "end"}:
        errs.append(f"window must be an object with exactly start and end, got {w!r}")
        return
    parsed = {}
    for k in ("start", "end"):
        try:
            parsed[k] = parse_utc(w[k])
        except (TypeError, ValueError, AttributeError) as exc:
            errs.append(f"window.{k} must be an ISO 8601 UTC time like 2026-11-22T10:00:00Z ({exc})")
    if len(parsed) == 2 and parsed["end"] < parsed["start"]:
        errs.append(f"window.end {w['end']} is before window.start {w['start']}")


def _counts_errors(errs: List[str], c: Any) -> None:
    if c is None:
        return
    if not isinstance(c, dict):
        errs.append(f"counts must be an object, got {c!r}")
        return
    for k in ("frames", "ok", "ng", "errors"):
        if k not in c:
            errs.append(f"counts.{k} is missing")
        else:
            _check_count(errs, f"counts.{k}", c[k])
    pc = c.get("per_class")
    if not isinstance(pc, dict):
        errs.append(f"counts.per_class must be an object {{class name: count}}, got {pc!r}")
    else:
        for name, n in pc.items():
            _check_count(errs, f"counts.per_class[{name!r}]", n)
    if all(_is_int(c.get(k)) for k in ("frames", "ok", "ng", "errors")) and c["ok"] + c["ng"] + c["errors"] != c["frames"]:
        errs.append(f"counts.ok + counts.ng + counts.errors must equal counts.frames "
                    f"({c['ok']} + {c['ng']} + {c['errors']} != {c['frames']})")


def _drift_errors(errs: List[str], d: Any) -> None:
    if d is None:
        return
    if not isinstance(d, dict) or not isinstance(d.get("features"), dict):
        errs.append(f"drift must be an object with state and features {{name: {{state, psi, ks_p}}}}, got {d!r}")
        return
    _check_state(errs, "drift.state", d.get("state"))
    for name, f in d["features"].items():
        if not isinstance(f, dict):
            errs.append(f"drift.features[{name!r}] must be an object, got {f!r}")
            continue
        _check_state(errs, f"drift.features[{name!r}].state", f.get("state"))
        for k in ("psi", "ks_p"):
            _check_opt_num(errs, f"drift.features[{name!r}].{k}", f.get(k))
        if f.get("state") == "alarm" and d.get("state") != "alarm":
            errs.append(f"drift.state must be 'alarm' when feature {name!r} is in alarm")


def _health_errors(errs: List[str], h: Any) -> None:
    if h is None:
        return
    if not isinstance(h, dict):
        errs.append(f"health must be an object, got {h!r}")
        return
    for k in _HEALTH_REQUIRED:
        if k not in h:
            errs.append(f"health.{k} is missing")
    for k in ("spool_dropped", "spool_pending"):
        if k in h:
            _check_count(errs, f"health.{k}", h[k])
    for k, v in h.items():
        if k not in ("spool_dropped", "spool_pending") and not (v is None or _is_num(v) or isinstance(v, (str, bool))):
            errs.append(f"health.{k} must be a number, string, boolean or null, got {v!r}")


def validate_report(obj: Any, where: str = "report") -> dict:
    """Return ``obj`` if it follows the schema, else raise :class:`ReportSchemaError` listing every problem."""
    errs = report_errors(obj)
    if errs:
        raise ReportSchemaError(f"{where} does not follow {SCHEMA}: " + "; ".join(errs))
    return obj
