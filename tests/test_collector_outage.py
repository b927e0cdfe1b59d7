"""THE BAR: the collector is down for the middle third of a run; every report still arrives exactly once.

A producer spools a report every 0.2 s for 9 s while an UplinkThread flushes. The collector runs as a
separate process (``python -m fleet.collector serve``), is terminated at 3 s and restarted at 6 s on the
same port and database. At the end the collector holds each produced id once and the spool is empty.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from edge_runtime.report_builder import ReportBuilder
from edge_runtime.spool import Spool
from edge_runtime.uplink import Uplink, UplinkThread
from fleet import store

ROOT = Path(__file__).resolve().parents[1]
ADMIN, TOKEN = "admin-token-0123456789", "press01-token-abcdefgh"


def start_collector(db: Path, tokens: Path, port: int) -> tuple:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "fleet.collector", "serve", "--db", str(db), "--port", str(port),
                             "--tokens", str(tokens)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(ROOT), env=env)
    first = []
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(20)
    line = first[0] if first else ""
    assert line.startswith("collector listening on http://127.0.0.1:"), (line, proc.poll())
    return proc, line.split()[3]


def stop_collector(proc: subprocess.Popen) -> int:
    proc.terminate()
    try:
        rc = proc.wait(10)
    finally:
        proc.stdout.close()
        proc.stderr.close()
    return rc


def get_json(url: str) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {ADMIN}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def test_collector_down_for_the_middle_third(tmp_path):
    db, tokens = tmp_path / "collector.db", tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"admin": ADMIN, "devices": {"press-01": TOKEN}}))
    proc, url = start_collector(db, tokens, 0)
    port = int(url.rsplit(":", 1)[1])
    assert get_json(url + "/healthz")["status"] == "ok"

    spool = Spool(tmp_path / "spool.db", max_bytes=50 * 2**20)
    uplink = Uplink(url, "press-01", TOKEN, spool, read_timeout=2.0, backoff_base=0.1, backoff_cap=0.5)
    thread = UplinkThread(uplink, interval_s=0.2).start()
    builder = ReportBuilder(device_id="press-01", line="line-a", bundle_version="1.0.0", spool_dir=tmp_path)
    produced, put_times, max_pending, restarted = [], [], 0, []
    restarter = None
    n_reports, period = 45, 0.2  # 9 s; the collector is down for reports 15..29 (3 s to 6 s)
    t0 = time.monotonic()
    try:
        for i in range(n_reports):
            time.sleep(max(0.0, t0 + i * period - time.monotonic()))  # a fixed schedule, as a real line
            if i == n_reports // 3:
                assert stop_collector(proc) == 0  # SIGTERM: uvicorn finishes in-flight requests, exits 0
            elif i == 2 * n_reports // 3:
                # restart beside the producer: starting a process must not pause the production of reports
                restarter = threading.Thread(target=lambda: restarted.append(start_collector(db, tokens, port)))
                restarter.start()
            builder.record_frame(ng=i % 5 == 0, classes=["scratch"], latency_ms=12.0)
            report = builder.build(spool=spool)
            a = time.perf_counter()
            spool.put("report", report.to_dict(), alarm=report.alarm)
            put_times.append(time.perf_counter() - a)
            produced.append(report.id)
            max_pending = max(max_pending, spool.stats().pending)
        restarter.join(20)
        proc, url2 = restarted[0]
        assert url2 == url
        deadline = time.monotonic() + 15
        while spool.stats().pending and time.monotonic() < deadline:
            thread.wake()
            time.sleep(0.05)
        drained_after = time.monotonic() - t0
    finally:
        thread_stopped = thread.stop()
        final = get_json(url + "/api/v1/reports?limit=1000") if restarted else None
        if proc.poll() is None:
            assert stop_collector(proc) == 0

    assert thread_stopped and len(set(produced)) == len(produced) == n_reports
    assert spool.stats().pending == 0 and spool.stats().dead_letter == 0
    # the outage was real: deliveries failed and reports piled up in the spool meanwhile
    assert any("cannot reach the collector" in err for _, err in uplink.state.history)
    assert max_pending >= 10
    # every report reached the collector exactly once
    assert final["count"] == len(produced)
    assert sorted(r["id"] for r in final["reports"]) == sorted(produced)
    with store.session(path=db) as conn:
        ids = store.report_ids(conn)
    assert len(ids) == len(set(ids)) == len(produced) and set(ids) == set(produced)
    assert uplink.state.sent_total + uplink.state.duplicates_total == len(produced)
    # that a put never waits on the network is shown with a held request in test_spool_uplink
    # (test_put_never_blocked_by_a_hanging_collector); put latency is the disk's, measured in bench/, not limited here
    print(f"\noutage bar: {len(produced)} reports, max pending {max_pending}, sent {uplink.state.sent_total}, "
          f"duplicates {uplink.state.duplicates_total}, slowest put {max(put_times) * 1000:.1f} ms, "
          f"spool empty {drained_after:.1f} s after start")
