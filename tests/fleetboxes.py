"""Helpers for the fleet tests that run real processes (no tests here): the collector as ``python -m fleet.collector
serve``, edge boxes as ``python -m edge_runtime run`` on watched folders fed by a thread, the ``defectkit`` CLI, and
signed bundle variants of a :func:`tests.runkit.make_bundle` seed for other lines and versions.

Waits are on conditions (a process printing its URL, a state file naming a version, a store row); the bounds
only turn a hang into a failure.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def wait_for(cond: Callable, what: str, timeout: float = 120.0, every: float = 0.05):
    """Poll ``cond`` until it returns something true (returned); the bound turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, check: bool = True, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """``defectkit ARGS`` in a subprocess (the installed entry point of this interpreter's environment)."""
    exe = Path(PY).parent / "defectkit"
    cmd = [str(exe)] if exe.exists() else [PY, "-m", "defectkit"]
    res = subprocess.run(cmd + [str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"defectkit {' '.join(map(str, args))} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res


def enroll(db: Path, line: str, device: str, token_dir: Path) -> Path:
    """``defectkit fleet enroll``; the printed token goes into ``token_dir/<device>.token`` (mode 600)."""
    out = cli("fleet", "enroll", "--line", line, "--device", device, "--db", db).stdout
    m = re.search(r"token \(shown once[^)]*\): (\S+)", out)
    assert m, out
    token_dir.mkdir(parents=True, exist_ok=True)
    path = token_dir / f"{device}.token"
    path.write_text(m.group(1) + "\n")
    path.chmod(0o600)
    return path


class Proc:
    """A subprocess with stdout/stderr in files; :meth:`stop` sends SIGTERM and waits (then kills)."""

    def __init__(self, cmd: Sequence[str], log_base: Path, env: Optional[dict] = None) -> None:
        log_base.parent.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = log_base.with_suffix(".out"), log_base.with_suffix(".err")
        self._out, self._err = open(self.out_path, "wb"), open(self.err_path, "wb")
        self.cmd = [str(c) for c in cmd]
        self.p = subprocess.Popen(self.cmd, cwd=ROOT, stdout=self._out, stderr=self._err,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    def text(self) -> str:
        return self.out_path.read_text(errors="replace") + self.err_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, timeout: float = 60.0) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)
        self._out.close()
        self._err.close()
        return self.p.returncode


def start_collector(args: Sequence, log_base: Path, timeout: float = 60.0) -> tuple[Proc, str]:
    """``python -m fleet.collector serve --port 0 ARGS``; returns the process and the URL it printed."""
    proc = Proc([PY, "-m", "fleet.collector", "serve", "--port", "0", *args], log_base)

    def url():
        if not proc.alive():
            raise AssertionError(f"collector exited {proc.p.returncode}:\n{proc.text()}")
        m = re.search(r"collector listening on (\S+)", proc.out_path.read_text(errors="replace"))
        return m and m.group(1)

    return proc, wait_for(url, "the collector's URL", timeout)


class BoxProc:
    """``python -m edge_runtime run`` on a watched folder (ONNX Runtime, one thread), /healthz on a free port."""

    def __init__(self, base: Path, device: str, bundle: Path, public_key: Path, *, collector: Optional[str] = None,
                 token_file: Optional[Path] = None, targets_key: Optional[Path] = None, extra: Sequence = (),
                 report_interval: float = 1.0, update_poll: float = 0.5) -> None:
        self.device, self.base = device, base / device
        self.source = self.base / "camera"
        self.source.mkdir(parents=True, exist_ok=True)
        self.out = self.base / "out"
        self.state_dir = self.out / "state"
        self.port = free_port()
        cmd = [PY, "-m", "edge_runtime", "run", "--bundle", bundle, "--public-key", public_key,
               "--source", self.source, "--watch", "--watch-after", "delete", "--settle-ms", "30",
               "--device-id", device, "--out", self.out, "--backend", "onnxruntime", "--threads", "1",
               "--metrics-port", self.port, "--report-interval", report_interval, "--update-poll", update_poll,
               "--no-ng-images"]
        if collector:
            cmd += ["--collector", collector, "--token-file", token_file]
        if targets_key:
            cmd += ["--targets-public-key", targets_key]
        self.proc = Proc(cmd + list(extra), self.base / "box")

    def health(self) -> Optional[dict]:
        if not self.proc.alive():
            raise AssertionError(f"box {self.device} exited {self.proc.p.returncode}:\n{self.proc.text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:  # 503 while stalled / starting: still a JSON body
            return json.loads(exc.read() or b"{}")
        except OSError:
            return None

    def running(self) -> Optional[str]:
        """The bundle version /healthz says the box inspects with (None before it serves)."""
        h = self.health()
        return (h or {}).get("bundle", {}).get("version")

    def state(self) -> dict:
        try:
            return json.loads((self.state_dir / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def events(self, kind: Optional[str] = None) -> list:
        return [e for e in self.state().get("events", []) if kind is None or e["kind"] == kind]

    def stop(self) -> int:
        return self.proc.stop()


class Feeder:
    """Writes frames into each box's watched folder (write to a temporary name, then rename: a camera's writer)."""

    def __init__(self, folders: Sequence[Path], frames: Sequence[bytes], per_second: float = 8.0) -> None:
        self.folders, self.frames, self.period = list(folders), list(frames), 1.0 / per_second
        self.written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="frame-feeder", daemon=True)

    def start(self) -> "Feeder":
        self._thread.start()
        return self

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.period):
            for k, folder in enumerate(self.folders):
                if len(os.listdir(folder)) > 20:  # the box is not keeping up (starting, loading): do not pile up
                    continue
                data = self.frames[(n + 7 * k) % len(self.frames)]
                tmp = folder / f".f{n:07d}.png.part"
                tmp.write_bytes(data)
                os.replace(tmp, folder / f"f{n:07d}.png")
                self.written += 1
            n += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def png_frames(images) -> list[bytes]:
    import cv2

    out = []
    for img in images:
        ok, buf = cv2.imencode(".png", img)
        assert ok
        out.append(buf.tobytes())
    return out


def variant(src: Path, root: Path, line: str, version: str, private_key: Path, parent: Optional[str] = None,
            edit: Optional[Callable[[Path, dict], None]] = None) -> Path:
    """A copy of bundle folder ``src`` as ``line`` ``version`` (``parent``), signed again with the line's key, with
    its ``.tar.gz`` beside it; ``edit(folder, manifest_dict)`` may change files and the manifest before signing."""
    from compress.keys import load_private_key
    from edge_runtime.bundle import MANIFEST, SIGNATURE, signature_document

    dest = root / line / version
    shutil.copytree(src, dest)
    for p in [dest, *dest.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    manifest = json.loads((dest / MANIFEST).read_text())
    manifest.update(line=line, version=version, parent_version=parent)
    if edit is not None:
        edit(dest, manifest)
    body = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    key = load_private_key(private_key)
    (dest / MANIFEST).write_bytes(body)
    (dest / SIGNATURE).write_bytes(signature_document(body, key.sign(body), key.public_key()))
    with tarfile.open(archive(dest), "w:gz") as tar:
        for path in sorted(dest.rglob("*")):
            tar.add(str(path), arcname=path.relative_to(dest).as_posix(), recursive=False)
    return dest


def archive(bundle_dir: Path) -> Path:
    return bundle_dir.parent / f"{bundle_dir.name}.tar.gz"


def wrong_golden(folder: Path, manifest: dict) -> None:
    """Edit for :func:`variant`: every golden image expects no detection at all (a broken export's expectations;
    the model still finds the red-channel parts), checksums updated, so the bundle verifies and its self-test fails."""
    import hashlib

    body = json.dumps({"schema": "defectkit.golden/1", "detections": []}).encode()
    for g in manifest["golden"]:
        (folder / g["expected"]["file"]).write_bytes(body)
        g["expected"]["sha256"] = hashlib.sha256(body).hexdigest()
