"""The fleet over real HTTP: uvicorn on loopback, real signed bundles and target metadata, on both stores: a
SQLite file and a PostgreSQL database of a real server started for the session (tests/pgserver.py).

One collector runs for the module with its background rollout evaluator every 50 ms. Rollouts are started
with an injected start time one window in the past, so the window has passed without sleeping; the test
waits on the store's state (a condition), not on the clock.
"""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from datetime import datetime, timezone

import pytest

from compress.keys import init_keys
from edge_runtime.hard_examples import SCHEMA as HE_SCHEMA
from edge_runtime.targets import verify_target
from fleet import devices, registry, rollout, store
from fleet.collector import CollectorThread
from fleet.settings import CollectorSettings
from tests.pgserver import pg_server  # noqa: F401  (fixture)
from tests.test_fleet_helpers import call, keys, make_archive, report

ADMIN, LEGACY = "admin-token-0123456789", "legacy01-token-abcdefgh"


def wait_for(cond, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fleet(tmp_path_factory, request):
    base = tmp_path_factory.mktemp("fleet")
    bkey, _, bpub = keys(base, "bundle")
    tpair = init_keys(base / "targets")
    (base / "tokens.json").write_text(json.dumps({"admin": ADMIN, "devices": {"legacy-01": LEGACY}}))
    db = base / "fleet.db" if request.param == "sqlite" else request.getfixturevalue("pg_server").create_db("fleet")
    archives = {v: make_archive(base, bkey, version=v, parent=p) for v, p in
                (("1.0.0", None), ("2.0.0", "1.0.0"), ("3.0.0", "2.0.0"))}
    archives["b1"] = make_archive(base, bkey, line="line-b", version="1.0.0")
    with store.session(path=db) as conn:  # the first push (CLI side) sets the registry's trusted key
        registry.push(conn, archive=archives["1.0.0"], registry_dir=base / "fleet_registry", public_key=bpub)
        registry.push(conn, archive=archives["b1"], registry_dir=base / "fleet_registry")
        tokens = {d: devices.enroll(conn, line="line-a", device_id=d, tags={"site": "a"}) for d in
                  ("d1", "d2", "d3", "d4")}
        tokens["b9"] = devices.enroll(conn, line="line-b", device_id="b9")
    settings = CollectorSettings(db=db, port=0, tokens_file=base / "tokens.json", targets_key=tpair.private,
                                 target_expiry_s=3600, rollout_interval_s=0.05, registry_dir=base / "fleet_registry",
                                 data_dir=base / "fleet_hard_examples")
    c = CollectorThread(settings).start()
    yield {"c": c, "url": c.url, "db": db, "archives": archives, "tokens": tokens, "tpub": tpair.public, "base": base}
    c.stop()


def _dashboard(url):
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request("GET", "/", headers={"Authorization": f"Bearer {ADMIN}"})
        r = conn.getresponse()
        assert r.status == 200
        return r.read().decode()
    finally:
        conn.close()


def target(f, dev, token=None):
    st, doc, _ = call(f["url"], "GET", f"/api/v1/devices/{dev}/target", token=token or f["tokens"][dev])
    if st != 200:
        return st, doc
    meta = verify_target(doc, f["tpub"], device=dev, line=doc["signed"]["line"], now=datetime.now(timezone.utc))
    return st, meta


def test_upload_and_list_over_the_api(fleet):
    url, a = fleet["url"], fleet["archives"]
    st, body, _ = call(url, "POST", "/api/v1/lines/line-a/versions", a["2.0.0"].read_bytes(), ADMIN)
    assert st == 201 and body["version"] == "2.0.0" and body["duplicate"] is False
    assert body["sha256"] == hashlib.sha256(a["2.0.0"].read_bytes()).hexdigest()
    st, body, _ = call(url, "POST", "/api/v1/lines/line-a/versions", a["2.0.0"].read_bytes(), ADMIN)
    assert st == 200 and body["duplicate"] is True
    st, body, _ = call(url, "POST", "/api/v1/lines/line-x/versions", a["3.0.0"].read_bytes(), ADMIN)
    assert st == 400 and "the bundle is for line 'line-a', not 'line-x'" in body["detail"]
    unsigned = make_archive(fleet["base"], keys(fleet["base"], "x")[0], version="7.0.0", sign=False)
    st, body, _ = call(url, "POST", "/api/v1/lines/line-a/versions", unsigned.read_bytes(), ADMIN)
    assert st == 422 and "unsigned bundle refused" in body["detail"]
    st, body, _ = call(url, "POST", "/api/v1/lines/line-a/versions", b"", ADMIN)
    assert st == 400 and "empty body" in body["detail"]
    st, body, _ = call(url, "POST", "/api/v1/lines/line-a/versions", a["3.0.0"].read_bytes(), fleet["tokens"]["d1"])
    assert st == 403 and "use the admin token" in body["detail"]
    st, body, _ = call(url, "GET", "/api/v1/lines/line-a/versions", token=ADMIN)
    assert st == 200 and [v["version"] for v in body["versions"]] == ["1.0.0", "2.0.0"]
    assert {v["state"] for v in body["versions"]} == {"candidate"}


def test_update_channel_and_line_binding(fleet):
    url, tok = fleet["url"], fleet["tokens"]
    st, _ = target(fleet, "d1")
    assert st == 204  # no active version yet
    st, body, _ = call(url, "POST", "/api/v1/lines/line-a/versions/1.0.0/promote", token=ADMIN)
    assert st == 200 and body == {"line": "line-a", "active": "1.0.0", "previous": None}
    st, meta = target(fleet, "d1")
    archive = fleet["archives"]["1.0.0"].read_bytes()
    assert st == 200 and (meta.version, meta.line, meta.hardware_target, meta.rollback) == ("1.0.0", "line-a", "onnx",
                                                                                            False)
    assert meta.length == len(archive) and meta.sha256 == hashlib.sha256(archive).hexdigest()
    issued, expires = (datetime.fromisoformat(t[:-1]) for t in (meta.issued, meta.expires))
    assert (expires - issued).total_seconds() == 3600
    st, data, resp = call(url, "GET", meta.url, token=tok["d1"])
    assert st == 200 and data == archive and resp.getheader("etag") == f'"{meta.sha256}"'
    st, body, _ = call(url, "GET", "/api/v1/devices/d2/target", token=tok["d1"])
    assert st == 403 and "the token of device 'd1' cannot read the target of device 'd2'" in body["detail"]
    b_sha = hashlib.sha256(fleet["archives"]["b1"].read_bytes()).hexdigest()
    st, body, _ = call(url, "GET", f"/api/v1/bundles/{b_sha}", token=tok["d1"])
    assert st == 403 and "belongs to line 'line-b', device 'd1' to line 'line-a'" in body["detail"]
    st, body, _ = call(url, "GET", "/api/v1/bundles/" + "0" * 64, token=tok["d1"])
    assert st == 404 and "no bundle with sha256" in body["detail"]
    st, body, _ = call(url, "GET", "/api/v1/bundles/latest", token=tok["d1"])
    assert st == 410 and "/api/v1/devices/{device_id}/target" in body["detail"]
    st, body, _ = call(url, "GET", "/api/v1/devices/legacy-01/target", token=LEGACY)
    assert st == 403 and "device 'legacy-01' is not enrolled on a line" in body["detail"]
    # a device is bound to its line: reports and hard examples for another line are refused
    st, body, _ = call(url, "POST", "/api/v1/reports", report("d1", "line-b", "1.0.0"), tok["d1"])
    assert st == 403 and body["detail"] == "device 'd1' is enrolled on line 'line-a': a report for line 'line-b' is refused"
    he = {"meta": {"schema": HE_SCHEMA, "id": uuid.uuid4().hex, "device_id": "d1", "line": "line-b",
                   "bundle_version": "1.0.0", "time": "2026-11-22T10:00:00.000Z", "max_score": 0.4, "detections": []},
          "image_b64": "/9j/AA=="}
    st, body, _ = call(url, "POST", "/api/v1/hard-examples", he, tok["d1"])
    assert st == 403 and "a hard example for line 'line-b' is refused" in body["detail"]
    assert call(url, "POST", "/api/v1/reports", report("d1", "line-a", "1.0.0"), tok["d1"])[0] == 201
    assert call(url, "POST", "/api/v1/reports", report("legacy-01", "line-z", "1.0.0"), LEGACY)[0] == 201  # token file
    st, body, _ = call(url, "POST", "/api/v1/reports", report("d2", "line-a", "1.0.0"), tok["d1"])
    assert st == 403 and "not valid for a report from device 'd2'" in body["detail"]


def test_revoke_and_rotate_without_restart(fleet):
    url = fleet["url"]
    with store.session(path=fleet["db"]) as conn:
        old = fleet["tokens"]["d3"]
        new = devices.rotate(conn, device_id="d3")
    st, body, _ = call(url, "POST", "/api/v1/reports", report("d3", "line-a", "1.0.0"), old)
    assert st == 401 and "unknown token" in body["detail"]
    assert call(url, "POST", "/api/v1/reports", report("d3", "line-a", "1.0.0"), new)[0] == 201
    fleet["tokens"]["d3"] = new
    with store.session(path=fleet["db"]) as conn:
        devices.revoke(conn, device_id="d4")
    st, body, _ = call(url, "POST", "/api/v1/reports", report("d4", "line-a", "1.0.0"), fleet["tokens"]["d4"])
    assert st == 401 and "the token of device 'd4' was revoked at" in body["detail"]
    st, body, _ = call(url, "GET", "/api/v1/devices/d4/target", token=fleet["tokens"]["d4"])
    assert st == 401


def _state(fleet, line="line-a"):
    with store.session(path=fleet["db"]) as conn:
        return rollout.latest(conn, line=line)["state"]


def test_canary_promotes_then_a_bad_version_rolls_back(fleet, capsys):
    url, tok = fleet["url"], fleet["tokens"]
    window = 60.0
    with store.session(path=fleet["db"]) as conn:
        rollout.start(conn, line="line-a", version="2.0.0", window_s=window, devices=["d1"],
                      now=time.time() - 2 * window + 30)  # the window is over, 30 s of grace left
    assert target(fleet, "d1")[1].version == "2.0.0" and target(fleet, "d2")[1].version == "1.0.0"
    st, body, _ = call(url, "POST", "/api/v1/lines/line-a/versions/1.0.0/promote", token=ADMIN)
    assert st == 400 and "line-a 1.0.0 is already the active version" in body["detail"]
    assert call(url, "POST", "/api/v1/lines/line-a/versions", fleet["archives"]["3.0.0"].read_bytes(), ADMIN)[0] == 201
    st, body, _ = call(url, "POST", "/api/v1/lines/line-a/versions/3.0.0/promote", token=ADMIN)
    assert st == 400 and "a rollout of line-a 2.0.0 is running: stop it first" in body["detail"]
    for dev, version, ng in (("d2", "1.0.0", 2), ("d3", "1.0.0", 1), ("d1", "2.0.0", 2)):
        assert call(url, "POST", "/api/v1/reports", report(dev, "line-a", version, frames=40, ng=ng), tok[dev])[0] == 201
    wait_for(lambda: _state(fleet) == "promoted", what="promotion by the background evaluator")
    st, meta = target(fleet, "d2")
    assert (meta.version, meta.rollback) == ("2.0.0", False)

    with store.session(path=fleet["db"]) as conn:
        rollout.start(conn, line="line-a", version="3.0.0", window_s=window, devices=["d2"], now=time.time() - 5)
    assert target(fleet, "d2")[1].version == "3.0.0" and target(fleet, "d3")[1].version == "2.0.0"
    event = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} refused : pulled-3.0.0.tar.gz: golden self-test failed"
    r = report("d2", "line-a", "2.0.0", health_extra={"update_event": event})
    assert call(url, "POST", "/api/v1/reports", r, tok["d2"])[0] == 201
    wait_for(lambda: _state(fleet) == "rolled_back", what="rollback by the background evaluator")
    with store.session(path=fleet["db"]) as conn:
        v3 = registry.get_version(conn, line="line-a", version="3.0.0")
        assert v3["state"] == "retired" and "rolled back: canary box d2: update of 3.0.0 failed" in v3["note"]
        assert registry.active_version(conn, line="line-a")["version"] == "2.0.0"
    st, meta = target(fleet, "d2")
    assert (meta.version, meta.rollback) == ("2.0.0", True)  # 3.0.0 was served as canary: going back is a rollback
    from defectkit.cli import main

    assert main(["rollout", "status", "line-a", "--db", str(fleet["db"])]) == 0
    out = capsys.readouterr().out
    assert "rollout 2 of line-a 3.0.0 (from 2.0.0): rolled_back" in out
    assert "start" in out and "rolled_back canary box d2: update of 3.0.0 failed" in out
    st, body, _ = call(url, "GET", "/api/v1/lines/line-a/rollout", token=ADMIN)
    assert st == 200 and [d["action"] for d in body["decisions"]][0] == "start"
    # the dashboard shows the same rollout state and the boxes' bundle versions
    page = _dashboard(url)
    assert "3.0.0 from 2.0.0: <strong>rolled_back</strong>" in page and "canary d2" in page
    assert "rolled_back: canary box d2: update of 3.0.0 failed" in page and "active version: 2.0.0" in page
    assert body["decisions"][-1]["figures"]["canary"] == ["d2"]
    # the registry's own rollback: only to a version that passed its gates and was active
    st, body, _ = call(url, "POST", "/api/v1/lines/line-a/rollback", {"to": "3.0.0"}, ADMIN)
    assert st == 400 and "cannot roll back line-a to 3.0.0: it was never active" in body["detail"]
    st, body, _ = call(url, "POST", "/api/v1/lines/line-a/rollback", {"to": "1.0.0"}, ADMIN)
    assert st == 200 and body == {"line": "line-a", "active": "1.0.0"}
    st, meta = target(fleet, "d1")
    assert (meta.version, meta.rollback) == ("1.0.0", True)
    assert fleet["c"].app.state.rollout_evaluations > 0
