"""The box's update channel against a real collector on loopback (uvicorn, SQLite store, registry, enrolled devices,
signed target metadata): running boxes (the real inspection loop on a frame source) refuse a downgrade, another
line's target, expired metadata (reported as a freeze), a length over their cap, crafted archives served in place
of a signed one and an endless download, and keep inspecting with their bundle; they follow a signed update and a
signed rollback. Crafted archives dropped into the inbox by hand get the same caps and rules; nothing is written
before the signature and file list are checked. Waits are on conditions (events, counters), never on durations.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import stat
import tarfile
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from compress.keys import init_keys, load_private_key
from edge_runtime.bundle import MANIFEST, SIGNATURE, signature_document, verify_bundle
from edge_runtime.errors import BundleError
from edge_runtime.run import Inspector
from edge_runtime.runconfig import RunOptions
from edge_runtime.targets import TargetMetadata, sign_target, utc_text
from fleet import devices, registry, store
from fleet.server import CollectorThread
from fleet.settings import CollectorSettings
from tests.runkit import FakeCameraFactory, FakeCapture, make_bundle, make_keys, red_image
from tests.test_fleet_helpers import call

pytestmark = pytest.mark.timeout(300)
ADMIN = "admin-token-0123456789"
# Drift scoring off in these boxes (a window they never fill): a scored categorical drift feature carries nested
# window_shares / ref_shares maps, which the collector's report validation refuses with 422 (dead-lettered), a
# mismatch between edge_runtime/drift and fleet/validate.py outside this test's subject.
DRIFT_OFF = {"window": 1_000_000, "min_frames": 1_000_000}


def wait_for(cond, what, timeout=90.0):
    """Poll a condition (a guard deadline only turns a hang into a failure; nothing asserts on durations)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def variant(src: Path, root: Path, line: str, version: str, keys) -> Path:
    """A copy of bundle ``src`` as ``line`` ``version``, signed again with the line's key; its .tar.gz beside it."""
    dest = root / line / version
    shutil.copytree(src, dest)
    for p in [dest, *dest.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    manifest = json.loads((dest / MANIFEST).read_text())
    manifest.update(line=line, version=version)
    body = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    key = load_private_key(keys.private)
    (dest / MANIFEST).write_bytes(body)
    (dest / SIGNATURE).write_bytes(signature_document(body, key.sign(body), key.public_key()))
    with tarfile.open(archive(dest), "w:gz") as tar:
        for path in sorted(dest.rglob("*")):
            tar.add(str(path), arcname=path.relative_to(dest).as_posix(), recursive=False)
    return dest


def archive(bundle_dir: Path) -> Path:
    return bundle_dir.parent / f"{bundle_dir.name}.tar.gz"


class _Zeros(io.RawIOBase):
    def __init__(self, n):
        self.n = n

    def readable(self):
        return True

    def readinto(self, b):
        k = min(len(b), self.n)
        b[:k] = bytes(k)
        self.n -= k
        return k


def gzip_bomb(path: Path, unpacked: int = 500 * 2**20) -> Path:
    """~0.5 MB of .tar.gz that declares and decompresses to 500 MB (one member of zeros named like a model)."""
    with tarfile.open(path, "w:gz", compresslevel=9) as tar:
        info = tarfile.TarInfo("models/model.onnx")
        info.size = unpacked
        tar.addfile(info, io.BufferedReader(_Zeros(unpacked), 1 << 20))
    return path


def many_files(path: Path, n: int = 100_000, signed_from: Path | None = None) -> Path:
    """An archive of ``n`` empty files (with ``signed_from``: a real signed bundle's files first)."""
    with tarfile.open(path, "w:gz", compresslevel=6) as tar:
        if signed_from is not None:
            for p in sorted(signed_from.rglob("*")):
                tar.add(str(p), arcname=p.relative_to(signed_from).as_posix(), recursive=False)
        for i in range(n):
            tar.addfile(tarfile.TarInfo(f"pad/{i:06d}"), io.BytesIO(b""))
    return path


def unsigned(src: Path, path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for p in sorted(src.rglob("*")):
            if p.name != SIGNATURE:
                tar.add(str(p), arcname=p.relative_to(src).as_posix(), recursive=False)
    return path


def disk_bytes(root: Path, skip=()) -> int:
    """Bytes of every regular file under ``root`` (not following links), minus the subfolders in ``skip``."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in {str(root / s) for s in skip}]
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    base = tmp_path_factory.mktemp("channel")
    keys = make_keys(base)
    seed = make_bundle(base, keys, "1.0.0")  # a real ONNX detector with paddle-made golden expectations
    root = base / "lines"
    b = {(line, v): variant(seed, root, line, v, keys)
         for line, versions in {"line-a": ("1.0.0", "2.0.0", "3.0.0"), "line-b": ("1.0.0",),
                                "line-c": ("1.0.0", "2.0.0"), "line-d": ("1.0.0", "2.0.0"),
                                "line-e": ("1.0.0", "2.0.0", "3.0.0", "4.0.0"), "line-f": ("1.0.0",),
                                "line-g": ("1.0.0", "0.9.0", "2.0.0")}.items()
         for v in versions}
    tpair = init_keys(base / "targets")
    (base / "tokens.json").write_text(json.dumps({"admin": ADMIN, "devices": {}}))
    db = base / "fleet.db"
    reg = base / "fleet_registry"
    with store.session(path=db) as conn:
        first = True
        for (line, v), d in sorted(b.items()):
            if line in ("line-f", "line-g"):
                continue  # inbox-only lines
            registry.push(conn, archive=archive(d), registry_dir=reg, public_key=keys.public if first else None)
            first = False
        tokens = {dev: devices.enroll(conn, line=line, device_id=dev) for dev, line in
                  (("a1", "line-a"), ("b1", "line-b"), ("c1", "line-c"), ("d1", "line-d"), ("e1", "line-e"),
                   ("z1", "line-a"))}
    settings = CollectorSettings(db=db, port=0, tokens_file=base / "tokens.json", targets_key=tpair.private,
                                 target_expiry_s=3600, rollout_interval_s=0.2, registry_dir=reg,
                                 data_dir=base / "hard_examples")
    collector = CollectorThread(settings).start()
    yield {"base": base, "keys": keys, "b": b, "tpair": tpair, "db": db, "reg": reg, "tokens": tokens,
           "c": collector, "url": collector.url}
    collector.stop()


class Box:
    """A running box: the real inspection loop (Inspector) in a thread on a camera-like frame source."""

    def __init__(self, tmp: Path, kit, device: str, bundle: Path, *, collector: str | None = None, **kw) -> None:
        frame = red_image(250, 3)

        def grab():
            time.sleep(0.003)  # a camera's pace, not a hot loop on two shared cores
            return frame

        opts = dict(bundle=bundle, public_key=kit["keys"].public, source="0", device_id=device,
                    out_dir=tmp / device, metrics_port=-1, capture_factory=FakeCameraFactory([FakeCapture(generator=grab)]),
                    update_poll_s=0.05, confirm_after_s=0.0, confirm_after_frames=10_000, uplink_interval_s=0.1,
                    overrides={"report": {"interval_s": 0.5}, "drift": DRIFT_OFF})
        if collector:
            opts.update(collector=collector, token=kit["tokens"][device], targets_public_key=kit["tpair"].public)
        opts.update(kw)
        self.opts = RunOptions(**opts)
        self.ins = Inspector(self.opts)
        self.error: list = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.ins.summary.frames > 10 or self.error, f"box {device} inspecting")
        assert not self.error, self.error

    def _run(self):
        try:
            self.ins.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error.append(exc)

    @property
    def state_dir(self) -> Path:
        return self.opts.state_dir

    def events(self, kind=None):
        return [e for e in self.ins.manager.state.events if kind is None or e["kind"] == kind]

    def frames_go_on(self, n=30):
        start = self.ins.summary.frames
        wait_for(lambda: self.ins.summary.frames >= start + n, f"{n} more frames")

    def stop(self):
        self.ins.stop()
        self.thread.join(60)
        assert not self.thread.is_alive() and not self.error, self.error


def reports_of(kit, device):
    with store.session(path=kit["db"]) as conn:
        return store.list_reports(conn, device=device, limit=500)


def test_downgrade_refused_then_a_signed_update_and_a_signed_rollback_are_followed(kit, tmp_path):
    with store.session(path=kit["db"]) as conn:
        registry.promote(conn, line="line-a", version="1.0.0")
    box = Box(tmp_path, kit, "a1", kit["b"][("line-a", "2.0.0")], collector=kit["url"])
    try:
        wait_for(lambda: box.events("refused"), "the downgrade refused")
        (ev,) = box.events("refused")
        assert ev["version"] == "1.0.0"
        assert "version 1.0.0 is not newer than the running 2.0.0 and the metadata is not a signed rollback" in ev["detail"]
        polls = box.ins.channel.polls
        wait_for(lambda: box.ins.channel.polls >= polls + 5, "five more polls")
        box.frames_go_on()
        assert len(box.events("refused")) == 1  # once, not at every poll
        assert box.ins.model.version == "2.0.0" and box.ins.summary.swaps == 0
        assert list(box.ins.manager.downloads.iterdir()) == []  # nothing was downloaded
        got = wait_for(lambda: [r for r in reports_of(kit, "a1") if "refused 1.0.0" in r["health"].get("update_event", "")],
                       "a report carrying the refusal")
        assert got[0]["bundle_version"] == "2.0.0" and got[0]["health"]["selftest"] == "passed"

        with store.session(path=kit["db"]) as conn:
            registry.promote(conn, line="line-a", version="2.0.0")
        wait_for(lambda: box.ins.channel.status.startswith("current"), "the box sees it runs the active version")
        with store.session(path=kit["db"]) as conn:
            registry.promote(conn, line="line-a", version="3.0.0")
        wait_for(lambda: box.ins.summary.swaps == 1, "the signed update to 3.0.0")
        assert box.ins.model.version == "3.0.0"
        box.frames_go_on()
        with store.session(path=kit["db"]) as conn:
            registry.rollback(conn, line="line-a", to="2.0.0")
        wait_for(lambda: box.ins.summary.swaps == 2, "the signed rollback to 2.0.0")
        assert box.ins.model.version == "2.0.0"
        st = box.ins.manager.state
        assert (st.current, st.previous) == ("2.0.0", "3.0.0")
        verify_bundle(box.state_dir / "bundles" / "2.0.0", kit["keys"].public)
        box.frames_go_on()
    finally:
        box.stop()


def test_another_lines_target_is_refused_and_a_wrong_line_flag_stops_the_start(kit, tmp_path):
    with store.session(path=kit["db"]) as conn:
        registry.promote(conn, line="line-b", version="1.0.0")
    # b1 is enrolled on line-b, the box runs line-c's bundle: the server signs line-b metadata for it
    box = Box(tmp_path, kit, "b1", kit["b"][("line-c", "1.0.0")], collector=kit["url"])
    try:
        wait_for(lambda: box.events("refused"), "another line's target refused")
        polls = box.ins.channel.polls
        wait_for(lambda: box.ins.channel.polls >= polls + 5, "five more polls")
        (ev,) = box.events("refused")
        assert "it is for line 'line-b', this box runs line 'line-c'" in ev["detail"]
        box.frames_go_on()
        assert box.ins.model.version == "1.0.0" and box.ins.model.manifest.line == "line-c"
        assert box.ins.summary.swaps == 0 and list(box.ins.manager.downloads.iterdir()) == []
    finally:
        box.stop()
    opts = RunOptions(bundle=kit["b"][("line-a", "1.0.0")], public_key=kit["keys"].public, source="0", device_id="x",
                      out_dir=tmp_path / "x", metrics_port=-1, line="line-b",
                      capture_factory=FakeCameraFactory([FakeCapture(generator=lambda: red_image(250, 3))]))
    with pytest.raises(BundleError, match="is for line 'line-a', this box runs line 'line-b': refused"):
        Inspector(opts).run()


class _Replay(BaseHTTPRequestHandler):
    """A frozen / replaying server in front of the real collector: the target route answers a captured document,
    every other request goes through to the collector."""

    doc: bytes = b""
    upstream: str = ""
    protocol_version = "HTTP/1.1"

    def _forward(self, method):
        import http.client
        from urllib.parse import urlsplit

        if method == "GET" and self.path.endswith("/target"):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(self.doc)))
            self.end_headers()
            self.wfile.write(self.doc)
            return
        u = urlsplit(self.upstream)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else None
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=20)
        try:
            conn.request(method, self.path, body=body, headers={k: v for k, v in self.headers.items()
                                                                 if k.lower() not in ("host", "connection")})
            r = conn.getresponse()
            data = r.read()
        finally:
            conn.close()
        self.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("content-length", "connection", "transfer-encoding", "date", "server"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self._forward("GET")

    def do_POST(self):  # noqa: N802
        self._forward("POST")

    def log_message(self, *args):
        pass


def _serve(handler):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_expired_metadata_is_refused_and_reported_as_a_freeze(kit, tmp_path):
    with store.session(path=kit["db"]) as conn:
        registry.promote(conn, line="line-c", version="2.0.0")
    # a second collector process on the same store issues metadata that expires after 1 s; captured, then replayed
    s = kit["c"].settings
    short = CollectorSettings(db=kit["db"], port=0, tokens_file=s.tokens_file, targets_key=kit["tpair"].private,
                              target_expiry_s=1, registry_dir=kit["reg"], data_dir=s.data_dir)
    c2 = CollectorThread(short).start()
    try:
        st, doc, _ = call(c2.url, "GET", "/api/v1/devices/c1/target", token=kit["tokens"]["c1"])
    finally:
        c2.stop()
    assert st == 200 and doc["signed"]["version"] == "2.0.0"
    expires = datetime.fromisoformat(doc["signed"]["expires"][:-1] + "+00:00")
    wait_for(lambda: datetime.now(timezone.utc) > expires, "the captured metadata to expire")
    proxy = _serve(type("R", (_Replay,), {"doc": json.dumps(doc).encode(), "upstream": kit["url"]}))
    box = Box(tmp_path, kit, "c1", kit["b"][("line-c", "1.0.0")], collector=f"http://127.0.0.1:{proxy.server_port}")
    try:
        wait_for(lambda: box.events("freeze"), "the freeze recorded")
        polls = box.ins.channel.polls
        wait_for(lambda: box.ins.channel.polls >= polls + 5, "five more polls")
        (ev,) = box.events("freeze")
        assert ev["version"] == "2.0.0" and f"expired at {doc['signed']['expires']}" in ev["detail"]
        assert "the fleet server may be frozen or replaying old metadata" in ev["detail"]
        assert box.ins.channel.status.startswith("freeze: target metadata refused: expired at")
        box.frames_go_on()
        assert box.ins.model.version == "1.0.0" and box.ins.summary.swaps == 0
        rep = wait_for(lambda: [r for r in reports_of(kit, "c1")
                                if "freeze 2.0.0" in r["health"].get("update_event", "")
                                and r["health"].get("update_channel", "").startswith("freeze")],
                       "a report at the collector saying freeze")
        assert rep[0]["bundle_version"] == "1.0.0"
        assert list(box.ins.manager.downloads.iterdir()) == []
    finally:
        box.stop()
        proxy.shutdown()
        proxy.server_close()


def test_a_signed_length_over_the_boxs_cap_is_refused_before_any_download(kit, tmp_path):
    with store.session(path=kit["db"]) as conn:
        registry.promote(conn, line="line-d", version="2.0.0")
        length = registry.get_version(conn, line="line-d", version="2.0.0")["length"]
    cap_mb = (length - 1) / 2**20  # one byte less than the signed length
    box = Box(tmp_path, kit, "d1", kit["b"][("line-d", "1.0.0")], collector=kit["url"], max_bundle_mb=cap_mb)
    try:
        wait_for(lambda: box.events("refused"), "the length refused")
        (ev,) = box.events("refused")
        assert f"length {length} bytes is outside 1..{length - 1}" in ev["detail"]
        # the event is logged inside the poll; the poll's result is recorded when it returns
        last = wait_for(lambda: box.ins.channel.last, "the refusing poll's result")
        assert last.outcome == "refused" and last.downloaded == 0 and list(box.ins.manager.downloads.iterdir()) == []
        box.frames_go_on()
        assert box.ins.model.version == "1.0.0" and box.ins.summary.swaps == 0
    finally:
        box.stop()


def _replace_stored(kit, line, version, data: bytes) -> int:
    """The collector's stored archive of ``line`` ``version`` overwritten (a compromised store or mirror); returns
    the signed length."""
    with store.session(path=kit["db"]) as conn:
        v = registry.get_version(conn, line=line, version=version)
    path = Path(v["path"])
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    path.write_bytes(data)
    return int(v["length"])


def test_crafted_archives_served_for_a_signed_target_never_write_more_than_the_signed_length(kit, tmp_path):
    work = tmp_path / "crafted"
    work.mkdir()
    seed = kit["b"][("line-e", "1.0.0")]
    crafted = {"2.0.0": gzip_bomb(work / "bomb.tar.gz"), "3.0.0": many_files(work / "many.tar.gz"),
               "4.0.0": unsigned(kit["b"][("line-e", "4.0.0")], work / "unsigned.tar.gz")}
    sizes = {v: p.stat().st_size for v, p in crafted.items()}
    assert 0.4e6 < sizes["2.0.0"] < 0.6e6  # the 0.5 MB bomb
    box = Box(tmp_path, kit, "e1", seed, collector=kit["url"])
    figures = {}
    try:
        for version, path in crafted.items():
            length = _replace_stored(kit, "line-e", version, path.read_bytes())
            before = disk_bytes(box.state_dir, skip=("spool.db", "spool.db-wal"))
            read_before = box.ins.channel.bytes_downloaded
            with store.session(path=kit["db"]) as conn:
                registry.promote(conn, line="line-e", version=version)
            wait_for(lambda: [e for e in box.events("refused") if e["version"] == version], f"{version} refused")
            (ev,) = [e for e in box.events("refused") if e["version"] == version]
            after = disk_bytes(box.state_dir, skip=("spool.db", "spool.db-wal"))
            figures[version] = {"crafted_bytes": sizes[version], "signed_length": length,
                                "downloaded": box.ins.channel.bytes_downloaded - read_before,
                                "state_dir_growth": after - before}
            assert figures[version]["downloaded"] <= length
            assert after - before <= length, figures  # the state dir grew by events only, never past the length
            assert ("refused before reading" in ev["detail"] or "refused before opening the archive" in ev["detail"]), \
                ev["detail"]
            assert list(box.ins.manager.downloads.iterdir()) == []
            assert [d.name for d in (box.state_dir / "bundles").iterdir()] == ["1.0.0"]
            box.frames_go_on()
            assert box.ins.model.version == "1.0.0" and box.ins.summary.swaps == 0
    finally:
        box.stop()
    print("crafted archives via the channel:", json.dumps(figures))


class _Endless(BaseHTTPRequestHandler):
    """A compromised collector (it holds the targets key): valid signed metadata, then a bundle body without end."""

    doc: bytes = b""
    sent = [0]

    def do_GET(self):  # noqa: N802
        if self.path.endswith("/target"):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(self.doc)))
            self.end_headers()
            self.wfile.write(self.doc)
            return
        self.send_response(200)  # HTTP/1.0, no Content-Length: the body ends when the server closes
        self.end_headers()
        chunk = b"\0" * 65536
        try:
            while self.sent[0] < 200 * 2**20:
                self.wfile.write(chunk)
                self.sent[0] += len(chunk)
        except OSError:
            pass

    def log_message(self, *args):
        pass


def test_an_endless_download_stops_at_the_signed_length(kit, tmp_path):
    length = 300_000
    now = datetime.now(timezone.utc)
    meta = TargetMetadata(device="z1", line="line-a", version="9.0.0", sha256="ab" * 32, length=length,
                          expires=utc_text(now.replace(year=now.year + 1)), issued=utc_text(now),
                          hardware_target="onnx", rollback=False, url="/api/v1/bundles/" + "ab" * 32)
    doc = sign_target(meta, load_private_key(kit["tpair"].private))
    server = _serve(type("E", (_Endless,), {"doc": json.dumps(doc).encode(), "sent": [0]}))
    box = Box(tmp_path, kit, "z1", kit["b"][("line-a", "1.0.0")], collector=f"http://127.0.0.1:{server.server_port}")
    try:
        before = disk_bytes(box.state_dir, skip=("spool.db", "spool.db-wal"))
        wait_for(lambda: box.events("refused"), "the endless download refused")
        (ev,) = box.events("refused")
        assert f"the server sent more than the signed length of {length} bytes: download stopped at {length + 1}" \
            in ev["detail"]
        assert box.ins.channel.bytes_downloaded == length + 1  # one attempt, stopped one byte past the length
        assert disk_bytes(box.state_dir, skip=("spool.db", "spool.db-wal")) - before <= length
        assert list(box.ins.manager.downloads.iterdir()) == []
        box.frames_go_on()
        assert box.ins.model.version == "1.0.0" and box.ins.summary.swaps == 0
    finally:
        box.stop()
        server.shutdown()
        server.server_close()


def test_crafted_bundles_dropped_into_the_inbox_are_refused_before_anything_is_written(kit, tmp_path):
    work = tmp_path / "crafted"
    work.mkdir()
    g = kit["b"]
    items = {
        "bomb.tar.gz": (gzip_bomb(work / "bomb.tar.gz"), "bytes unpacked: archive refused"),
        "many.tar.gz": (many_files(work / "many.tar.gz"), "more than 4096 members: archive refused"),
        "padded.tar.gz": (many_files(work / "padded.tar.gz", n=3000, signed_from=g[("line-g", "2.0.0")]),
                          "is not listed in manifest.json: bundle refused"),
        "unsigned.tar.gz": (unsigned(g[("line-g", "2.0.0")], work / "unsigned.tar.gz"), "unsigned bundle refused"),
        "older.tar.gz": (archive(g[("line-g", "0.9.0")]), "bundle 0.9.0 is not newer than the running 1.0.0: refused"),
        "other-line.tar.gz": (archive(g[("line-a", "2.0.0")]), "is for line 'line-a', this box runs line 'line-g'"),
    }
    box = Box(tmp_path, kit, "g1", g[("line-g", "1.0.0")])
    inbox = box.ins.manager.inbox
    figures = {}
    try:
        for name, (src, why) in items.items():
            before = disk_bytes(box.state_dir, skip=("spool.db", "spool.db-wal", "inbox"))
            tmp = inbox / f".{name}.part"
            shutil.copyfile(src, tmp)
            os.utime(tmp, (time.time() - 5, time.time() - 5))
            os.replace(tmp, inbox / name)
            reason = inbox / "rejected" / f"{name}.reason.txt"
            wait_for(reason.exists, f"{name} rejected")
            after = disk_bytes(box.state_dir, skip=("spool.db", "spool.db-wal", "inbox"))
            figures[name] = {"archive_bytes": src.stat().st_size, "state_dir_growth_outside_inbox": after - before}
            assert why in reason.read_text(), (name, reason.read_text())
            assert after - before < 64 << 10, figures  # state.json's events only: no extracted byte stays or was kept
            assert [d.name for d in (box.state_dir / "bundles").iterdir()] == ["1.0.0"]
            box.frames_go_on()
            assert box.ins.model.version == "1.0.0" and box.ins.summary.swaps == 0
        drop = inbox / "2.0.0.tar.gz"
        shutil.copyfile(archive(g[("line-g", "2.0.0")]), inbox / ".2.0.0.part")
        os.utime(inbox / ".2.0.0.part", (time.time() - 5, time.time() - 5))
        os.replace(inbox / ".2.0.0.part", drop)
        wait_for(lambda: box.ins.summary.swaps == 1, "the good bundle swapped in")
        assert box.ins.model.version == "2.0.0"
    finally:
        box.stop()
    print("crafted archives via the inbox:", json.dumps(figures))


def _drop(inbox: Path, src: Path, name: str) -> None:
    shutil.copyfile(src, inbox / f".{name}.part")
    os.utime(inbox / f".{name}.part", (time.time() - 5, time.time() - 5))
    os.replace(inbox / f".{name}.part", inbox / name)


def _spooled_reports(state_dir: Path) -> list:
    import sqlite3

    with sqlite3.connect(str(state_dir / "spool.db")) as conn:
        return [json.loads(r[0]) for r in conn.execute("SELECT payload FROM items WHERE kind='report' ORDER BY id")]


def test_a_later_event_never_hides_an_earlier_failure_until_a_report_is_acknowledged(kit, tmp_path):
    """Reports only at a swap and at the stop. With the collector unreachable, a refusal followed by a swap: every
    report carries the refusal as update_event (what the rollout reads), the later events as update_event_2..;
    the events stay pending across a restart until a report carrying them is acknowledged by the collector."""
    import socket

    g = kit["b"]
    with store.session(path=kit["db"]) as conn:
        token = devices.enroll(conn, line="line-a", device_id="h1")
    kit["tokens"]["h1"] = token
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed
    kw = dict(overrides={"report": {"interval_s": 3600}, "drift": DRIFT_OFF}, token=token, targets_public_key=None)
    box = Box(tmp_path, kit, "h1", g[("line-a", "2.0.0")], collector=dead, **kw)
    inbox = box.ins.manager.inbox
    try:
        _drop(inbox, archive(g[("line-a", "1.0.0")]), "old.tar.gz")
        wait_for(lambda: (inbox / "rejected" / "old.tar.gz.reason.txt").exists(), "old rejected")
        _drop(inbox, archive(g[("line-a", "3.0.0")]), "new.tar.gz")
        wait_for(lambda: box.ins.summary.swaps == 1, "the swap")
    finally:
        box.stop()
    assert [e["kind"] for e in box.ins.manager.pending_events()] == ["installed", "refused", "swapped"]
    at_swap, at_stop = _spooled_reports(box.state_dir)  # nothing acknowledged: both still in the spool
    for rep in (at_swap, at_stop):
        assert rep["health"]["update_event"].split(" ")[1] == "refused"
        assert "not newer than the running 2.0.0" in rep["health"]["update_event"]
    assert (at_swap["bundle_version"], at_stop["bundle_version"]) == ("2.0.0", "3.0.0")
    h = at_stop["health"]
    assert " swapped 3.0.0: " in h["update_event_2"] and " installed 2.0.0: " in h["update_event_3"]
    assert h["update_events"] == 3

    # the collector is back: the old reports go out; the events stay pending until a report made with them is
    # acknowledged (the stop's report here), and a second refusal is the newest failure
    again = Box(tmp_path, kit, "h1", g[("line-a", "2.0.0")], collector=kit["url"], **kw)
    try:
        assert len(again.ins.manager.pending_events()) == 3
        _drop(inbox, archive(g[("line-a", "1.0.0")]), "old2.tar.gz")
        wait_for(lambda: (inbox / "rejected" / "old2.tar.gz.reason.txt").exists(), "old2 rejected")
        wait_for(lambda: len(reports_of(kit, "h1")) >= 2, "the spooled reports delivered")
    finally:
        again.stop()
    reps = wait_for(lambda: [r for r in reports_of(kit, "h1") if r["health"].get("update_events") == 4],
                    "the stop's report at the collector")
    h = reps[0]["health"]
    assert " refused : old2.tar.gz: " in h["update_event"] and " refused : old.tar.gz: " in h["update_event_2"]
    assert " swapped 3.0.0: " in h["update_event_3"] and " installed 2.0.0: " in h["update_event_4"]
    assert _spooled_reports(again.state_dir) == []  # all acknowledged
    third = Box(tmp_path, kit, "h1", g[("line-a", "2.0.0")], collector=kit["url"], **kw)
    try:
        assert third.ins.manager.pending_events() == []  # the acknowledgement was recorded durably
        assert third.ins.model.version == "3.0.0"
    finally:
        third.stop()
