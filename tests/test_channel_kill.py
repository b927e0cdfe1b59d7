"""``kill -9`` of a real box (``python -m edge_runtime run``) in the middle of an install, 20 times: it always comes
back on a complete bundle (the old or the new one; verify_bundle passes on the current one), never a torn one,
and no staging folder or download survives the restart.

The kill points land inside the install by construction: a dry run in this process records the install's named
points (edge_runtime.crashpoints: staging made, each file half-written, verified, renamed, directory synced,
candidate loaded, before and after the state switch); each trial picks one (seeded: every point at least once,
the rest drawn at random), starts the box with DEFECTKIT_CRASHPOINT_PAUSE at that point, drops a new version into
its inbox, waits for the box to report that it is paused there (a file), and kills it with SIGKILL.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from edge_runtime.bundle import verify_bundle
from edge_runtime.bundle_manager import BundleManager
from edge_runtime.crashpoints import PAUSE_ENV, TRACE_ENV
from tests.runkit import make_bundle, make_keys, write_images
from tests.test_channel_updates import archive, variant

pytestmark = pytest.mark.timeout(900)
ROOT = Path(__file__).resolve().parents[1]
KILLS = 20
SEED = 20261122


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp: Path, keys, bundle: Path, port: int, env_extra: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "edge_runtime", "run", "--bundle", str(bundle), "--public-key", str(keys.public),
           "--source", str(tmp / "watch"), "--watch", "--device-id", "box-k", "--out", str(tmp / "out"),
           "--metrics-port", str(port), "--update-poll", "0.05"]
    env = {k: v for k, v in os.environ.items() if k not in (TRACE_ENV, PAUSE_ENV)}
    env.update(PYTHONPATH=str(ROOT), **env_extra)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _health(proc: subprocess.Popen, port: int, timeout: float = 120) -> dict:
    """/healthz once the box inspects (a guard deadline turns a hang into a failure)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the box exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                h = json.loads(resp.read())
            if h.get("status") == "ok":  # 200: running (503 while starting)
                return h
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("the box did not come up")


def _drop(inbox: Path, src: Path, name: str) -> None:
    tmp = inbox / f".{name}.part"
    shutil.copyfile(src, tmp)
    os.utime(tmp, (time.time() - 5, time.time() - 5))
    os.replace(tmp, inbox / name)


def _check_complete(state: Path, keys, health: dict, old: str, new: str | None) -> str:
    st = json.loads((state / "state.json").read_text())
    current = st["current"]
    if current not in {old, new}:  # the crash-loop guard: 3 kills while `old` was on probation revert it (by design)
        last = st["events"][-1]
        assert (last["kind"], last["version"]) == ("reverted", old) and "crashed 3 times" in last["detail"], \
            (current, old, new, last)
    assert health["bundle"]["version"] == current
    verify_bundle(state / "bundles" / current, keys.public)  # every checksum: complete, not torn
    if st["previous"]:
        verify_bundle(state / "bundles" / st["previous"], keys.public)
    left = [p.name for p in (state / "bundles").iterdir() if p.name.startswith(".")]
    assert left == [], f"stale staging/trash left after the restart: {left}"
    assert list((state / "downloads").iterdir()) == []
    assert {p.name for p in (state / "bundles").iterdir()} <= {current, st["previous"]}
    return current


def test_kill_9_during_an_install_always_comes_back_on_a_complete_bundle(tmp_path):
    keys = make_keys(tmp_path)
    seed = make_bundle(tmp_path, keys, "1.0.0")
    versions = [f"1.0.{k}" for k in range(1, KILLS + 1)]
    candidates = {v: archive(variant(seed, tmp_path / "lines", "test-line", v, keys)) for v in versions}
    write_images(tmp_path / "watch", [40, 230] * 3)

    # the install's points, from a dry run of the same install in this process
    dry = tmp_path / "dry"
    trace = tmp_path / "dry-trace.txt"
    manager = BundleManager(dry, keys.public)
    manager.start(seed)
    os.environ[TRACE_ENV] = str(trace)
    try:
        manager.commit(manager.prepare(candidates["1.0.1"]))
    finally:
        del os.environ[TRACE_ENV]
    points = list(dict.fromkeys(trace.read_text().split()))
    assert {"install:staging", "install:verified", "install:renamed", "install:synced", "candidate:loaded",
            "commit:before-state", "commit:after-state"} <= set(points)
    assert sum(p.startswith("extract:") for p in points) >= 5, points
    rng = random.Random(SEED)
    plan = rng.sample(points, len(points)) + [rng.choice(points) for _ in range(KILLS - len(points))]
    assert len(plan) == KILLS

    port = _port()
    state = tmp_path / "out" / "state"
    proc = _start(tmp_path, keys, seed, port, {})  # the factory bundle, installed with no pause, stopped cleanly
    assert _health(proc, port)["bundle"]["version"] == "1.0.0"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    proc.stderr.close()
    current, outcomes = "1.0.0", []
    for k, (point, version) in enumerate(zip(plan, versions)):
        tr = tmp_path / f"trace-{k}.txt"
        proc = _start(tmp_path, keys, seed, port, {TRACE_ENV: str(tr), PAUSE_ENV: point})
        try:
            h = _health(proc, port)
            if outcomes:  # the restart after the previous kill: on a complete bundle, the old or the new
                current = _check_complete(state, keys, h, outcomes[-1]["old"], outcomes[-1]["new"])
                outcomes[-1]["came_back_on"] = current
            _drop(state / "inbox", candidates[version], f"{version}.tar.gz")
            paused = Path(f"{tr}.paused")
            end = time.monotonic() + 120
            while not paused.exists():
                assert proc.poll() is None, f"the box exited {proc.returncode} before {point}: {proc.stderr.read()[-2000:]}"
                assert time.monotonic() < end, f"the install never reached {point}"
                time.sleep(0.01)
            assert paused.read_text() == point
        finally:
            proc.kill()  # SIGKILL: no handler, no flush, nothing tidied up
            proc.wait(60)
            proc.stderr.close()
        outcomes.append({"kill": k + 1, "point": point, "old": current, "new": version})
    proc = _start(tmp_path, keys, seed, port, {})
    try:
        outcomes[-1]["came_back_on"] = _check_complete(state, keys, _health(proc, port), outcomes[-1]["old"],
                                                       outcomes[-1]["new"])
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        proc.stderr.close()
    on_new = sum(o["came_back_on"] == o["new"] for o in outcomes)
    on_old = sum(o["came_back_on"] == o["old"] for o in outcomes)
    reverted = KILLS - on_new - on_old
    print(f"kill -9 x{KILLS}: {on_new} came back on the new bundle, {on_old} on the old one, {reverted} on the one "
          f"before (crash-loop revert); points: {json.dumps([(o['point'], o['came_back_on']) for o in outcomes])}")
    assert on_new >= 1 and on_old >= 1  # both sides of the switch were hit
    events = json.loads((state / "state.json").read_text())["events"]
    assert any(e["kind"] == "refused" and "the runtime died while loading" in e["detail"] for e in events)
