"""Issue 10 item 5, the box's side: ``python -m edge_runtime run`` against a real HTTPS collector
(``python -m fleet.collector serve --tls-cert --tls-key``, a certificate signed by a test CA made here).

With ``--ca-file`` (that CA) the box's reports and target polls go through; without it (the system CAs, which do not
know the test CA) every connection is refused by certificate verification and nothing reaches the collector.
``http://`` to anything but loopback is refused at start unless ``--insecure-http``.
"""
from __future__ import annotations

import json
import subprocess

import pytest

from edge_runtime.errors import UserInputError
from edge_runtime.runconfig import RunOptions
from edge_runtime.uplink import Uplink, collector_tls, is_loopback_host
from fleet import store
from tests.fleetboxes import PY, ROOT, BoxProc, Feeder, archive, cli, enroll, png_frames, start_collector, wait_for
from tests.runkit import make_bundle, make_keys, red_image
from tests.test_fleet_tls import _cert

pytestmark = pytest.mark.timeout(600)
ADMIN = "admin-token-tls-0123456789"


def _reports(db, device):
    with store.session(path=db) as conn:
        return store.list_reports(conn, device=device, limit=100)


def test_box_over_https_needs_the_collectors_ca(tmp_path):
    ca_cert, ca_key, ca_crt, _ = _cert(tmp_path / "ca", "defectkit plant CA", ca=True)
    _, _, crt, key = _cert(tmp_path / "server", "127.0.0.1", issuer=(ca_cert, ca_key))  # SAN localhost, 127.0.0.1
    keys = make_keys(tmp_path)
    bundle = make_bundle(tmp_path / "seed", keys, "1.0.0")
    line = "test-line"
    db, tokens = tmp_path / "fleet.db", tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"admin": ADMIN, "devices": {}}))
    cli("keys", "init", "--dir", tmp_path / "targets")
    tkey, tpub = tmp_path / "targets" / "bundle_signing_key.pem", tmp_path / "targets" / "bundle_signing_key.pub.pem"
    cli("registry", "push", archive(bundle), "--db", db, "--public-key", keys.public)
    cli("registry", "promote", line, "1.0.0", "--db", db)
    tok = {d: enroll(db, line, d, tmp_path / "tokens") for d in ("trusting", "untrusting")}
    collector, url = start_collector(["--db", db, "--tokens", tokens, "--targets-key", tkey, "--tls-cert", crt,
                                      "--tls-key", key], tmp_path / "collector")
    assert url.startswith("https://127.0.0.1:")
    boxes = {
        "trusting": BoxProc(tmp_path / "boxes", "trusting", archive(bundle), keys.public, collector=url,
                            token_file=tok["trusting"], targets_key=tpub, extra=["--ca-file", ca_crt]),
        "untrusting": BoxProc(tmp_path / "boxes", "untrusting", archive(bundle), keys.public, collector=url,
                              token_file=tok["untrusting"], targets_key=tpub),
    }
    feeder = Feeder([b.source for b in boxes.values()], png_frames(red_image(90, i) for i in range(8)), 8.0)
    try:
        for b in boxes.values():
            wait_for(lambda: b.running() == "1.0.0", f"{b.device} inspecting", 120)
        feeder.start()
        got = wait_for(lambda: [r for r in _reports(db, "trusting") if r["counts"]["frames"] > 0
                                and r["health"].get("update_channel", "").startswith("current")],
                       "a report over https from the box that trusts the CA, after a verified target poll", 120)
        assert got[0]["bundle_version"] == "1.0.0"
        err = wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in boxes["untrusting"].proc.text()
                       and boxes["untrusting"].proc.text(), "the untrusting box's certificate refusal", 120)
        assert "uplink to https://127.0.0.1:" in err
        h = wait_for(lambda: (lambda h: h.get("update_channel", "").startswith("error")
                              and h.get("uplink_failures", 0) >= 1 and h)(  # both links tried and failed
            boxes["untrusting"].health() or {}), "the untrusting box's channel and uplink status", 120)
        assert "CERTIFICATE_VERIFY_FAILED" in h["update_channel"] and h["uplink_failures"] >= 1
        frames = boxes["untrusting"].health()["frames"]
        wait_for(lambda: boxes["untrusting"].health()["frames"] > frames + 8, "the untrusting box inspecting on", 60)
        assert _reports(db, "untrusting") == []  # nothing went over a connection it could not verify
    finally:
        feeder.stop()
        codes = [b.stop() for b in boxes.values()]
        collector.stop()
    assert codes == [0, 0], [b.proc.text()[-2000:] for b in boxes.values()]


def _run_cli(tmp_path, *flags):
    token = tmp_path / "t.token"
    token.write_text("device-token-0123456789\n")
    (tmp_path / "src").mkdir(exist_ok=True)
    cmd = [PY, "-m", "edge_runtime", "run", "--bundle", tmp_path / "missing-bundle", "--public-key",
           tmp_path / "missing.pub.pem", "--source", tmp_path / "src", "--device-id", "b1", "--token-file", token,
           "--metrics-port", "-1", "--out", tmp_path / "out", *flags]
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_plain_http_off_loopback_is_refused_at_start_unless_insecure_http(tmp_path):
    res = _run_cli(tmp_path, "--collector", "http://fleet.example:8765")
    assert res.returncode == 2, res.stderr
    assert ("collector URL 'http://fleet.example:8765' is plain HTTP to fleet.example, not loopback" in res.stderr
            and "--insecure-http" in res.stderr), res.stderr
    assert not (tmp_path / "out" / "state").exists()  # refused before anything was set up
    res = _run_cli(tmp_path, "--collector", "http://127.0.0.1:9", "--ca-file", tmp_path / "ca.pem")
    assert res.returncode == 2 and "--ca-file is for an https:// collector URL" in res.stderr, res.stderr
    res = _run_cli(tmp_path, "--collector", "https://fleet.example", "--ca-file", tmp_path / "ca.pem")
    assert res.returncode == 2 and f"--ca-file {tmp_path / 'ca.pem'} does not exist" in res.stderr, res.stderr
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    res = _run_cli(tmp_path, "--collector", "https://fleet.example", "--ca-file", tmp_path / "junk.pem")
    assert res.returncode == 2 and "cannot be loaded as PEM certificates" in res.stderr, res.stderr
    # with --insecure-http the same URL passes the check (the run then stops at the missing bundle, exit 4 or 2)
    res = _run_cli(tmp_path, "--collector", "http://fleet.example:8765", "--insecure-http")
    assert "plain HTTP" not in res.stderr and res.returncode != 0 and "missing" in res.stderr, res.stderr

    base = dict(bundle=None, public_key=tmp_path / "k.pub.pem", source=str(tmp_path), device_id="b1", token="tok")
    for ok in ("http://127.0.0.1:8765", "http://127.8.9.1:1", "http://localhost:8765", "http://[::1]:8765",
               "https://fleet.example"):
        RunOptions(collector=ok, **base)
    RunOptions(collector="http://10.0.0.5:8765", insecure_http=True, **base)
    for bad in ("http://10.0.0.5:8765", "http://fleet.example", "http://127.0.0.1.example.com"):
        with pytest.raises(UserInputError, match="not loopback"):
            RunOptions(collector=bad, **base)
    with pytest.raises(UserInputError, match="are about --collector"):
        RunOptions(collector=None, insecure_http=True, **{**base, "token": None})
    # the same rule in the uplink and the update channel themselves (callers other than run)
    with pytest.raises(UserInputError, match="not loopback"):
        Uplink("http://fleet.example:8765", "b1", "tok", spool=None)
    assert collector_tls("http://fleet.example", insecure_http=True) is None
    assert collector_tls("https://fleet.example").verify_mode.name == "CERT_REQUIRED"
    assert collector_tls("https://fleet.example").check_hostname
    assert is_loopback_host("127.0.0.1") and is_loopback_host("::1") and not is_loopback_host("fleet.example")
