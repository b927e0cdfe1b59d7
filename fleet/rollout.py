"""Canary rollout of one version on one line: a canary group first, then promotion or rollback + halt.

:func:`decide` is pure: it reads the canary and stable boxes' reports (``edge_runtime/wire_report.py``) received
since the rollout started and returns a :class:`Decision` with its figures and reason. :func:`evaluate`
applies it to the store (the collector calls it every ``rollout_interval``; ``rollout status`` too) and logs
it in ``rollout_decisions``. Every time is passed in (``now``): nothing here reads the clock by itself.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

from edge_runtime.errors import UserInputError
from edge_runtime.wire_report import parse_utc
from fleet import store
from fleet.db import Conn, Record

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
FAILED_KINDS = ("failed", "refused", "reverted")


def parse_duration(text: str) -> float:
    """``"30m"`` -> 1800.0; ``s``, ``m``, ``h``, ``d``; a bare number is seconds."""
    m = _DURATION.match(str(text))
    if not m:
        raise UserInputError(f"duration {text!r} is not understood: use a number and a unit, e.g. 90s, 30m, 2h, 1d")
    return float(m.group(1)) * _UNIT[m.group(2) or "s"]


@dataclass(frozen=True)
class Policy:
    """What the decision compares; stored with the rollout so a running one keeps its rules."""

    ng_band_abs: float = 0.05  # |ng_canary - ng_stable| <= max(ng_band_abs, ng_band_rel * ng_stable)
    ng_band_rel: float = 2.0
    min_frames: int = 20  # canary frames on the new version before its NG rate is judged
    grace: float = 2.0  # a canary box silent on the new version after grace x window halts the rollout

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Policy":
        return cls(**{k: d[k] for k in ("ng_band_abs", "ng_band_rel", "min_frames", "grace") if k in d})


@dataclass(frozen=True)
class Seen:
    """One report as the decision needs it."""

    device: str
    received_at: float
    version: str
    frames: int
    ng: int
    drift: str
    selftest: Any = None
    update_event: str = ""

    @classmethod
    def of(cls, report: Mapping[str, Any], received_at: float) -> "Seen":
        h = report.get("health", {})
        return cls(device=report["device_id"], received_at=received_at, version=report["bundle_version"],
                   frames=int(report["counts"]["frames"]), ng=int(report["counts"]["ng"]),
                   drift=report["drift"]["state"], selftest=h.get("selftest"),
                   update_event=str(h.get("update_event") or ""))


@dataclass(frozen=True)
class Decision:
    action: str  # wait | promote | rollback
    reason: str
    figures: Dict[str, Any] = field(default_factory=dict)


def _event_failure(ev: str, started_at: float) -> Optional[str]:
    """``"<time> <kind> <version>: <detail>"`` of a failed/refused/reverted update after the start, else None."""
    parts = ev.split(" ", 2)
    if len(parts) < 2 or parts[1] not in FAILED_KINDS:
        return None
    try:
        at = parse_utc(parts[0]).timestamp()
    except (ValueError, TypeError):
        return None
    return ev if at >= math.floor(started_at) else None


def _rate(rows: Sequence[Seen]) -> tuple:
    frames = sum(r.frames for r in rows)
    ng = sum(r.ng for r in rows)
    return frames, ng, (ng / frames if frames else None)


def _alarm_share(rows: Sequence[Seen]) -> Optional[float]:
    return sum(r.drift == "alarm" for r in rows) / len(rows) if rows else None


def decide(*, version: str, canary: Sequence[str], started_at: float, window_s: float, now: float,
           canary_reports: Sequence[Seen], baseline: Sequence[Seen], baseline_source: str = "stable boxes",
           policy: Policy = Policy()) -> Decision:
    """Promote, roll back or wait, from the canary boxes' own reports against the baseline's."""
    mine = sorted((r for r in canary_reports if r.device in canary and r.received_at >= started_at),
                  key=lambda r: r.received_at)
    on_new = [r for r in mine if r.version == version]
    c_frames, c_ng, c_rate = _rate(on_new)
    b_frames, b_ng, b_rate = _rate(baseline)
    band = max(policy.ng_band_abs, policy.ng_band_rel * b_rate) if b_rate is not None else None
    reporting = sorted({r.device for r in on_new})
    figures: Dict[str, Any] = {
        "canary": list(canary), "on_new_version": reporting, "canary_reports": len(on_new),
        "canary_frames": c_frames, "canary_ng": c_ng, "canary_ng_rate": c_rate,
        "baseline": baseline_source, "baseline_frames": b_frames, "baseline_ng_rate": b_rate, "ng_band": band,
        "canary_alarm_share": _alarm_share(on_new), "baseline_alarm_share": _alarm_share(baseline),
        "elapsed_s": round(now - started_at, 3), "window_s": window_s,
    }
    for r in mine:  # a failing canary halts at once
        if r.version == version and r.selftest in ("failed", False):
            return Decision("rollback", f"canary box {r.device}: golden self-test failed on {version}", figures)
        failure = _event_failure(r.update_event, started_at)
        if failure:
            return Decision("rollback", f"canary box {r.device}: update of {version} failed ({failure})", figures)
    for dev in canary:
        seen_new = False
        for r in (x for x in mine if x.device == dev):
            if r.version == version:
                seen_new = True
            elif seen_new:
                return Decision("rollback", f"canary box {dev} ran {version}, then reported {r.version} again "
                                            f"(reverted)", figures)
    judged = c_frames >= policy.min_frames
    if judged and band is not None and abs(c_rate - b_rate) > band:
        return Decision("rollback", f"canary NG rate {c_rate:.3f} is outside the band {b_rate:.3f} ± {band:.3f} "
                                    f"of the {baseline_source}", figures)
    missing = [d for d in canary if d not in reporting]
    if now < started_at + window_s:
        return Decision("wait", f"window runs until +{window_s:g}s; {len(reporting)}/{len(canary)} canary boxes "
                                f"on {version}", figures)
    overdue = now >= started_at + policy.grace * window_s
    if missing or not judged:
        why = (f"canary box(es) {', '.join(missing)} never reported on {version}" if missing else
               f"only {c_frames} canary frames on {version} (need {policy.min_frames})")
        if overdue:
            return Decision("rollback", f"{why} within {policy.grace:g}x the window", figures)
        return Decision("wait", f"{why} yet", figures)
    c_alarm, b_alarm = figures["canary_alarm_share"], figures["baseline_alarm_share"]
    if c_alarm and c_alarm > (b_alarm or 0.0):
        return Decision("rollback", f"drift worse on the canary: {c_alarm:.2f} of its reports in alarm against "
                                    f"{b_alarm or 0.0:.2f} on the {baseline_source}", figures)
    band_note = "NG rate in band" if band is not None else "no baseline reports: NG band not checked"
    return Decision("promote", f"every canary box ran {version} for the window, self-test passed, {band_note}, "
                               f"drift not worse", figures)


# ------------------------------------------------------------------------------------------------ the store side


def _row(r: Record) -> Dict[str, Any]:
    d = dict(r)
    d["canary"] = json.loads(d["canary"])
    d["policy"] = json.loads(d["policy"])
    return d


def running(conn: Conn, *, line: str) -> Optional[Dict[str, Any]]:
    r = conn.execute("SELECT * FROM rollouts WHERE line = ? AND state = 'running' ORDER BY id DESC", (line,)).fetchone()
    return None if r is None else _row(r)


def latest(conn: Conn, *, line: str) -> Optional[Dict[str, Any]]:
    r = conn.execute("SELECT * FROM rollouts WHERE line = ? ORDER BY id DESC", (line,)).fetchone()
    return None if r is None else _row(r)


def decisions(conn: Conn, *, rollout_id: int) -> List[Dict[str, Any]]:
    rows = conn.execute("SELECT * FROM rollout_decisions WHERE rollout_id = ? ORDER BY id", (rollout_id,)).fetchall()
    return [{**dict(r), "figures": json.loads(r["figures"])} for r in rows]


def log_decision(conn: Conn, *, rollout_id: int, action: str, reason: str, figures: Mapping[str, Any],
                 now: float) -> None:
    conn.execute("INSERT INTO rollout_decisions(rollout_id, at, action, reason, figures) VALUES (?,?,?,?,?)",
                 (rollout_id, now, action, reason, json.dumps(figures, sort_keys=True)))


def finish(conn: Conn, *, rollout_id: int, state: str, reason: str, now: float,
           figures: Mapping[str, Any]) -> None:
    """End a rollout (inside the caller's transaction) and log why."""
    conn.execute("UPDATE rollouts SET state = ?, ended_at = ?, reason = ? WHERE id = ?", (state, now, reason, rollout_id))
    log_decision(conn, rollout_id=rollout_id, action=state, reason=reason, figures=figures, now=now)


def choose_canary(devices: Sequence[str], *, percent: Optional[float], explicit: Sequence[str], line: str,
                  version: str) -> List[str]:
    """The canary group: the named devices (each enrolled on the line) or ceil(P% of the line's devices) >= 1,
    spread by a hash of (line, version, device) so the same boxes are not always first."""
    import hashlib

    if explicit:
        unknown = [d for d in explicit if d not in devices]
        if unknown:
            raise UserInputError(f"canary device(s) {', '.join(unknown)} are not enrolled (active) on line '{line}' "
                                 f"(enrolled: {', '.join(devices) or 'none'})")
        return list(dict.fromkeys(explicit))
    if percent is None or not (0 < percent <= 100):
        raise UserInputError(f"--canary {percent}% must be in (0, 100]")
    n = max(1, math.ceil(len(devices) * percent / 100.0))
    ranked = sorted(devices, key=lambda d: hashlib.sha256(f"{line}|{version}|{d}".encode()).hexdigest())
    return sorted(ranked[:n])


def parse_canary(text: str) -> float:
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*%?\s*$", str(text))
    if not m:
        raise UserInputError(f"--canary {text!r} must be a percentage like 10%")
    return float(m.group(1))


def start(conn: Conn, *, line: str, version: str, window_s: float, percent: Optional[float] = None,
          devices: Sequence[str] = (), policy: Policy = Policy(), now: Optional[float] = None) -> Dict[str, Any]:
    from fleet import devices as fleet_devices
    from fleet import registry

    now = time.time() if now is None else now
    v = registry.get_version(conn, line=line, version=version)
    if v["state"] not in ("candidate", "retired"):
        raise UserInputError(f"{line} {version} is {v['state']}: a rollout starts from a candidate (push a new version)")
    if window_s < 0:
        raise UserInputError("--window must not be negative")
    active = registry.active_version(conn, line=line)
    if active is None:
        raise UserInputError(f"line '{line}' has no active version to compare the canary with: make the first one "
                             f"active with 'defectkit registry promote {line} VERSION'")
    other = running(conn, line=line)
    if other is not None:
        raise UserInputError(f"a rollout of {line} {other['version']} is already running: "
                             f"'defectkit rollout stop {line}' first")
    enrolled = fleet_devices.list_enrolled(conn, line=line, active=True)
    if not enrolled:
        raise UserInputError(f"no device is enrolled on line '{line}': defectkit fleet enroll --line {line} --device D")
    canary = choose_canary([d.device_id for d in enrolled], percent=percent, explicit=devices, line=line,
                           version=version)
    lacking = [f"{d.device_id} ({d.hardware_target})" for d in enrolled
               if d.device_id in canary and d.hardware_target not in v["hardware_targets"]]
    if lacking:
        raise UserInputError(f"{line} {version} has no model for canary device(s) {', '.join(lacking)}; "
                             f"it has: {', '.join(v['hardware_targets']) or 'none'}")
    with store.tx(conn):
        cur = conn.execute("INSERT INTO rollouts(line, version, from_version, canary, window_s, policy, started_at, "
                           "state) VALUES (?,?,?,?,?,?,?, 'running') RETURNING id",
                           (line, version, active["version"], json.dumps(canary), float(window_s),
                            json.dumps(policy.__dict__), now))
        registry.set_state(conn, line=line, version=version, state="canary", now=now,
                           note=f"canary on {', '.join(canary)}")
        log_decision(conn, rollout_id=cur.fetchone()[0], action="start", now=now, figures={"canary": canary},
                     reason=f"canary {', '.join(canary)} of {len(enrolled)} device(s); stable on {active['version']}")
    return running(conn, line=line)


def stop(conn: Conn, *, line: str, now: Optional[float] = None) -> Dict[str, Any]:
    from fleet import registry

    now = time.time() if now is None else now
    r = running(conn, line=line)
    if r is None:
        raise UserInputError(f"no rollout is running on line '{line}'")
    with store.tx(conn):
        registry.set_state(conn, line=line, version=r["version"], state="retired", now=now, note="rollout stopped")
        finish(conn, rollout_id=r["id"], state="stopped", reason="stopped by hand", now=now, figures={})
    return latest(conn, line=line)


def _reports_since(conn: Conn, *, line: str, since: float, until: float) -> List[Seen]:
    rows = conn.execute("SELECT body, received_at FROM reports WHERE line = ? AND received_at >= ? AND received_at < ?",
                        (line, since, until)).fetchall()
    return [Seen.of(json.loads(r["body"]), r["received_at"]) for r in rows]


def evaluate(conn: Conn, *, line: str, now: Optional[float] = None) -> Optional[Decision]:
    """Decide the running rollout of ``line`` and apply the decision; None when nothing runs."""
    from fleet import registry

    now = time.time() if now is None else now
    r = running(conn, line=line)
    if r is None:
        return None
    seen = _reports_since(conn, line=line, since=r["started_at"], until=float("inf"))
    canary = set(r["canary"])
    stable = [s for s in seen if s.device not in canary and s.version == r["from_version"]]
    source = "stable boxes"
    if not stable:  # the canary boxes' own reports on the old version, one window before the start
        stable = [s for s in _reports_since(conn, line=line, since=r["started_at"] - max(r["window_s"], 60.0),
                                            until=r["started_at"]) if s.version == r["from_version"]]
        source = "canary boxes before the rollout"
    d = decide(version=r["version"], canary=r["canary"], started_at=r["started_at"], window_s=r["window_s"], now=now,
               canary_reports=[s for s in seen if s.device in canary], baseline=stable, baseline_source=source,
               policy=Policy.from_dict(r["policy"]))
    with store.tx(conn):
        if running(conn, line=line) is None:  # another evaluator finished it meanwhile
            return d
        if d.action == "promote":
            registry.activate(conn, line=line, version=r["version"], now=now, note="canary passed")
            finish(conn, rollout_id=r["id"], state="promoted", reason=d.reason, now=now, figures=d.figures)
        elif d.action == "rollback":
            registry.set_state(conn, line=line, version=r["version"], state="retired", now=now,
                               note=f"rolled back: {d.reason}")
            finish(conn, rollout_id=r["id"], state="rolled_back", reason=d.reason, now=now, figures=d.figures)
        else:
            last = conn.execute("SELECT reason FROM rollout_decisions WHERE rollout_id = ? ORDER BY id DESC LIMIT 1",
                                (r["id"],)).fetchone()
            if last is None or last["reason"] != d.reason:
                log_decision(conn, rollout_id=r["id"], action="wait", reason=d.reason, figures=d.figures, now=now)
    return d


def evaluate_all(conn: Conn, *, now: Optional[float] = None) -> Dict[str, Decision]:
    lines = [r[0] for r in conn.execute("SELECT DISTINCT line FROM rollouts WHERE state = 'running'").fetchall()]
    out = {}
    for line in lines:
        d = evaluate(conn, line=line, now=now)
        if d is not None:
            out[line] = d
    return out


__all__ = ["Policy", "Seen", "Decision", "decide", "parse_duration", "parse_canary", "choose_canary", "start", "stop",
           "evaluate", "evaluate_all", "running", "latest", "decisions", "finish"]
