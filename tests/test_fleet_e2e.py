"""Issue 10 item 6, end to end with real processes on loopback: the collector (``python -m fleet.collector serve``,
SQLite store, registry, targets key, rollout evaluator) and four edge boxes (``python -m edge_runtime run``, ONNX
Runtime, watched folders fed with synthetic board frames) enrolled on one line with ``defectkit fleet enroll``.

All four run v1; v2 is pushed and canaried on one box, which installs it and reports; the collector's evaluator
promotes it and all four run v2. v3, whose shipped golden expectations do not match its model, is canaried on
another box: the box's self-test refuses it, its report says so, the rollout rolls back and halts, and the other
three never get v3 (the target documents they were served, their update events, their installed bundles). Then a
replayed v1 target document and a target for another line's bundle are refused by running boxes, another line's
archive dropped into an inbox is refused, and the collector refuses another line's archive to a device.

The boxes reach the collector through a relay in this process that forwards every request unchanged and records
the target documents it passes (what each box was offered); for the replay and other-line cases it answers the
target route itself, as a frozen or compromised server would. Waits are on conditions (the boxes' /healthz and
state files, the store's rollout state); the timeline (seconds from each push) is printed, not asserted.
"""
from __future__ import annotations

import http.client
import json
import math
import re
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from compress.keys import load_private_key
from edge_runtime.drift.synthetic import BoardStream
from edge_runtime.targets import TargetMetadata, sign_target, utc_text
from fleet import registry, rollout, store
from tests.fleetboxes import (BoxProc, Feeder, archive, cli, enroll, png_frames, start_collector, variant, wait_for,
                              wrong_golden)
from tests.runkit import make_bundle, make_keys, red_image

pytestmark = pytest.mark.timeout(900)

LINE, OTHER = "press-line", "paint-line"
BOXES = ("box-1", "box-2", "box-3", "box-4")
ADMIN = "admin-token-e2e-0123456789"
WINDOW = "6s"
BOUND = 180.0  # generous bound on any one condition: it only turns a hang into a failure


class Relay(BaseHTTPRequestHandler):
    """Forwards every request to the collector unchanged and records each target document it passes; for a device in
    ``serve`` it answers the target route with the given document instead (a replaying or compromised server)."""

    protocol_version = "HTTP/1.1"
    upstream = ""
    offered: dict = {}  # device -> [version of every target document passed to it]
    serve: dict = {}  # device -> document bytes to answer instead
    lock = threading.Lock()

    def _device(self):
        m = re.fullmatch(r"/api/v1/devices/([^/]+)/target", self.path)
        return m and m.group(1)

    def _answer(self, status, headers, data):
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in ("content-length", "connection", "transfer-encoding", "date", "server"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _forward(self, method):
        dev = self._device()
        if method == "GET" and dev and dev in self.serve:
            return self._answer(200, [("Content-Type", "application/json")], self.serve[dev])
        u = urlsplit(self.upstream)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else None
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        try:
            conn.request(method, self.path, body=body, headers={k: v for k, v in self.headers.items()
                                                                 if k.lower() not in ("host", "connection")})
            r = conn.getresponse()
            data = r.read()
        finally:
            conn.close()
        if dev and r.status == 200:
            with self.lock:
                self.offered.setdefault(dev, []).append(json.loads(data)["signed"]["version"])
        self._answer(r.status, r.getheaders(), data)

    def do_GET(self):  # noqa: N802
        self._forward("GET")

    def do_POST(self):  # noqa: N802
        self._forward("POST")

    def log_message(self, *args):
        pass


def _get(url, path, token):
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _reports(db, device):
    with store.session(path=db) as conn:
        return store.list_reports(conn, device=device, limit=1000)


def _rollout(db):
    with store.session(path=db) as conn:
        r = rollout.latest(conn, line=LINE)
        return r, (rollout.decisions(conn, rollout_id=r["id"]) if r else [])


def _iso(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_four_boxes_canary_promote_then_a_failing_version_rolls_back(tmp_path):
    # ---- bundles: v1, v2 and another line's v1 verify and self-test; v3's golden expectations do not match its model
    keys = make_keys(tmp_path)
    seed = make_bundle(tmp_path / "seed", keys, "1.0.0")  # real ONNX detector, golden set from its paddle twin
    lines = tmp_path / "bundles"
    v1 = variant(seed, lines, LINE, "1.0.0", keys.private)
    v2 = variant(seed, lines, LINE, "2.0.0", keys.private, parent="1.0.0")
    v3 = variant(seed, lines, LINE, "3.0.0", keys.private, parent="2.0.0", edit=wrong_golden)
    other = variant(seed, lines, OTHER, "1.0.0", keys.private)

    # ---- the fleet, through the CLI: targets key, registry, enrolment
    db, tokens = tmp_path / "fleet.db", tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"admin": ADMIN, "devices": {}}))
    cli("keys", "init", "--dir", tmp_path / "targets")
    tkey, tpub = tmp_path / "targets" / "bundle_signing_key.pem", tmp_path / "targets" / "bundle_signing_key.pub.pem"
    cli("registry", "push", archive(v1), "--db", db, "--public-key", keys.public)
    cli("registry", "push", archive(other), "--db", db)
    cli("registry", "promote", LINE, "1.0.0", "--db", db)
    token_files = {b: enroll(db, LINE, b, tmp_path / "tokens") for b in BOXES}
    collector, url = start_collector(["--db", db, "--tokens", tokens, "--targets-key", tkey, "--target-expiry", "1h",
                                      "--rollout-interval", "0.5s"], tmp_path / "collector")
    relay = ThreadingHTTPServer(("127.0.0.1", 0), type("R", (Relay,), {"upstream": url, "offered": {}, "serve": {}}))
    threading.Thread(target=relay.serve_forever, daemon=True).start()
    via = f"http://127.0.0.1:{relay.server_port}"
    offered = relay.RequestHandlerClass.offered

    # in-distribution boards (OK) and one part in eight with the red defect the test detector flags (NG)
    stream = BoardStream(seed=5, size=160)
    frames = png_frames(red_image(250, 900 + i, (160, 160)) if i % 8 == 7 else stream.next().image for i in range(96))
    boxes = {b: BoxProc(tmp_path / "boxes", b, archive(v1), keys.public, collector=via, token_file=token_files[b],
                        targets_key=tpub) for b in BOXES}
    feeder = None
    timeline: dict = {}
    try:
        for b, box in boxes.items():
            wait_for(lambda: box.running() == "1.0.0", f"{b} inspecting with 1.0.0", BOUND)
        feeder = Feeder([box.source for box in boxes.values()], frames, per_second=8.0).start()
        for b in BOXES:
            wait_for(lambda: [r for r in _reports(db, b) if r["counts"]["frames"] > 0], f"a report of {b}", BOUND)
        v1_docs = {b: offered.get(b, [])[:1] for b in BOXES}
        assert all(v == ["1.0.0"] for v in v1_docs.values()), offered
        replay_v1 = None  # box-4's genuine, signed, unexpired v1 document, replayed later
        st, body = _get(url, "/api/v1/devices/box-4/target", token_files["box-4"].read_text().strip())
        assert st == 200 and json.loads(body)["signed"]["version"] == "1.0.0"
        replay_v1 = body

        # ---- v2: push, canary on box-1, promotion, all four on v2
        t0 = time.time()
        cli("registry", "push", archive(v2), "--db", db)
        cli("rollout", "start", LINE, "2.0.0", "--devices", "box-1", "--window", WINDOW, "--min-frames", "20",
            "--db", db)
        wait_for(lambda: boxes["box-1"].running() == "2.0.0", "the canary box-1 on 2.0.0", BOUND)
        timeline["v2_push_to_canary_running_s"] = time.time() - t0
        assert all(boxes[b].running() == "1.0.0" for b in ("box-2", "box-3", "box-4"))
        r, ds = wait_for(lambda: (lambda r: r[0]["state"] != "running" and r)(_rollout(db)), "the v2 decision", BOUND)
        assert r["state"] == "promoted", (r, ds)
        promoted_at = ds[-1]["at"]
        timeline["v2_push_to_promotion_s"] = promoted_at - t0
        f = ds[-1]["figures"]
        assert f["on_new_version"] == ["box-1"] and f["canary_frames"] >= 20 and f["baseline"] == "stable boxes"
        assert f["baseline_frames"] > 0 and f["elapsed_s"] >= 6.0
        timeline["v2_decision"] = {k: f[k] for k in ("canary_frames", "canary_ng_rate", "baseline_frames",
                                                      "baseline_ng_rate", "ng_band", "elapsed_s")}
        for b in BOXES:
            wait_for(lambda: boxes[b].running() == "2.0.0", f"{b} on 2.0.0", BOUND)
        timeline["v2_push_to_all_four_running_s"] = time.time() - t0
        for b in ("box-2", "box-3", "box-4"):  # the stable boxes took 2.0.0 only after the promotion
            (sw,) = wait_for(lambda: [e for e in boxes[b].events("swapped") if e["version"] == "2.0.0"],
                             f"{b}'s swap event", BOUND)  # written just after the swap /healthz shows
            assert _iso(sw["time"]) >= math.floor(promoted_at), (b, sw, promoted_at)  # event times: whole seconds
            assert "2.0.0" not in offered[b][:offered[b].index("2.0.0")]

        # ---- v3: golden self-test fails on the canary box-2: rollback and halt; the others never see it
        seen_before = {b: len(offered[b]) for b in BOXES}
        t1 = time.time()
        cli("registry", "push", archive(v3), "--db", db)
        cli("rollout", "start", LINE, "3.0.0", "--devices", "box-2", "--window", WINDOW, "--min-frames", "20",
            "--db", db)
        refused = wait_for(lambda: [e for e in boxes["box-2"].events("refused") if e["version"] == "3.0.0"],
                           "box-2 refusing 3.0.0", BOUND)
        timeline["v3_push_to_canary_refusal_s"] = time.time() - t1  # seen in its state file
        assert "self-test" in refused[0]["detail"], refused
        r, ds = wait_for(lambda: (lambda r: r[0]["version"] == "3.0.0" and r[0]["state"] != "running" and r)(
            _rollout(db)), "the v3 decision", BOUND)
        assert r["state"] == "rolled_back", (r, ds)
        timeline["v3_push_to_rollback_s"] = ds[-1]["at"] - t1
        assert "canary box box-2: update of 3.0.0 failed" in r["reason"] and "self-test" in r["reason"], r["reason"]
        timeline["v3_decision"] = r["reason"][:200]
        with store.session(path=db) as conn:
            assert registry.get_version(conn, line=LINE, version="3.0.0")["state"] == "retired"
            assert registry.active_version(conn, line=LINE)["version"] == "2.0.0"
        # the rollout halted: 3.0.0 is served to nobody, box-2 is told 2.0.0 (a signed rollback) and stays on it
        n = len(offered["box-2"])
        wait_for(lambda: len(offered["box-2"]) >= n + 3, "three more polls of box-2", BOUND)
        assert offered["box-2"][-1] == "2.0.0" and "3.0.0" in offered["box-2"][seen_before["box-2"]:]
        assert boxes["box-2"].running() == "2.0.0" and boxes["box-2"].state()["current"] == "2.0.0"
        assert not (boxes["box-2"].state_dir / "bundles" / "3.0.0").exists()
        for b in ("box-1", "box-3", "box-4"):
            k = len(_reports(db, b))
            wait_for(lambda: len(_reports(db, b)) >= k + 2, f"two more reports of {b}", BOUND)
            assert "3.0.0" not in offered[b], (b, offered[b])  # never offered
            assert not [e for e in boxes[b].events() if e.get("version") == "3.0.0" or "3.0.0" in e["detail"]]
            assert boxes[b].running() == "2.0.0" and sorted(p.name for p in (boxes[b].state_dir / "bundles").iterdir()
                                                            if not p.name.startswith(".")) == ["1.0.0", "2.0.0"]
            assert all(rep["bundle_version"] == "2.0.0" for rep in _reports(db, b)[:2])
        out = cli("rollout", "status", LINE, "--db", db).stdout
        assert "3.0.0 (from 2.0.0): rolled_back" in out and "canary box box-2: update of 3.0.0 failed" in out

        # ---- a replayed v1 document (genuine, signed, unexpired) is refused by a box on v2
        relay.RequestHandlerClass.serve["box-4"] = replay_v1
        ev = wait_for(lambda: [e for e in boxes["box-4"].events("refused") if e["version"] == "1.0.0"],
                      "box-4 refusing the replayed 1.0.0", BOUND)
        assert "version 1.0.0 is not newer than the running 2.0.0 and the metadata is not a signed rollback" \
            in ev[0]["detail"]
        wait_for(lambda: [r for r in _reports(db, "box-4") if "refused 1.0.0" in r["health"].get("update_event", "")],
                 "box-4's report carrying the refusal", BOUND)
        # ---- a target for another line's bundle, signed with the fleet's own targets key, is refused
        other_arc = archive(other).read_bytes()
        import hashlib

        sha = hashlib.sha256(other_arc).hexdigest()
        now = datetime.now(timezone.utc)
        meta = TargetMetadata(device="box-3", line=OTHER, version="9.0.0", sha256=sha, length=len(other_arc),
                              expires=utc_text(now + timedelta(hours=1)), issued=utc_text(now),
                              hardware_target="onnx", rollback=False, url=f"/api/v1/bundles/{sha}")
        relay.RequestHandlerClass.serve["box-3"] = json.dumps(sign_target(meta, load_private_key(tkey))).encode()
        ev = wait_for(lambda: [e for e in boxes["box-3"].events("refused") if e["version"] == "9.0.0"],
                      "box-3 refusing another line's target", BOUND)
        assert f"it is for line '{OTHER}', this box runs line '{LINE}'" in ev[0]["detail"], ev
        # ... the collector will not hand a line's device another line's archive ...
        st, body = _get(url, f"/api/v1/bundles/{sha}", token_files["box-3"].read_text().strip())
        assert st == 403 and f"belongs to line '{OTHER}'" in body.decode(), body
        # ... and the archive itself, dropped into a box's inbox by hand, is refused before it is installed
        inbox = boxes["box-1"].state_dir / "inbox"
        (inbox / ".other.part").write_bytes(other_arc)
        (inbox / ".other.part").rename(inbox / "other-line.tar.gz")
        reason = wait_for(lambda: (inbox / "rejected" / "other-line.tar.gz.reason.txt").exists()
                          and (inbox / "rejected" / "other-line.tar.gz.reason.txt").read_text(), "inbox refusal", BOUND)
        assert f"is for line '{OTHER}', this box runs line '{LINE}'" in reason, reason
        for b in BOXES:  # nothing running changed
            assert boxes[b].running() == "2.0.0" and boxes[b].state()["current"] == "2.0.0", b
            assert not (boxes[b].state_dir / "bundles" / "9.0.0").exists()
        frames_before = {b: boxes[b].health()["frames"] for b in BOXES}
        wait_for(lambda: all(boxes[b].health()["frames"] > frames_before[b] + 8 for b in BOXES),
                 "every box still inspecting", BOUND)
    finally:
        if feeder is not None:
            feeder.stop()
        codes = {b: box.stop() for b, box in boxes.items()}
        relay.shutdown()
        relay.server_close()
        collector.stop()
    assert codes == {b: 0 for b in BOXES}, {b: (codes[b], boxes[b].proc.text()[-2000:]) for b in BOXES}
    timeline = {k: round(v, 2) if isinstance(v, float) else v for k, v in timeline.items()}
    print("fleet e2e timeline:", json.dumps(timeline, sort_keys=True))
