"""Load on a real collector: N simulated edge boxes on loopback posting reports (and hard examples) for a fixed time.

    python bench/collector_load.py --db sqlite --processes 1 --boxes 500 --interval 5 --duration 120
    python bench/collector_load.py --db postgresql --processes 2 --boxes 500 --interval 1 --duration 120 \
        [--baseline-src /tmp/baseline]      # a worktree of an older commit: both collectors side by side, one run

Each box holds one keep-alive HTTP connection (asyncio, one client process) and posts a new report every
``--interval`` seconds (random phase), a hard example (a real JPEG) every ``--hard-example-every`` reports, and,
like a real box, posts an unacknowledged item again until it gets a 2xx. The collector runs as
``--processes`` separate ``python -m fleet.collector serve`` processes on one store (SQLite file, or a PostgreSQL
server started here with Debian's binaries: tests/pgserver.py); boxes are spread over them round-robin.

Figures: reports/s acknowledged, latency p50/p99 of report posts, collector CPU seconds per 1000 reports
(utime+stime of the collector processes from /proc), the same for the load generator (this process: it shares
the cores) and for the PostgreSQL server, the 1-minute load average before and after, and the count check: every acknowledged report id is in the
store exactly once and the store holds nothing else. Results: ``bench/results/collector_load_<db>_<n>p.json``.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pg_cpu_seconds(data_dir: Path) -> float:
    """CPU of the PostgreSQL server: the postmaster (with its reaped children) and its live backends."""
    root = int((data_dir / "postmaster.pid").read_text().split()[0])
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a backend that just exited: its time is in the postmaster's cutime/cstime
        pid, ppid = int(stat.parent.name), int(fields[1])
        if pid == root:
            total += sum(int(x) for x in fields[11:15])
        elif ppid == root:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def self_cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def start_collectors(db: str, n: int, work: Path, tokens: Path, src: Path = ROOT, stack: str = "auto"):
    """Start ``n`` collector processes from ``src``; their URLs and the event loop + HTTP parser they announced."""
    procs, urls, stacks = [], [], []
    extra = [] if stack == "auto" else ["--server-stack", stack]  # an older --baseline-src has no such flag
    for i in range(n):
        p = subprocess.Popen([sys.executable, "-m", "fleet.collector", "serve", "--db", db, "--port", "0",
                              "--tokens", str(tokens), "--data-dir", str(work / "images"),
                              "--registry-dir", str(work / "registry"), *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(src),
                             env={**os.environ, "PYTHONPATH": str(src)})
        for line in p.stdout:
            m = re.search(r"collector listening on (http://\S+)", line)
            if m:
                log = open(work / f"collector-{i}.log", "w")
                threading.Thread(target=lambda p=p, log=log: [log.write(x) or log.flush() for x in p.stdout],
                                 daemon=True).start()
                urls.append(m.group(1))
                s = re.search(r"; (\w+ \+ \w+)\)\s*$", line)
                stacks.append(s.group(1) if s else "not announced (older collector)")
                break
        else:
            raise SystemExit(f"collector {i} exited with {p.wait()} before listening")
        procs.append(p)
    return procs, urls, sorted(set(stacks))


def report_body(device: str, rng: random.Random) -> tuple:
    from edge_runtime.report_builder import ReportBuilder

    b = ReportBuilder(device_id=device, line="line-a", bundle_version="1.0.0")
    ng = rng.randrange(0, 5)
    for i in range(50):
        b.record_frame(ng=i < ng, classes=["scratch"] if i < ng else [], latency_ms=10.0 + rng.random())
    r = b.build(drift={"brightness": {"state": "none", "psi": rng.random() * 0.1, "ks_p": 0.5}}).to_dict()
    return r["id"], json.dumps(r).encode()


def hard_example_body(device: str, jpeg: bytes) -> bytes:
    meta = {"schema": "defectkit.hard_example/1", "id": uuid.uuid4().hex, "device_id": device, "line": "line-a",
            "bundle_version": "1.0.0", "time": "2026-11-22T10:00:00.000Z", "max_score": 0.5,
            "detections": [{"class": "scratch", "score": 0.5, "box": [1.0, 1.0, 8.0, 8.0]}]}
    return json.dumps({"meta": meta, "image_b64": base64.b64encode(jpeg).decode()}).encode()


async def post(reader, writer, host: str, path: str, token: str, body: bytes) -> int:
    writer.write((f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    m = re.search(rb"(?i)content-length:\s*(\d+)", head)
    if m:
        await reader.readexactly(int(m.group(1)))
    return status


async def box(i: int, url: str, token: str, args, stats: dict, stop_at: float, jpeg: bytes) -> None:
    rng = random.Random(i)
    device = f"box-{i:04d}"
    host, port = url.split("//")[1].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    await asyncio.sleep(rng.random() * args.interval)
    # what a collector that answered instantly would have received from this box: one report per interval from
    # its first slot until stop_at (the random start offset and the last interval are not load a collector refused)
    stats["scheduled"] += max(0, math.ceil((stop_at - time.monotonic()) / args.interval))
    n = 0
    try:
        while time.monotonic() < stop_at:
            due = time.monotonic() + args.interval
            rid, body = report_body(device, rng)
            while True:  # a box keeps an item until the collector acknowledges it
                t0 = time.perf_counter()
                try:
                    st = await post(reader, writer, host, "/api/v1/reports", token, body)
                except (ConnectionError, asyncio.IncompleteReadError):
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, int(port))
                    stats["reconnects"] += 1
                    continue
                stats["latency"].append(time.perf_counter() - t0)
                second = int(time.monotonic() - stats["t0"])  # when the slow answers come: at start, steadily, in bursts
                stats["slowest_by_second"][second] = max(stats["slowest_by_second"].get(second, 0.0),
                                                         time.perf_counter() - t0)
                if st in (200, 201):
                    stats["acked"].append(rid)
                    break
                stats["errors"][st] = stats["errors"].get(st, 0) + 1
                await asyncio.sleep(0.5)
            n += 1
            # every K-th report of a box, at a phase of its own: the boxes start within one interval of each other,
            # so "n % K == 0" made all 500 post their hard examples in the same second, every K intervals (a burst of
            # 500 JPEGs every 10 s that real boxes, driven by their parts, do not make; p99 0.56-0.72 s came from it)
            if args.hard_example_every and (n + i) % args.hard_example_every == 0:
                st = await post(reader, writer, host, "/api/v1/hard-examples", token, hard_example_body(device, jpeg))
                stats["hard_examples"][st] = stats["hard_examples"].get(st, 0) + 1
            await asyncio.sleep(max(0.0, due - time.monotonic()))
    finally:
        writer.close()


async def drive(urls, tokens, args, jpeg):
    t0 = time.monotonic()
    stats = {"latency": [], "acked": [], "errors": {}, "hard_examples": {}, "reconnects": 0, "scheduled": 0, "t0": t0,
             "slowest_by_second": {}}
    stop_at = t0 + args.duration
    await asyncio.gather(*(box(i, urls[i % len(urls)], tokens[f"box-{i:04d}"], args, stats, stop_at, jpeg)
                           for i in range(args.boxes)))
    return stats, time.monotonic() - t0


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    ap.add_argument("--processes", type=int, default=1, help="collector processes on the one store")
    ap.add_argument("--boxes", type=int, default=500)
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between a box's reports")
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    ap.add_argument("--hard-example-every", type=int, default=10, help="a hard example every K reports (0 = none)")
    ap.add_argument("--out", type=Path, help="result JSON (default bench/results/collector_load_<db>_<n>p.json)")
    ap.add_argument("--stacks", default="auto",
                    help="comma-separated collector --server-stack values to run one after the other on the current "
                         "source, e.g. 'asyncio,auto' (asyncio + h11 vs uvloop + httptools) in one run")
    ap.add_argument("--baseline-src", type=Path,
                    help="also run the same load, first, against the collector of this source tree (e.g. a git "
                         "worktree of an older commit): both rows in one run, one result file")
    args = ap.parse_args()

    runs = [("baseline", args.baseline_src.resolve(), "auto")] if args.baseline_src else []
    runs += [("current", ROOT, stack) for stack in args.stacks.split(",")]
    results = []
    for label, src, stack in runs:
        res = run_once(args, src, stack)
        res["collector_src"] = label if src == ROOT else f"{label}: {src}"
        results.append(res)
        print(json.dumps(res), flush=True)
    out = args.out or ROOT / "bench" / "results" / f"collector_load_{args.db}_{args.processes}p.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results[0] if len(results) == 1 else results, indent=2) + "\n")
    return 0 if all(r["lost"] == 0 and r["duplicated"] == 0 and r["stored_not_acked"] == 0 for r in results) else 1


def run_once(args, src: Path, stack: str = "auto") -> dict:
    """One load run against collector processes started from ``src``; the figures as a dict."""
    import cv2
    import numpy as np

    from fleet import db, store

    jpeg = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8))[1].tobytes()
    work = Path(tempfile.mkdtemp(prefix="collector-load-"))
    tokens = {f"box-{i:04d}": f"token-{i:04d}-{uuid.uuid4().hex}" for i in range(args.boxes)}
    (work / "tokens.json").write_text(json.dumps({"admin": "admin-" + uuid.uuid4().hex, "devices": tokens}))
    pg = None
    if args.db == "postgresql":
        from tests.pgserver import PgServer

        pg = PgServer().start()
        location = pg.create_db("load")
    else:
        location = str(work / "collector.db")
    procs = []
    try:
        db.migrate(location)
        procs, urls, served_by = start_collectors(location, args.processes, work, work / "tokens.json", src, stack)
        load0 = os.getloadavg()
        cpu0 = sum(cpu_seconds(p.pid) for p in procs)
        client0 = self_cpu_seconds()
        pg0 = pg_cpu_seconds(pg.data) if pg else 0.0
        stats, elapsed = asyncio.run(drive(urls, tokens, args, jpeg))
        cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu0
        client = self_cpu_seconds() - client0
        pg_cpu = (pg_cpu_seconds(pg.data) - pg0) if pg else None
        load1 = os.getloadavg()
        with store.session(path=location) as conn:
            stored = store.report_ids(conn)
        acked = stats["acked"]
        lost = len(set(acked) - set(stored))
        extra = len(set(stored) - set(acked))
        dup_rows = len(stored) - len(set(stored))
        lat = stats["latency"]
        per_k = 1000 / max(1, len(acked))
        return {
            "db": args.db, "server_stack": served_by, "processes": args.processes, "boxes": args.boxes, "interval_s": args.interval,
            "duration_s": round(elapsed, 1), "reports_acked": len(acked), "reports_per_s": round(len(acked) / elapsed, 1),
            "offered_per_s": round(args.boxes / args.interval, 1),
            # acknowledged / what the boxes' schedule held: 1.0 = the collector kept up with every box
            "scheduled_reports": stats["scheduled"],
            "seconds_with_an_answer_over_200ms": {s: round(v * 1000) for s, v in sorted(stats["slowest_by_second"].items())
                                                  if v > 0.2}, "acked_of_scheduled": round(len(acked) / max(1, stats["scheduled"]), 4),
            "latency_ms_p50": round(percentile(lat, 0.50) * 1000, 1),
            "latency_ms_p99": round(percentile(lat, 0.99) * 1000, 1),
            "cpu_s_per_1000_reports": round(cpu * per_k, 2),  # the collector processes (hard examples included)
            "client_cpu_s_per_1000_reports": round(client * per_k, 2),  # the 500 simulated boxes (this process)
            "postgres_cpu_s_per_1000_reports": None if pg_cpu is None else round(pg_cpu * per_k, 2),
            "cpu_s_total": {"collectors": round(cpu, 1), "client": round(client, 1),
                            "postgres": None if pg_cpu is None else round(pg_cpu, 1),
                            "available": round(elapsed * (os.cpu_count() or 1), 1)},
            "stored": len(stored), "lost": lost, "duplicated": dup_rows, "stored_not_acked": extra,
            "non_2xx_answers": stats["errors"], "hard_examples": stats["hard_examples"],
            "reconnects": stats["reconnects"], "cpu_count": os.cpu_count(), "cpu_model": cpu_model(),
            "loadavg_1m_before_after": [round(load0[0], 2), round(load1[0], 2)],
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - elapsed)),
        }
    finally:
        for i, p in enumerate(procs):
            if p.poll() is not None:
                print(f"collector {i} exited with {p.returncode} during the run; its log: {work}/collector-{i}.log",
                      file=sys.stderr)
            p.terminate()
            p.wait(timeout=30)
        db.dispose_all()
        if pg is not None:
            pg.cleanup()


if __name__ == "__main__":
    sys.exit(main())
