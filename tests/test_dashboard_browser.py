"""The dashboard in a real browser: Debian's headless Chromium driven by selenium through chromium-driver.

A real collector process (``python -m fleet.collector serve``, SQLite) is fed real reports (the box's own
``ReportBuilder``) and real JPEG hard examples over its HTTP API by three enrolled boxes of line-a (a fourth is
enrolled and silent) and one box of line-b; line-a has an active version and a canary rollout running. The test
signs in through the login form as a person would, then checks what the browser rendered: the boxes, the SVG
charts (one polyline per series with the expected number of points, laid out with a non-empty size), the rollout
panel, the thumbnails decoded by the browser, nothing fetched from another origin, and no console error.

Screenshots: every run saves ``dashboard-login.png`` and ``dashboard-overview.png`` to the test's folder; with
``DEFECTKIT_DASHBOARD_SHOTS=docs/img`` they go to that folder instead (how the ones in docs/ were made).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.request
import uuid
from pathlib import Path

import pytest

from edge_runtime.hard_examples import SCHEMA as HE_SCHEMA
from edge_runtime.report_builder import ReportBuilder
from fleet import devices, registry, rollout, store
from tests.fleetboxes import ROOT, start_collector, wait_for
from tests.test_fleet_helpers import keys, make_archive

ADMIN = "admin-token-" + "b" * 20
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# (device, line, bundle version, reports, NG frames of 50 per report, PSI step, last report raises an alarm)
BOXES = [("press-01", "line-a", "1.0.0", 8, 3, 0.03, True),
         ("press-02", "line-a", "1.0.0", 6, 2, 0.01, False),
         ("press-03", "line-a", "1.1.0", 5, 2, 0.02, False),  # the canary
         ("weld-01", "line-b", "2.0.0", 4, 1, 0.01, False)]
SILENT = "press-04"  # enrolled on line-a, never reports
HARD_EXAMPLES = {"press-01": 9, "press-02": 5, "weld-01": 2}  # line-a: 14 -> the 12 newest are shown


def board_jpeg(seed: int, w: int = 96, h: int = 72) -> bytes:
    """A small grey board with a dark scratch: a real JPEG the collector and the browser both decode."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 150, np.uint8) + rng.integers(0, 20, (h, w, 3), dtype=np.uint8)
    x = int(rng.integers(10, w - 30))
    cv2.line(img, (x, 12), (x + 20, h - 12), (40, 40, 40), 2)
    return cv2.imencode(".jpg", img)[1].tobytes()


def post(url: str, path: str, body: dict, token: str) -> int:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status


def get(url: str, path: str) -> dict:
    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {ADMIN}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def feed(url: str, tokens: dict) -> None:
    """Reports and hard examples of every box, as the boxes' uplinks send them (one POST each)."""
    import base64

    for dev, line, version, n, ng, psi, alarm in BOXES:
        for i in range(n):
            b = ReportBuilder(device_id=dev, line=line, bundle_version=version)
            for f in range(50):
                b.record_frame(ng=f < ng + i % 2, classes=["scratch"] if f < ng + i % 2 else [], latency_ms=11.0 + i)
            last_alarm = alarm and i == n - 1
            report = b.build(drift={
                "brightness": {"state": "alarm" if last_alarm else "none", "psi": psi * (i + 1) * (4 if last_alarm else 1),
                               "ks_p": 0.4},
                "sharpness": {"state": "none", "psi": psi * (i + 1) / 2, "ks_p": 0.6}}).to_dict()
            assert post(url, "/api/v1/reports", report, tokens[dev]) == 201
    for dev, n in HARD_EXAMPLES.items():
        line = next(b[1] for b in BOXES if b[0] == dev)
        for i in range(n):
            meta = {"schema": HE_SCHEMA, "id": uuid.uuid4().hex, "device_id": dev, "line": line,
                    "bundle_version": "1.0.0", "time": "2026-11-30T10:00:00.000Z", "max_score": 0.3 + i / 40,
                    "width": 96, "height": 72,
                    "detections": [{"class": "scratch", "score": 0.3 + i / 40, "box": [10.0, 12.0, 40.0, 60.0]}]}
            he = {"meta": meta, "image_b64": base64.b64encode(board_jpeg(hash((dev, i)) % 1000)).decode()}
            assert post(url, "/api/v1/hard-examples", he, tokens[dev]) == 201


def expected_ng_points(received: list, n: int = 24) -> int:
    """How many of n equal time buckets between the first and last report hold a report (the NG chart's points)."""
    t0, t1 = min(received), max(received)
    width = max((t1 - t0) / n, 1e-9)
    return len({min(int((t - t0) / width), n - 1) for t in received})


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    base = tmp_path_factory.mktemp("dash-browser")
    db = base / "fleet.db"
    bkey, _, bpub = keys(base, "bundle")
    with store.session(path=db) as conn:
        registry.push(conn, archive=make_archive(base, bkey, version="1.0.0"), registry_dir=base / "fleet_registry",
                      public_key=bpub)
        registry.push(conn, archive=make_archive(base, bkey, version="1.1.0", parent="1.0.0"),
                      registry_dir=base / "fleet_registry")
        registry.push(conn, archive=make_archive(base, bkey, line="line-b", version="2.0.0"),
                      registry_dir=base / "fleet_registry")
        registry.promote(conn, line="line-a", version="1.0.0")
        registry.promote(conn, line="line-b", version="2.0.0")
        tokens = {dev: devices.enroll(conn, line=line, device_id=dev) for dev, line, *_ in BOXES}
        devices.enroll(conn, line="line-a", device_id=SILENT)
        rollout.start(conn, line="line-a", version="1.1.0", window_s=1800, devices=["press-03"])
    (base / "tokens.json").write_text(json.dumps({"admin": ADMIN, "devices": {"spare-01": "spare-token-" + "c" * 16}}))
    # one rollout evaluation at start (no reports yet: wait), none during the test: the panel's state is fixed
    proc, url = start_collector(["--db", db, "--tokens", base / "tokens.json", "--rollout-interval", "1d",
                                 "--rate", "1000", "--burst", "1000"], base / "collector")
    try:
        feed(url, tokens)
        yield url, base
    finally:
        assert proc.stop() == 0, proc.text()


@pytest.fixture(scope="module")
def browser():
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not Path(exe).exists():  # a missing browser is a failure with the fix, never a skip
            raise AssertionError(f"{exe} is missing: bash scripts/host_deps.sh installs chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="defectkit-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--window-size=1280,900", f"--user-data-dir={profile}"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def shots_dir(tmp_path: Path) -> Path:
    target = os.environ.get("DEFECTKIT_DASHBOARD_SHOTS")
    out = (ROOT / target) if target and not Path(target).is_absolute() else Path(target or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def full_page_screenshot(driver, path: Path) -> None:
    """The whole page, not only the first screenful: the window is made as tall as the document first."""
    height = driver.execute_script("return Math.ceil(document.documentElement.scrollHeight)")
    driver.set_window_size(1280, max(600, min(int(height) + 20, 6000)))
    assert driver.get_screenshot_as_file(str(path)), path
    assert path.stat().st_size > 5000  # a real picture, not an empty canvas


def console_errors(driver) -> list:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def foreign_resources(driver, url: str) -> list:
    names = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    return [n for n in names if not n.startswith(url) and not n.startswith("data:")]


CHART_JS = """
return Array.from(document.querySelectorAll('section.line')).map(sec => ({
  line: sec.id,
  charts: Array.from(sec.querySelectorAll('svg.chart')).map(svg => {
    const r = svg.getBoundingClientRect();
    return {title: svg.querySelector('title').textContent, width: r.width, height: r.height,
            series: Array.from(svg.querySelectorAll('polyline.series')).map(p => ({
              name: p.dataset.series, declared: Number(p.dataset.points), drawn: p.points.numberOfItems,
              bbox: [p.getBBox().width, p.getBBox().height]})),
            plot: (b => [b.x, b.y, b.width, b.height])(svg.querySelector('rect.plot').getBBox()),
            legend: Array.from(svg.querySelectorAll('text.legend')).map(t => t.textContent)};
  }),
  boxes: Object.fromEntries(Array.from(sec.querySelectorAll('tr[data-device]')).map(tr =>
    [tr.dataset.device, {bundle: tr.cells[2].textContent, health: tr.cells[3].className}])),
  thumbs: Array.from(sec.querySelectorAll('.thumbs img')).map(i => [i.complete, i.naturalWidth, i.naturalHeight]),
  rollout: (sec.querySelector('p.rollout') || {}).textContent || '',
  decisions: Array.from(sec.querySelectorAll('ul.decisions li')).map(li => li.textContent),
  alarms: Array.from(sec.querySelectorAll('li.alarm')).map(li => li.textContent),
}));
"""


def test_dashboard_in_headless_chromium(collector, browser, tmp_path):
    url, _ = collector
    out = shots_dir(tmp_path)
    from selenium.webdriver.common.by import By

    # the login page: the only thing shown without the admin token
    browser.get(url + "/")
    assert browser.find_elements(By.CSS_SELECTOR, "form.login input[type=password]")
    assert not browser.find_elements(By.CSS_SELECTOR, "section.line")
    full_page_screenshot(browser, out / "dashboard-login.png")
    assert console_errors(browser) == []

    # a wrong token is refused on the page itself; the admin token signs in (session cookie) and lands on /
    browser.find_element(By.NAME, "token").send_keys("not-the-admin-token-000")
    browser.find_element(By.CSS_SELECTOR, "form.login button[type=submit]").click()
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "form.login p.error"), "the login error", 60)
    errors = console_errors(browser)  # the browser logs the 401 answer of the form post: expected, and the only one
    assert len(errors) == 1 and "401" in errors[0]["message"] and "/login" in errors[0]["message"], errors
    browser.find_element(By.NAME, "token").send_keys(ADMIN)
    browser.find_element(By.CSS_SELECTOR, "form.login button[type=submit]").click()
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "section.line"), "the dashboard after sign-in", 60)
    assert browser.current_url.rstrip("/") == url
    cookie = browser.get_cookie("defectkit_session")
    assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    wait_for(lambda: browser.execute_script(
        "return Array.from(document.images).every(i => i.complete)"), "the thumbnails to load", 60)

    received = {}
    for r in get(url, "/api/v1/reports?limit=1000")["reports"]:
        received.setdefault(r["line"], []).append(r["received_at"])
    page = {s["line"]: s for s in browser.execute_script(CHART_JS)}
    assert sorted(page) == ["line-line-a", "line-line-b"]
    a, b = page["line-line-a"], page["line-line-b"]

    # the boxes: versions as reported, health from the newest report, the silent box listed
    assert a["boxes"] == {"press-01": {"bundle": "1.0.0", "health": "health-alarm"},
                          "press-02": {"bundle": "1.0.0", "health": "health-ok"},
                          "press-03": {"bundle": "1.1.0", "health": "health-ok"},
                          "press-04": {"bundle": "", "health": "health-silent"}}
    assert b["boxes"] == {"weld-01": {"bundle": "2.0.0", "health": "health-ok"}}

    # the charts: NG rate (one series) and drift PSI (one series per feature), drawn with data and a real size
    for sec, line in ((a, "line-a"), (b, "line-b")):
        n_reports = len(received[line])
        assert [c["title"] for c in sec["charts"]] == [f"{line}: NG rate over time",
                                                      f"{line}: drift (PSI) per feature, worst box"]
        ng, drift = sec["charts"]
        assert [s["name"] for s in ng["series"]] == ["NG rate"] and ng["legend"] == ["NG rate"]
        assert ng["series"][0]["drawn"] == ng["series"][0]["declared"] == expected_ng_points(received[line])
        assert [s["name"] for s in drift["series"]] == ["brightness", "sharpness"]
        assert drift["legend"] == ["brightness", "sharpness"]
        # every report carries both features: the same time buckets as the NG chart, one point each
        assert all(s["drawn"] == s["declared"] == ng["series"][0]["drawn"] for s in drift["series"])
        assert 1 <= ng["series"][0]["drawn"] <= min(24, n_reports)
        for chart in (ng, drift):
            assert chart["width"] >= 500 and chart["height"] >= 200
            for s in chart["series"]:  # the line has extent inside the plot area
                assert s["bbox"][0] > 0 and 0 < s["bbox"][0] <= chart["plot"][2] + 1
    assert sum(n for d, _, _, n, *_ in BOXES if d.startswith("press")) == len(received["line-a"])

    # alarms, the rollout panel, the hard-example thumbnails decoded by the browser
    assert len(a["alarms"]) == 1 and "press-01 (1.0.0): brightness" in a["alarms"][0] and b["alarms"] == []
    assert a["rollout"].startswith("1.1.0 from 1.0.0: running") and "canary press-03" in a["rollout"]
    assert any("start: canary press-03 of 4 device(s); stable on 1.0.0" in d for d in a["decisions"])
    assert b["rollout"] == ""
    assert a["thumbs"] == [[True, 96, 72]] * 12 and b["thumbs"] == [[True, 96, 72]] * 2

    # offline factory network: nothing came from another origin; and the browser logged no error
    assert foreign_resources(browser, url) == []
    assert browser.execute_script("return document.querySelectorAll('script').length") == 0
    full_page_screenshot(browser, out / "dashboard-overview.png")
    assert console_errors(browser) == []

    # sign out: the session cookie is gone and the page is the login form again
    browser.find_element(By.LINK_TEXT, "log out").click()
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "form.login"), "the login form after log out", 60)
    assert browser.get_cookie("defectkit_session") is None
    assert console_errors(browser) == []
