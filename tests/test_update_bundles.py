"""Model updates: a flipped byte is refused while the old model keeps inspecting, a good bundle is swapped in
between two frames, a failing self-test or a crash while loading keeps the old one, a crash loop reverts."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from edge_runtime.errors import BundleError
from edge_runtime.run import Inspector
from edge_runtime.runconfig import RunOptions
from edge_runtime.bundle_manager import BundleManager
from tests.runkit import FakeCameraFactory, FakeCapture, archive_of, make_bundle, make_keys, red_image

pytestmark = pytest.mark.timeout(120)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    base = tmp_path_factory.mktemp("update")
    keys = make_keys(base)
    v1 = make_bundle(base, keys, "1.0.0")
    v2 = make_bundle(base, keys, "1.0.1", parent="1.0.0")
    wrong = {"schema": "defectkit.golden/1", "detections": [{"class_id": 1, "score": 0.95, "box": [1, 2, 3, 4]}]}
    v3 = make_bundle(base, keys, "1.0.2", parent="1.0.1", expected_override=wrong)
    return {"base": base, "keys": keys, "v1": v1, "v2": v2, "v3": v3}


def _flipped(src, dst, offset_fraction=0.5, position=None):
    data = bytearray(src.read_bytes())
    data[int(len(data) * offset_fraction) if position is None else position] ^= 0x01
    dst.write_bytes(bytes(data))
    os.utime(dst, (time.time() - 5, time.time() - 5))  # complete: no settle wait
    return dst


def _drop(src, inbox, name):
    tmp = inbox / f".{name}.part"
    shutil.copyfile(src, tmp)
    os.utime(tmp, (time.time() - 5, time.time() - 5))
    os.replace(tmp, inbox / name)


def test_any_flipped_byte_of_the_archive_is_refused(kit, tmp_path):
    manager = BundleManager(tmp_path / "state", kit["keys"].public)
    archive = archive_of(kit["v2"])
    size = archive.stat().st_size
    refused = 0
    # every position past the gzip header (timestamp, original file name: no content) in 40 steps, up to the
    # CRC and length at the very end
    data = archive.read_bytes()
    start = data.index(b"\0", 10) + 1 if data[3] & 0x08 else 10
    positions = list(range(start, size, max(1, (size - start) // 40))) + [size - 1]
    for i, pos in enumerate(positions):
        bad = _flipped(archive, tmp_path / f"bad{i}.tar.gz", position=pos)
        with pytest.raises(BundleError) as err:
            manager.install(bad)
        refused += 1
        assert "refused" in str(err.value) or "damaged" in str(err.value), str(err.value)
    assert refused >= 40 and list((tmp_path / "state" / "bundles").iterdir()) == []  # nothing half-installed


def test_flipped_byte_refused_and_the_old_model_keeps_running_then_a_good_update_swaps(kit, tmp_path):
    frame = red_image(250, 3)
    camera = FakeCameraFactory([FakeCapture(generator=lambda: frame)])  # a fake camera: no camera here
    opts = RunOptions(bundle=kit["v1"], public_key=kit["keys"].public, source="0", device_id="box-1",
                      out_dir=tmp_path / "out", metrics_port=-1, capture_factory=camera, update_poll_s=0.05,
                      confirm_after_s=0.0, confirm_after_frames=10_000)
    ins = Inspector(opts)
    inbox = opts.state_dir / "inbox"
    marks = {}

    def operator():  # drops bundles into the inbox while the line runs
        def wait(pred, timeout=30):
            end = time.monotonic() + timeout
            while not pred() and time.monotonic() < end:
                time.sleep(0.01)
            return pred()

        wait(lambda: ins.summary.frames > 50)
        bad_dir = tmp_path / "1.0.1-dir"
        shutil.copytree(kit["v2"], bad_dir)
        model = bad_dir / "models" / "model.onnx"
        os.chmod(model, 0o644)
        _flipped(model, model, 0.3)
        shutil.copytree(bad_dir, inbox / "1.0.1-dir")
        os.utime(inbox / "1.0.1-dir", (time.time() - 5, time.time() - 5))
        marks["bad_dropped"] = ins.summary.frames
        marks["rejected"] = wait(lambda: (inbox / "rejected" / "1.0.1-dir.reason.txt").exists())
        marks["after_reject"] = ins.summary.frames
        wait(lambda: ins.summary.frames > marks["after_reject"] + 50)
        _drop(archive_of(kit["v2"]), inbox, "1.0.1.tar.gz")
        marks["swapped"] = wait(lambda: ins.summary.swaps == 1)
        marks["at_swap"] = ins.summary.frames
        wait(lambda: ins.summary.frames > marks["at_swap"] + 50)
        ins.stop()

    t = threading.Thread(target=operator)
    t.start()
    summary = ins.run()
    t.join(10)
    assert marks["rejected"] and marks["swapped"] and summary.swaps == 1
    reason = (inbox / "rejected" / "1.0.1-dir.reason.txt").read_text()
    assert "file models/model.onnx does not match its sha256" in reason and "refused" in reason
    (jsonl,) = (tmp_path / "out" / "predictions").glob("*.jsonl")
    versions = [json.loads(x)["bundle_version"] for x in jsonl.read_text().splitlines()]
    assert len(versions) == summary.frames
    switch = versions.index("1.0.1")
    assert set(versions[:switch]) == {"1.0.0"} and set(versions[switch:]) == {"1.0.1"}  # one swap, between frames
    assert switch > marks["after_reject"] + 50  # the old model kept inspecting through the refused update
    state = json.loads((opts.state_dir / "state.json").read_text())
    assert (state["current"], state["previous"], state["probation"]) == ("1.0.1", "1.0.0", True)
    assert [e["kind"] for e in state["events"]] == ["installed", "refused", "swapped"]
    import sqlite3

    with sqlite3.connect(str(opts.state_dir / "spool.db")) as conn:
        reports = [json.loads(r[0]) for r in conn.execute("SELECT payload FROM items WHERE kind='report' ORDER BY id")]
    closing_old = [r for r in reports if r["bundle_version"] == "1.0.0"]
    assert closing_old and "refused" in closing_old[-1]["health"]["update_event"]
    assert sum(r["counts"]["frames"] for r in closing_old) == switch  # the old window closed at the swap
    assert reports[-1]["bundle_version"] == "1.0.1"


def test_failing_self_test_keeps_the_old_bundle(kit, tmp_path):
    manager = BundleManager(tmp_path / "state", kit["keys"].public)
    first = manager.start(kit["v1"])
    assert first.version == "1.0.0" and first.selftest.ok
    _drop(archive_of(kit["v3"]), manager.inbox, "1.0.2.tar.gz")
    manager.poll()
    manager.wait_idle()
    assert manager.take_ready() is None
    reason = (manager.inbox / "rejected" / "1.0.2.tar.gz.reason.txt").read_text()
    assert "self-test of bundle 1.0.2: 0/2 golden checks passed on onnxruntime:model.onnx" in reason
    assert "expected class 1 score 0.950 at [1.0, 2.0, 3.0, 4.0] is missing" in reason
    assert manager.state.current == "1.0.0" and not (manager.bundles / "1.0.2").exists()


def test_a_crash_while_loading_a_candidate_rejects_it_at_the_next_start(kit, tmp_path):
    manager = BundleManager(tmp_path / "state", kit["keys"].public)
    manager.start(kit["v1"])
    _drop(archive_of(kit["v2"]), manager.inbox, "1.0.1.tar.gz")
    manager.state.preparing = "1.0.1.tar.gz"  # what _prepare_inbox records before loading; then the process died
    manager.state.save(manager.state_path)
    again = BundleManager(tmp_path / "state", kit["keys"].public).start(None)
    assert again.version == "1.0.0"
    reason = (tmp_path / "state" / "inbox" / "rejected" / "1.0.1.tar.gz.reason.txt").read_text()
    assert "the runtime died while loading this bundle" in reason


def test_a_tampered_installed_bundle_falls_back_to_the_previous_one(kit, tmp_path):
    manager = BundleManager(tmp_path / "state", kit["keys"].public)
    manager.start(kit["v1"])
    manager.commit(manager.prepare(archive_of(kit["v2"])))
    manager.clean_exit()
    model = tmp_path / "state" / "bundles" / "1.0.1" / "models" / "model.onnx"
    os.chmod(model, 0o644)
    _flipped(model, model, 0.6)
    restarted = BundleManager(tmp_path / "state", kit["keys"].public)
    loaded = restarted.start(None)
    assert loaded.version == "1.0.0"
    kinds = [(e["kind"], e["version"]) for e in restarted.state.events]
    assert kinds[-2:] == [("failed", "1.0.1"), ("reverted", "1.0.1")]
    assert "does not match its sha256" in restarted.state.events[-2]["detail"]
    assert restarted.state.bad == ["1.0.1"]
    with pytest.raises(BundleError, match="was reverted after a crash loop on this box: refused"):
        restarted.install(archive_of(kit["v2"]))


def _start_cli(kit, tmp_path, bundle, port):
    (tmp_path / "watch").mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "edge_runtime", "run", "--bundle", str(bundle), "--public-key", str(kit["keys"].public),
           "--source", str(tmp_path / "watch"), "--watch", "--device-id", "box-1", "--out", str(tmp_path / "out"),
           "--metrics-port", str(port)]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_running(proc, port, timeout=30):
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                return json.loads(resp.read())
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"runtime did not come up: {proc.poll()} {proc.stderr.read() if proc.poll() is not None else ''}")


def test_a_crash_loop_after_a_swap_reverts_to_the_previous_bundle(kit, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _start_cli(kit, tmp_path, kit["v1"], port)  # the factory bundle, installed and confirmed
    assert _wait_running(proc, port)["bundle"]["version"] == "1.0.0"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    proc.communicate()
    for attempt in range(3):  # the new bundle from the command line crashes the box three times (SIGKILL)
        proc = _start_cli(kit, tmp_path, kit["v2"], port)
        assert _wait_running(proc, port)["bundle"]["version"] == "1.0.1", attempt
        proc.kill()
        proc.communicate()
    proc = _start_cli(kit, tmp_path, kit["v2"], port)
    try:
        health = _wait_running(proc, port)
        assert health["bundle"]["version"] == "1.0.0"
        assert "reverted 1.0.1: crashed 3 times after the swap: back to 1.0.0" in health["update_event"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    state = json.loads((tmp_path / "out" / "state" / "state.json").read_text())
    assert (state["current"], state["bad"], state["last_exit"]) == ("1.0.0", ["1.0.1"], "clean")
