"""Hostile and broken inputs against a real collector on loopback (uvicorn, real SQLite): every one is answered
with a 4xx naming the field, never a 500, and the collector's data stays readable afterwards."""
from __future__ import annotations

import base64
import json
import socket
import uuid
from urllib.parse import urlsplit

import pytest

from fleet import store
from fleet.collector import CollectorThread
from fleet.settings import CollectorSettings
from tests.test_collector_api import ADMIN, JPEG, TOK1, TOK2, call, hard_example, report, write_tokens


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    d = tmp_path_factory.mktemp("hardening")
    settings = CollectorSettings(db=d / "c.db", port=0, tokens_file=write_tokens(d / "tokens.json"),
                                 max_report_bytes=64 * 1024, max_hard_example_bytes=256 * 1024,
                                 rate_per_s=1e6, burst=10**6)  # the rate limit has its own test below
    c = CollectorThread(settings).start()
    yield c
    c.stop()


def post_raw(url, path, body: bytes, token=TOK1):
    return call(url, "POST", path, body, token, headers={"Content-Type": "application/json"})


def with_feature_extra(value):
    r = report()
    r["drift"]["features"] = {"brightness": {"state": "none", "psi": 0.1, "ks_p": 0.5, "extra": value}}
    return r


def test_deep_nesting_and_huge_numbers_are_400_not_500(collector):
    url = collector.url
    for body, reason in [
        (b"[" * 30_000 + b"]" * 30_000, "nested deeper than"),
        (json.dumps(with_feature_extra("DEEP")).replace('"DEEP"', "[" * 400 + "]" * 400).encode(),
         "nested deeper than"),
        (json.dumps({**report(), "alarm": 1}).replace('"alarm": 1', '"alarm": 1e400').encode(), "out of range"),
        (json.dumps(report()).replace('"uptime_s": ', '"uptime_s": 1' + "0" * 400 + ', "x": ').encode(), "digits"),
        (json.dumps(report()).replace('"latency_ms_p50": 20.0', '"latency_ms_p50": NaN').encode(), "NaN"),
        (b"\xff\xfe{}", "not UTF-8"),
    ]:
        st, body_, _ = post_raw(url, "/api/v1/reports", body)
        assert st == 400 and reason in body_["detail"], (st, body_)
    r = report()
    r["counts"].update(frames=10 ** 30 + 1, ok=10 ** 30)  # consistent sums, too many digits to parse
    st, body_, _ = call(url, "POST", "/api/v1/reports", r, TOK1)
    assert st == 400 and "has more than 20 digits" in body_["detail"]
    r["counts"].update(frames=10 ** 17 + 1, ok=10 ** 17)  # parses, too large for the store's columns
    st, body_, _ = call(url, "POST", "/api/v1/reports", r, TOK1)
    assert st == 422 and "counts.frames must be an integer in 0..2^53" in body_["detail"]


def test_nested_extras_are_refused_and_reports_stay_readable(collector):
    url = collector.url
    good = report()
    assert call(url, "POST", "/api/v1/reports", good, TOK1)[0] == 201
    bad = report()
    bad["drift"]["features"] = {"brightness": {"state": "none", "psi": 0.1, "ks_p": 0.5, "hist": {"k": [1]}}}
    st, body, _ = call(url, "POST", "/api/v1/reports", bad, TOK1)
    assert st == 422 and "drift.features['brightness'].hist must be a number, string, boolean or null" in body["detail"]
    bad = report()
    bad["health"]["note"] = "x" * 300
    st, body, _ = call(url, "POST", "/api/v1/reports", bad, TOK1)
    assert st == 422 and "health.note must be a string of at most 256 characters" in body["detail"]
    st, body, _ = call(url, "GET", "/api/v1/reports?limit=1000", token=ADMIN)
    assert st == 200 and good["id"] in [x["id"] for x in body["reports"]]


def test_ids_and_names_are_matched_whole(collector):
    url = collector.url
    r = report()
    st, body, _ = call(url, "POST", "/api/v1/reports", {**r, "id": r["id"] + "\n"}, TOK1)
    assert st == 422 and "id must be 32 lowercase hex" in body["detail"]
    st, body, _ = call(url, "POST", "/api/v1/reports", {**r, "line": "line-a\n"}, TOK1)
    assert st == 422 and "line must be 1-64" in body["detail"] and "line-a\\n" in body["detail"]
    st, body, _ = call(url, "POST", "/api/v1/reports", {**r, "bundle_version": "1.0\n"}, TOK1)
    assert st == 422 and "bundle_version must be 1-128" in body["detail"]
    with store.session(path=collector.settings.db) as conn:
        assert not [i for i in store.report_ids(conn) if i.strip() != i]


def test_hard_examples_are_decoded_and_boxes_checked(collector):
    url = collector.url
    html = hard_example(image=b"\xff\xd8<html><body>not an image</body></html>")
    st, body, _ = call(url, "POST", "/api/v1/hard-examples", html, TOK1)
    assert st == 422 and "not a decodable JPEG" in body["detail"]
    st, body, _ = call(url, "POST", "/api/v1/hard-examples", hard_example(image=b"<html></html>"), TOK1)
    assert st == 422 and "does not hold a JPEG" in body["detail"]
    # a real JPEG whose frame header claims 30000 x 30000: refused from the header, never decoded
    i = JPEG.index(b"\xff\xc0")
    bomb = JPEG[:i + 5] + (30000).to_bytes(2, "big") * 2 + JPEG[i + 9:]
    st, body, _ = call(url, "POST", "/api/v1/hard-examples", hard_example(image=bomb), TOK1)
    assert st == 422 and "30000x30000 JPEG" in body["detail"]
    for box, why in [([5.0, 2.0, 1.0, 4.0], "0 <= x1 <= x2"), ([1.0, 2.0, "3", 4.0], "4 finite numbers"),
                     ([1.0, 2.0, 300.0, 4.0], "outside the 32x24 image")]:
        he = hard_example()
        he["meta"].update(width=32, height=24)
        he["meta"]["detections"][0]["box"] = box
        st, body, _ = call(url, "POST", "/api/v1/hard-examples", he, TOK1)
        assert st == 422 and why in body["detail"], (box, body)
    he = hard_example()
    he["meta"]["width"] = 64
    st, body, _ = call(url, "POST", "/api/v1/hard-examples", he, TOK1)
    assert st == 422 and "meta.width is 64 but the JPEG is 32x24" in body["detail"]


def test_same_hard_example_id_from_another_device_is_409(collector):
    url = collector.url
    he = hard_example()
    assert call(url, "POST", "/api/v1/hard-examples", he, TOK1)[0] == 201
    other = hard_example(device="press-02")
    other["meta"]["id"] = he["meta"]["id"]
    st, body, _ = call(url, "POST", "/api/v1/hard-examples", other, TOK2)
    assert st == 409 and "already used by another device" in body["detail"]
    with store.session(path=collector.settings.db) as conn:
        (row,) = [x for x in store.list_hard_examples(conn, limit=1000) if x["id"] == he["meta"]["id"]]
    assert row["device_id"] == "press-01"
    with open(row["image_path"], "rb") as fh:
        assert fh.read() == JPEG


def _raw_request(url: str, head: bytes, body_part: bytes) -> tuple:
    """Send the head and part of a body, never the rest; return (status line, whether the server closed)."""
    u = urlsplit(url)
    s = socket.create_connection((u.hostname, u.port), timeout=10)  # a bound on a hang, not a measured window
    try:
        s.sendall(head + body_part)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head_end = data.index(b"\r\n\r\n") + 4
        headers = data[:head_end].decode("latin-1").lower()
        length = int(headers.split("content-length:")[1].split("\r\n")[0])
        while len(data) < head_end + length:
            data += s.recv(65536)
        try:
            closed = s.recv(65536) == b""  # the server drops the connection instead of reading the rest
        except ConnectionResetError:
            closed = True
        return data.split(b"\r\n")[0].decode(), headers, json.loads(data[head_end:head_end + length]), closed
    finally:
        s.close()


def test_oversized_bodies_are_refused_without_reading_them(collector):
    limit = collector.settings.max_report_bytes
    # declares 100 MB, sends 1 KB: answered at once from the header (a server reading on would wait forever)
    head = (f"POST /api/v1/reports HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOK1}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {100 * 2**20}\r\n\r\n").encode()
    status, headers, body, closed = _raw_request(collector.url, head, b"{" * 1024)
    assert status.startswith("HTTP/1.1 413") and "connection: close" in headers and closed
    assert f"of {100 * 2**20} bytes is larger than the collector's limit of {limit} bytes" in body["detail"]
    # chunked, no length: refused once limit bytes have passed, while the client has not finished sending
    head = (f"POST /api/v1/reports HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOK1}\r\n"
            f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b"x" * 8192
    part = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4 * limit // len(chunk)))
    status, headers, body, closed = _raw_request(collector.url, head, part)
    assert status.startswith("HTTP/1.1 413") and closed
    read = int(body["detail"].split("(read ")[1].split(" ")[0])
    assert limit < read <= limit + 65536  # at most one more network read (uvicorn reads 64 KiB at a time)
    assert read < 4 * limit


def test_rate_limit_and_storage_quota_answer_429_with_retry_after(tmp_path):
    settings = CollectorSettings(db=tmp_path / "c.db", port=0, tokens_file=write_tokens(tmp_path / "tokens.json"),
                                 rate_per_s=0.001, burst=3, quota_bytes_per_day=2 * len(JPEG) + 10)
    c = CollectorThread(settings).start()
    try:
        assert [call(c.url, "POST", "/api/v1/reports", report(), TOK1)[0] for _ in range(3)] == [201] * 3
        st, body, resp = call(c.url, "POST", "/api/v1/reports", report(), TOK1)
        assert st == 429 and "press-01 is over the collector's rate" in body["detail"]
        assert int(resp.getheader("Retry-After")) >= 1
        # another device has its own bucket; its hard examples stop at the storage quota (2 images here)
        assert [call(c.url, "POST", "/api/v1/hard-examples", hard_example(device="press-02"), TOK2)[0]
                for _ in range(2)] == [201, 201]
        st, body, resp = call(c.url, "POST", "/api/v1/hard-examples", hard_example(device="press-02"), TOK2)
        assert st == 429 and "over its hard-example quota" in body["detail"]
        assert 1 <= int(resp.getheader("Retry-After")) <= 86401
    finally:
        c.stop()


def test_healthz_shows_no_figures_without_the_admin_token(collector):
    assert call(collector.url, "GET", "/healthz")[:2] == (200, {"status": "ok"})
    assert call(collector.url, "GET", "/healthz", token=TOK1)[:2] == (200, {"status": "ok"})
    st, body, _ = call(collector.url, "GET", "/healthz", token=ADMIN)
    assert st == 200 and body["reports"] >= 1


def test_export_skips_rows_stored_before_the_checks(tmp_path):
    """Rows an older collector accepted (an HTML 'image', a reversed or non-numeric box) no longer abort the
    export of the whole line: the bad image and the bad boxes are left out and counted."""
    from fleet.labelling import export_hard_examples

    good, html, bad_box = hard_example(), hard_example(), hard_example()
    bad_box["meta"]["detections"] = [{"class": "scratch", "score": 0.9, "box": [9.0, 9.0, 1.0, "x"]},
                                     {"class": "dent", "score": 0.9, "box": [1.0, 1.0, 5.0, 5.0]}]
    with store.session(path=tmp_path / "c.db") as conn:
        for he, data in ((good, JPEG), (html, b"\xff\xd8<html></html>"), (bad_box, JPEG)):
            path = tmp_path / f"{he['meta']['id']}.jpg"
            path.write_bytes(data)
            store.insert_hard_example(conn, meta=he["meta"], image_path=str(path), image_sha256="0" * 64,
                                      image_bytes=len(data))
        done = export_hard_examples(conn, line="line-a", out=tmp_path / "out", classes=["scratch", "dent"])
    assert (done.images, done.skipped, done.boxes) == (2, 1, 2)  # good: 1 box; bad_box: only its valid box
    coco = json.loads((tmp_path / "out" / "annotations" / "all.json").read_text())
    assert sorted(im["file_name"] for im in coco["images"]) == sorted(
        f"{he['meta']['id']}.jpg" for he in (good, bad_box))
    assert not (tmp_path / "out" / "images" / f"{html['meta']['id']}.jpg").exists()


def test_a_box_report_with_scored_categorical_drift_passes_the_collectors_checks():
    """The contract both ways: what the box's drift monitor puts in a report (categorical features carry their
    window/reference category shares, one level deep) is accepted; deeper nesting or a share out of [0, 1] is not."""
    from edge_runtime.drift import DriftMonitor, build_reference
    from edge_runtime.drift.synthetic import feature_dicts
    from edge_runtime.wire_report import Counts, Drift, Report, Window, utc_iso
    from fleet.validate import report_problems

    monitor = DriftMonitor(build_reference(feature_dicts(400, seed=1)))
    for frame in feature_dicts(150, seed=2):
        monitor.update(frame)
    features = monitor.snapshot()["features"]
    assert features["class_mix"]["window_shares"], "the categorical feature was not scored"
    report = Report(device_id="box-1", line="line-a", bundle_version="1.0.0",
                    window=Window(utc_iso(0), utc_iso(60)), counts=Counts(frames=150, ok=100, ng=50),
                    drift=Drift.from_features(features)).to_dict()
    assert report_problems(report) == []
    bad = json.loads(json.dumps(report))
    bad["drift"]["features"]["class_mix"]["window_shares"] = {"a": {"b": 1}}
    assert any("window_shares" in p for p in report_problems(bad))
    bad["drift"]["features"]["class_mix"]["window_shares"] = {"a": 1.5}
    assert any("share in [0, 1]" in p for p in report_problems(bad))
