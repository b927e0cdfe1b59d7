"""The collector over real HTTP (uvicorn on 127.0.0.1, ephemeral port) and a real SQLite store."""
from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import uuid
from urllib.parse import urlsplit

import pytest

from edge_runtime.errors import ConfigError, UserInputError
from edge_runtime.hard_examples import SCHEMA as HE_SCHEMA
from edge_runtime.report_builder import ReportBuilder
from fleet import store
from fleet.collector import CollectorThread, main as collector_main
from fleet.settings import CollectorSettings, Tokens

ADMIN, TOK1, TOK2 = "admin-token-0123456789", "press01-token-abcdefgh", "press02-token-abcdefgh"


def write_tokens(path, **extra):
    path.write_text(json.dumps({"admin": ADMIN, "devices": {
        "press-01": TOK1, "press-02": "sha256:" + hashlib.sha256(TOK2.encode()).hexdigest()}, **extra}))
    return path


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    d = tmp_path_factory.mktemp("collector")
    settings = CollectorSettings(db=d / "c.db", port=0, tokens_file=write_tokens(d / "tokens.json"),
                                 max_report_bytes=64 * 1024, max_hard_example_bytes=32 * 1024)
    c = CollectorThread(settings).start()
    yield c
    c.stop()


def call(url, method, path, body=None, token=None, headers=None):
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    try:
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        return r.status, (json.loads(data) if data else None), r
    finally:
        conn.close()


def report(device="press-01", line="line-a"):
    b = ReportBuilder(device_id=device, line=line, bundle_version="1.0.0")
    b.record_frame(ng=True, classes=["scratch"], latency_ms=20)
    return b.build().to_dict()


def test_healthz_and_idempotent_report(collector):
    st, body, _ = call(collector.url, "GET", "/healthz")
    assert (st, body) == (200, {"status": "ok"})  # no internal figures without the admin token
    st, body, _ = call(collector.url, "GET", "/healthz", token=ADMIN)
    assert st == 200 and body["status"] == "ok" and body["dev_mode"] is False and isinstance(body["reports"], int)
    r = report()
    st, body, _ = call(collector.url, "POST", "/api/v1/reports", r, TOK1)
    assert (st, body) == (201, {"id": r["id"], "duplicate": False})
    st, body, _ = call(collector.url, "POST", "/api/v1/reports", r, TOK1)
    assert (st, body) == (200, {"id": r["id"], "duplicate": True})
    with store.session(path=collector.settings.db) as conn:
        assert store.report_ids(conn).count(r["id"]) == 1
    # the same id from another device is a conflict, not a silent overwrite
    st, body, _ = call(collector.url, "POST", "/api/v1/reports", {**r, "device_id": "press-02"}, TOK2)
    assert st == 409 and "already used by another device" in body["detail"]


def test_auth_failures_say_what_to_fix(collector):
    r = report()
    st, body, resp = call(collector.url, "POST", "/api/v1/reports", r)
    assert st == 401 and "missing bearer token" in body["detail"] and resp.getheader("WWW-Authenticate") == "Bearer"
    st, body, _ = call(collector.url, "POST", "/api/v1/reports", r, headers={"Authorization": "Basic abc"})
    assert st == 401 and "malformed Authorization header (scheme 'Basic')" in body["detail"]
    st, body, _ = call(collector.url, "POST", "/api/v1/reports", r, "wrong-token-0000000000")
    assert st == 401 and "unknown token" in body["detail"]
    st, body, _ = call(collector.url, "POST", "/api/v1/reports", r, TOK2)  # valid token, other device
    assert st == 403 and body["detail"] == ("the token of device 'press-02' is not valid for a report from "
                                            "device 'press-01'")
    st, body, _ = call(collector.url, "POST", "/api/v1/reports", r, TOK1, headers={"X-Device-Id": "press-02"})
    assert st == 403 and "not valid for device 'press-02'" in body["detail"]
    st, body, _ = call(collector.url, "GET", "/api/v1/reports", token=TOK1)
    assert st == 403 and "use the admin token" in body["detail"]
    st, body, _ = call(collector.url, "GET", "/api/v1/reports")
    assert st == 401
    st, body, _ = call(collector.url, "GET", "/api/v1/devices", token=ADMIN)
    assert st == 200 and {d["device_id"] for d in body["devices"]} >= {"press-01", "press-02"}


def test_size_limit_malformed_and_schema_errors(collector):
    r = report()
    big = {**r, "health": {**r["health"], "note": "x" * 100_000}}  # limit in this fixture: 64 KB
    st, body, _ = call(collector.url, "POST", "/api/v1/reports", big, TOK1)
    assert st == 413 and "larger than the collector's limit of 65536 bytes" in body["detail"]
    st, body, _ = call(collector.url, "POST", "/api/v1/reports", b'{"id": ', TOK1)
    assert st == 400 and "report body is not valid UTF-8 JSON" in body["detail"]
    st, body, _ = call(collector.url, "POST", "/api/v1/reports", b"", TOK1)
    assert st == 400 and "empty body" in body["detail"]
    bad = {**r, "counts": {**r["counts"], "ok": 7}}
    st, body, _ = call(collector.url, "POST", "/api/v1/reports", bad, TOK1)
    assert st == 422 and "does not follow defectkit.report/1" in body["detail"] and "counts.frames" in body["detail"]
    with store.session(path=collector.settings.db) as conn:
        assert r["id"] not in store.report_ids(conn)


def test_list_filters(collector):
    ids = {line: [] for line in ("line-x", "line-y")}
    for line in ids:
        for _ in range(3):
            r = report(line=line)
            ids[line].append(r["id"])
            assert call(collector.url, "POST", "/api/v1/reports", r, TOK1)[0] == 201
    st, body, _ = call(collector.url, "GET", "/api/v1/reports?line=line-x&limit=2", token=ADMIN)
    assert st == 200 and body["count"] == 3 and len(body["reports"]) == 2
    assert {x["id"] for x in body["reports"]} <= set(ids["line-x"])
    st, body, _ = call(collector.url, "GET", "/api/v1/reports?device=press-02", token=ADMIN)
    assert st == 200 and body["count"] == 0
    assert call(collector.url, "GET", "/api/v1/reports?limit=0", token=ADMIN)[0] == 422


def real_jpeg(w=32, h=24):
    import cv2
    import numpy as np

    ok, buf = cv2.imencode(".jpg", np.full((h, w, 3), 128, np.uint8))
    return buf.tobytes()


JPEG = real_jpeg()


def hard_example(device="press-01", image=JPEG):
    meta = {"schema": HE_SCHEMA, "id": uuid.uuid4().hex, "device_id": device, "line": "line-a",
            "bundle_version": "1.0.0", "time": "2026-11-22T10:00:00.000Z", "max_score": 0.48,
            "detections": [{"class": "scratch", "score": 0.48, "box": [1.0, 2.0, 3.0, 4.0]}]}
    return {"meta": meta, "image_b64": base64.b64encode(image).decode()}


def test_hard_examples(collector):
    he = hard_example()
    st, body, _ = call(collector.url, "POST", "/api/v1/hard-examples", he, TOK1)
    assert (st, body) == (201, {"id": he["meta"]["id"], "duplicate": False})
    assert call(collector.url, "POST", "/api/v1/hard-examples", he, TOK1)[:2] == (
        200, {"id": he["meta"]["id"], "duplicate": True})
    st, body, _ = call(collector.url, "GET", "/api/v1/hard-examples", token=ADMIN)
    (row,) = [x for x in body["hard_examples"] if x["id"] == he["meta"]["id"]]
    with open(row["image_path"], "rb") as fh:
        assert fh.read() == JPEG
    assert row["image_path"].endswith(f"line-a/press-01/{he['meta']['id']}.jpg")
    st, body, _ = call(collector.url, "POST", "/api/v1/hard-examples", {**he, "image_b64": "***"}, TOK1)
    assert st == 400 and "not valid base64" in body["detail"]
    st, body, _ = call(collector.url, "POST", "/api/v1/hard-examples", hard_example(image=b"GIF89a"), TOK1)
    assert st == 422 and "does not hold a JPEG" in body["detail"]
    st, body, _ = call(collector.url, "POST", "/api/v1/hard-examples", hard_example(image=b"\xff\xd8\xff\xe0fake"), TOK1)
    assert st == 422 and "not a decodable JPEG" in body["detail"]
    bad = hard_example()
    bad["meta"]["max_score"] = 7
    st, body, _ = call(collector.url, "POST", "/api/v1/hard-examples", bad, TOK1)
    assert st == 422 and "max_score must be a number in [0, 1]" in body["detail"]
    st, body, _ = call(collector.url, "POST", "/api/v1/hard-examples", {"image": "x"}, TOK1)
    assert st == 422 and '{"meta"' in body["detail"]
    st, body, _ = call(collector.url, "POST", "/api/v1/hard-examples", hard_example(device="press-02"), TOK1)
    assert st == 403
    st, body, _ = call(collector.url, "POST", "/api/v1/hard-examples",
                       hard_example(image=b"\xff\xd8" + b"\0" * 40_000), TOK1)  # limit here: 32 KB
    assert st == 413 and "hard example of" in body["detail"]


def test_settings_refuse_unsafe_or_broken_setups(tmp_path):
    with pytest.raises(ConfigError, match="refusing to serve on 0.0.0.0 without tokens"):
        CollectorSettings(db=tmp_path / "c.db", host="0.0.0.0").check()
    CollectorSettings(db=tmp_path / "c.db", host="::1").check()  # loopback dev mode is fine
    tokens = write_tokens(tmp_path / "t.json")
    CollectorSettings(db=tmp_path / "c.db", host="0.0.0.0", tokens_file=tokens).check()
    (tmp_path / "short.json").write_text('{"devices": {"press-01": "abc"}}')
    with pytest.raises(ConfigError, match=r"token of device 'press-01' is shorter than 16 .*secrets.token_urlsafe"):
        Tokens.load(tmp_path / "short.json")
    (tmp_path / "bad.json").write_text('{"devices": ')
    with pytest.raises(ConfigError, match=r"bad.json is not valid json"):
        Tokens.load(tmp_path / "bad.json")
    (tmp_path / "keys.yaml").write_text("devices: {press-01: press01-token-abcdefgh}\nadmins: x\n")
    with pytest.raises(ConfigError, match="unknown keys admins"):
        Tokens.load(tmp_path / "keys.yaml")
    (tmp_path / "none.yaml").write_text("devices: {}\n")
    with pytest.raises(ConfigError, match="lists no devices"):
        CollectorSettings(db=tmp_path / "c.db", tokens_file=tmp_path / "none.yaml").check()
    with pytest.raises(ConfigError, match="cannot be read"):
        Tokens.load(tmp_path / "missing.json")
    t = Tokens.load(tokens)
    assert t.device_for(TOK2) == "press-02" and t.device_for(TOK1) == "press-01" and t.device_for(ADMIN) is None
    assert t.is_admin(ADMIN) and not t.is_admin(TOK1)


def test_dev_mode_accepts_without_tokens(tmp_path):
    c = CollectorThread(CollectorSettings(db=tmp_path / "dev.db", port=0)).start()
    try:
        r = report()
        assert call(c.url, "POST", "/api/v1/reports", r)[0] == 201
        st, body, _ = call(c.url, "GET", "/api/v1/reports")
        assert st == 200 and body["reports"][0]["id"] == r["id"]
    finally:
        c.stop()


def test_cli_list_and_registration(collector, capsys):
    from defectkit.cli import VERB_MODULES
    from fleet.cli import register

    assert "fleet.cli" in VERB_MODULES
    parser = argparse.ArgumentParser(prog="defectkit")
    register(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["collector", "serve", "--db", "x.db", "--port", "0", "--tokens", "t.json"])
    assert (args.collector_cmd, args.port, str(args.tokens)) == ("serve", 0, "t.json")
    db = str(collector.settings.db)
    assert collector_main(["list", "--db", db, "--line", "line-x"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["id", "device", "line"] and "3 shown of 3 reports" in out
    assert collector_main(["list", "--db", db, "--what", "devices", "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert {r["device_id"] for r in rows} >= {"press-01", "press-02"}
    assert collector_main(["list", "--db", str(collector.settings.db) + ".nope"]) == UserInputError.exit_code
    assert "does not exist; give the --db" in capsys.readouterr().err
    assert collector_main(["serve", "--db", db, "--host", "0.0.0.0", "--port", "0"]) == ConfigError.exit_code
    assert "refusing to serve on 0.0.0.0 without tokens" in capsys.readouterr().err
