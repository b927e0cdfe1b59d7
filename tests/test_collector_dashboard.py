"""The dashboard of a real collector fed by real reports, fetched over HTTP like a browser: login, session cookie,
the boxes, charts drawn from the data, alarms, hard-example thumbnails, rollout state."""
from __future__ import annotations

import http.client
import re
from urllib.parse import urlsplit

import pytest

from edge_runtime.report_builder import ReportBuilder
from fleet.collector import CollectorThread
from fleet.settings import CollectorSettings
from tests.test_collector_api import ADMIN, JPEG, TOK1, TOK2, call, hard_example, write_tokens


def fetch(url, method, path, body=None, headers=None):
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read(), r
    finally:
        conn.close()


def built(device, *, ng, frames=50, psi=0.05, alarm=False, version="1.0.0"):
    b = ReportBuilder(device_id=device, line="line-a", bundle_version=version)
    for i in range(frames):
        b.record_frame(ng=i < ng, classes=["scratch"] if i < ng else [], latency_ms=12.0)
    state = "alarm" if alarm else "none"
    return b.build(drift={"brightness": {"state": state, "psi": psi, "ks_p": 0.3},
                          "sharpness": {"state": "none", "psi": psi / 2, "ks_p": 0.6}}).to_dict()


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    d = tmp_path_factory.mktemp("dash")
    settings = CollectorSettings(db=d / "c.db", port=0, tokens_file=write_tokens(d / "tokens.json"),
                                 rate_per_s=1e6, burst=10**6)
    c = CollectorThread(settings).start()
    for i in range(6):
        assert call(c.url, "POST", "/api/v1/reports", built("press-01", ng=i, psi=0.02 * i), TOK1)[0] == 201
        assert call(c.url, "POST", "/api/v1/reports", built("press-02", ng=1, version="1.1.0"), TOK2)[0] == 201
    assert call(c.url, "POST", "/api/v1/reports", built("press-01", ng=9, psi=0.4, alarm=True), TOK1)[0] == 201
    he = hard_example()
    assert call(c.url, "POST", "/api/v1/hard-examples", he, TOK1)[0] == 201
    yield c, he
    c.stop()


def test_login_page_then_session_cookie(fed):
    c, _ = fed
    st, body, _ = fetch(c.url, "GET", "/")
    assert st == 200 and b'<form class="login" method="post" action="/login">' in body and b"press-01" not in body
    st, body, _ = fetch(c.url, "POST", "/login", b"token=wrong-token-000000000",
                        {"Content-Type": "application/x-www-form-urlencoded"})
    assert st == 401 and b"not the collector&#39;s admin token" in body
    st, body, _ = fetch(c.url, "POST", "/login", f"token={TOK1}".encode(),
                        {"Content-Type": "application/x-www-form-urlencoded"})
    assert st == 401  # a device token is not the admin token
    st, _, resp = fetch(c.url, "POST", "/login", f"token={ADMIN}".encode(),
                        {"Content-Type": "application/x-www-form-urlencoded"})
    cookie = resp.getheader("Set-Cookie")
    assert st == 303 and resp.getheader("Location") == "/" and "HttpOnly" in cookie and "SameSite=strict" in cookie
    st, body, _ = fetch(c.url, "GET", "/", headers={"Cookie": cookie.split(";")[0]})
    assert st == 200 and b"Line line-a" in body
    forged = cookie.split(";")[0][:-4] + "0000"
    assert b"Line line-a" not in fetch(c.url, "GET", "/", headers={"Cookie": forged})[1]


def test_dashboard_shows_boxes_charts_alarms_and_thumbnails(fed):
    c, he = fed
    st, body, resp = fetch(c.url, "GET", "/", headers={"Authorization": f"Bearer {ADMIN}"})
    page = body.decode()
    assert st == 200 and resp.getheader("Content-Type").startswith("text/html")
    assert "<script" not in page and not re.search(r'(src|href)="(https?:)?//', page)  # nothing from elsewhere
    rows = dict(re.findall(r'<tr data-device="([^"]+)"><td>[^<]+</td><td[^>]*>[^<]+</td><td>([^<]*)</td>', page))
    assert rows == {"press-01": "1.0.0", "press-02": "1.1.0"}
    assert re.search(r'data-device="press-01">.*?class="health-alarm">alarm', page, re.S)
    # 13 reports, 650 frames, NG 0+1+...+5 + 6x1 + 9 = 30 -> 4.62 %
    assert "13 report(s), 650 frames, NG 4.62%" in page and "1 hard example(s)" in page
    series = dict(re.findall(r'<polyline class="series" data-series="([^"]+)" data-points="(\d+)"', page))
    # drift: the worst box per time bucket, so the same buckets as the NG rate (every report has both features)
    assert series["brightness"] == series["sharpness"] == series["NG rate"] and 1 <= int(series["NG rate"]) <= 13
    assert page.count('<svg xmlns="http://www.w3.org/2000/svg" class="chart"') == 2
    assert re.search(r'<li class="alarm">[^<]+press-01 \(1\.0\.0\): brightness</li>', page)
    assert "no rollout yet" in page
    src = f'/dashboard/hard-examples/{he["meta"]["id"]}.jpg'
    assert f'<img src="{src}"' in page
    st, img, resp = fetch(c.url, "GET", src, headers={"Authorization": f"Bearer {ADMIN}"})
    assert st == 200 and img == JPEG and resp.getheader("Content-Type") == "image/jpeg"
    assert fetch(c.url, "GET", src)[0] == 401
    assert fetch(c.url, "GET", "/dashboard/hard-examples/" + "0" * 32 + ".jpg",
                 headers={"Authorization": f"Bearer {ADMIN}"})[0] == 404


def test_html_in_reports_is_escaped(fed):
    c, _ = fed
    r = built("press-01", ng=0)
    r["health"]["selftest"] = "<b>x</b>"
    assert call(c.url, "POST", "/api/v1/reports", r, TOK1)[0] == 201
    page = fetch(c.url, "GET", "/", headers={"Authorization": f"Bearer {ADMIN}"})[1].decode()
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
