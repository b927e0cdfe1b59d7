"""What the dashboard shows, read from the store, and the charts drawn as inline SVG (no script, no CDN: factory
networks are offline and a page of plain HTML + SVG renders in any browser on the line).

:func:`overview` gathers per line: the boxes (last seen, bundle version, health from their newest report), NG rate
and drift per feature over time, alarms, hard-example counts and the newest thumbnails, and the rollout state.
:func:`line_chart` turns ``{series name: [(unix time, value), ...]}`` into an ``<svg>`` element.
"""
from __future__ import annotations

import html
import time
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

from fleet import registry, rollout, store
from fleet.db import Conn

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
REPORTS_PER_LINE = 2000
BUCKETS = 24


def _lines(conn: Conn) -> List[str]:
    rows = conn.execute("SELECT DISTINCT line FROM reports UNION SELECT DISTINCT line FROM enrolments "
                        "UNION SELECT DISTINCT line FROM registry_versions").fetchall()
    return sorted(r[0] for r in rows if r[0])


def _edges(times: Sequence[float], n: int) -> Tuple[float, float]:
    """(start, width) of n equal time buckets over ``times``."""
    t0, t1 = min(times), max(times)
    return t0, max((t1 - t0) / n, 1e-9)


def _buckets(points: Sequence[Tuple[float, float, float]], n: int) -> List[Tuple[float, float]]:
    """(time, numerator, denominator) -> n time buckets of sum(num)/sum(den), empty buckets left out."""
    if not points:
        return []
    t0, width = _edges([p[0] for p in points], n)
    num: Dict[int, float] = defaultdict(float)
    den: Dict[int, float] = defaultdict(float)
    for t, a, b in points:
        i = min(int((t - t0) / width), n - 1)
        num[i] += a
        den[i] += b
    return [(t0 + (i + 0.5) * width, num[i] / den[i]) for i in sorted(den) if den[i] > 0]


def _bucket_max(points: Sequence[Tuple[float, float]], n: int, t0: float, width: float) -> List[Tuple[float, float]]:
    """(time, value) -> the largest value per time bucket, empty buckets left out. Drift is drawn this way (the
    worst box per bucket): one point per report would zigzag between the boxes of a line, which report interleaved."""
    top: Dict[int, float] = {}
    for t, v in points:
        i = min(max(int((t - t0) / width), 0), n - 1)
        top[i] = max(v, top.get(i, v))
    return [(t0 + (i + 0.5) * width, top[i]) for i in sorted(top)]


def line_overview(conn: Conn, *, line: str, now: Optional[float] = None) -> Dict[str, Any]:
    now = time.time() if now is None else now
    reports = list(reversed(store.list_reports(conn, line=line, limit=REPORTS_PER_LINE)))  # oldest first
    boxes: Dict[str, Dict[str, Any]] = {}
    ng_points: List[Tuple[float, float, float]] = []
    drift: Dict[str, List[Tuple[float, float]]] = defaultdict(list)
    alarms = []
    for r in reports:
        t = float(r["received_at"])
        h = r["health"]
        boxes[r["device_id"]] = {
            "device_id": r["device_id"], "last_seen": t, "ago": _ago(now - t), "bundle_version": r["bundle_version"],
            "latency_ms_p95": h.get("latency_ms_p95"), "spool_pending": h.get("spool_pending"),
            "disk_free_mb": h.get("disk_free_mb"), "selftest": h.get("selftest", ""),
            "drift": r["drift"]["state"], "health": "alarm" if r["alarm"] else (
                "warn" if r["drift"]["state"] == "warn" or h.get("selftest") in ("failed", False) else "ok")}
        ng_points.append((t, r["counts"]["ng"], r["counts"]["frames"]))
        for name, f in r["drift"]["features"].items():
            if isinstance(f.get("psi"), (int, float)):
                drift[name].append((t, float(f["psi"])))
        if r["alarm"]:
            alarms.append({"when": _when(t), "device_id": r["device_id"], "bundle_version": r["bundle_version"],
                           "features": ", ".join(n for n, f in r["drift"]["features"].items()
                                                 if f.get("state") == "alarm") or r["drift"]["state"]})
    enrolled = conn.execute("SELECT device_id FROM enrolments WHERE line = ? AND revoked_at IS NULL",
                            (line,)).fetchall()
    for (dev,) in enrolled:
        boxes.setdefault(dev, {"device_id": dev, "last_seen": None, "ago": "never", "bundle_version": "",
                               "latency_ms_p95": None, "spool_pending": None, "disk_free_mb": None, "selftest": "",
                               "drift": "", "health": "silent"})
    he_count = conn.execute("SELECT COUNT(*) FROM hard_examples WHERE line = ?", (line,)).fetchone()[0]
    he_by_dev = dict(conn.execute("SELECT device_id, COUNT(*) FROM hard_examples WHERE line = ? GROUP BY device_id",
                                  (line,)).fetchall())
    for b in boxes.values():
        b["hard_examples"] = int(he_by_dev.get(b["device_id"], 0))
    active = registry.active_version(conn, line=line)
    ro = rollout.latest(conn, line=line)
    decisions = rollout.decisions(conn, rollout_id=ro["id"])[-5:] if ro else []
    ng = _buckets(ng_points, BUCKETS)
    if ng_points:
        t0, width = _edges([p[0] for p in ng_points], BUCKETS)
        drift = {name: _bucket_max(pts, BUCKETS, t0, width) for name, pts in drift.items()}
    return {
        "line": line, "boxes": sorted(boxes.values(), key=lambda b: b["device_id"]), "reports": len(reports),
        "frames": sum(p[2] for p in ng_points), "ng": sum(p[1] for p in ng_points),
        "ng_chart": line_chart({"NG rate": ng}, title=f"{line}: NG rate over time", percent=True),
        "drift_chart": line_chart(dict(sorted(drift.items())), title=f"{line}: drift (PSI) per feature, worst box"),
        "drift_features": sorted(drift), "alarms": list(reversed(alarms))[:20],
        "hard_examples": int(he_count),
        "thumbnails": store.list_hard_examples(conn, line=line, limit=12),
        "active_version": active["version"] if active else None,
        "rollout": ro, "decisions": [{**d, "when": _when(d["at"])} for d in decisions],
    }


def overview(conn: Conn, *, now: Optional[float] = None) -> List[Dict[str, Any]]:
    return [line_overview(conn, line=line, now=now) for line in _lines(conn)]


def _when(ts: Optional[float]) -> str:
    return "" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(ts)))


def _ago(s: float) -> str:
    s = max(0.0, s)
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= n:
            return f"{s / n:.0f} {unit} ago"
    return f"{s:.0f} s ago"


def _tick_format(span_s: float) -> str:
    """Time ticks that differ from each other: seconds for a span under 2 h, the date only past 2 days (UTC)."""
    if span_s < 7200:
        return "%H:%M:%S"
    return "%H:%M" if span_s < 2 * 86400 else "%m-%d %H:%M"


def line_chart(series: Dict[str, List[Tuple[float, float]]], *, title: str, percent: bool = False,
               width: int = 560, height: int = 220) -> str:
    """An ``<svg>`` line chart with axes, ticks and a legend; one ``<polyline class="series">`` per series."""
    pad_l, pad_r, pad_t, pad_b = 52, 12, 26, 40
    pts = [p for s in series.values() for p in s]
    esc = html.escape
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" aria-label="{esc(title)}"><title>{esc(title)}</title>'
            f'<text x="{pad_l}" y="16" class="chart-title">{esc(title)}</text>')
    if not pts:
        return head + f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="empty">no data yet</text></svg>'
    t0, t1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y1 = max(max(p[1] for p in pts), 1e-9) * 1.1
    if t1 == t0:
        t0, t1 = t0 - 1, t1 + 1
    pw, ph = width - pad_l - pad_r, height - pad_t - pad_b

    def x(t: float) -> float:
        return pad_l + (t - t0) / (t1 - t0) * pw

    def y(v: float) -> float:
        return pad_t + ph - v / y1 * ph

    out = [head, f'<rect x="{pad_l}" y="{pad_t}" width="{pw}" height="{ph}" class="plot"/>']
    for i in range(5):
        v = y1 * i / 4
        label = f"{v * 100:.1f}%" if percent else f"{v:.3g}"
        out.append(f'<line x1="{pad_l}" x2="{pad_l + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="grid"/>'
                   f'<text x="{pad_l - 4}" y="{y(v) + 4:.1f}" text-anchor="end" class="tick">{label}</text>')
    fmt = _tick_format(t1 - t0)
    for i, anchor in enumerate(("start", "middle", "end")):  # the end labels stay inside the chart
        t = t0 + (t1 - t0) * i / 2
        out.append(f'<text x="{x(t):.1f}" y="{pad_t + ph + 14}" text-anchor="{anchor}" class="tick">'
                   f'{time.strftime(fmt, time.gmtime(t))}{" UTC" if i == 2 else ""}</text>')
    for k, (name, s) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        coords = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in sorted(s))
        out.append(f'<polyline class="series" data-series="{esc(name)}" data-points="{len(s)}" points="{coords}" '
                   f'fill="none" stroke="{colour}" stroke-width="2"/>')
        for t, v in sorted(s)[-1:]:
            out.append(f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}"/>')
        lx = pad_l + (k % 4) * 130
        ly = height - 8 - 12 * (k // 4)
        out.append(f'<rect x="{lx}" y="{ly - 8}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{lx + 14}" y="{ly + 1}" class="legend">{esc(name)}</text>')
    out.append("</svg>")
    return "".join(out)
