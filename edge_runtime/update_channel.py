"""The box's side of the fleet's update channel (TUF-style; contract: docs/fleet.md, ``defectkit.target/1``).

Every poll: ``GET <collector>/api/v1/devices/<id>/target`` with the device token, then
:func:`edge_runtime.targets.verify_target` with the *targets* public key (signature, this device, this box's
line, not expired, a length within the box's cap), then the box's own rules before any download: the
hardware target is this box's, the version is greater than the running one unless the registry signed a
rollback, it is not a version reverted here nor an archive refused before. Then the archive at ``url`` is
downloaded reading at most ``length + 1`` bytes (more than the signed length: refused, the rest never read),
its sha256 compared with the signed one, and only then handed to the bundle manager, which checks the
archive's caps and signature before writing anything (:func:`edge_runtime.bundle.safe_extract`), verifies
every checksum, self-tests it beside the running model and swaps between two frames.

Whatever is refused becomes an event that goes into the reports (``health.update_event``: the fleet's rollout
reads ``refused``); expired metadata is a ``freeze`` event and ``health.update_channel`` says so while it lasts.
The same refusal is recorded once, not at every poll. Nothing here raises: the inspection loop never stops.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import quote, urlsplit

from edge_runtime.bundle_manager import BundleManager, is_newer
from edge_runtime.errors import UserInputError
from edge_runtime.targets import DEFAULT_MAX_LENGTH, HARDWARE_TARGETS, TargetError, TargetMetadata, verify_target

log = logging.getLogger("defectkit.update_channel")

MAX_METADATA_BYTES = 64 << 10  # a target document is a few hundred bytes
# Total deadlines (not only per-read timeouts: a server trickling a byte every 0.5 s never trips those): the
# metadata request gets ``timeout`` seconds in all; a download ``timeout`` plus its signed length at this rate.
MIN_DOWNLOAD_BYTES_PER_S = 256 << 10


@dataclass
class PollResult:
    """What one poll did: ``outcome`` is one of none | current | submitted | busy | refused | freeze | error."""

    outcome: str
    detail: str = ""
    version: Optional[str] = None
    downloaded: int = 0  # bytes of the archive read from the network (and written to downloads/)


class UpdateChannel:
    """``UpdateChannel(collector_url, device_id, token, targets_key, manager, hardware_target=...)``; call
    :meth:`poll` from a thread every few seconds."""

    def __init__(self, base_url: str, device_id: str, token: str, targets_public_key, manager: BundleManager, *,
                 hardware_target: str = "onnx", max_length: int = DEFAULT_MAX_LENGTH, timeout: float = 30.0,
                 ca_file: Optional[str] = None, insecure_http: bool = False,
                 clock: Optional[Callable[[], datetime]] = None) -> None:
        from edge_runtime.bundle import load_public_key
        from edge_runtime.uplink import collector_tls

        context = collector_tls(base_url, insecure_http=insecure_http, ca_file=ca_file, what="target URL")
        parts = urlsplit(base_url)
        if hardware_target not in HARDWARE_TARGETS:
            raise UserInputError(f"hardware target {hardware_target!r} is not one of {', '.join(HARDWARE_TARGETS)}")
        if max_length <= 0:
            raise UserInputError(f"the bundle size cap must be positive, got {max_length} bytes")
        self.key = load_public_key(targets_public_key)
        self.base_url, self._parts = base_url.rstrip("/"), parts
        self._prefix = parts.path.rstrip("/")
        self.device_id, self._token, self.manager = device_id, token, manager
        self.hardware_target, self.max_length, self.timeout = hardware_target, max_length, timeout
        self._ssl = context  # https: system CAs or --ca-file, host name checked; http: loopback or --insecure-http
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self.status = "not polled yet"  # health.update_channel
        self.offered: Optional[str] = None  # the version the last verified metadata named
        self._last_problem: Optional[tuple] = None  # the refusal recorded last: not again until something changes
        self._bad_downloads: set[str] = set()  # sha256 whose download was refused in this process
        self.polls = 0
        self.bytes_downloaded = 0  # every archive byte read from the network by this channel
        self.last: Optional[PollResult] = None

    # ------------------------------------------------------------------------------------------ HTTP
    def _conn(self, total_s: Optional[float] = None):
        """A connection whose request is aborted (socket shut down) ``total_s`` seconds from now, whatever it is
        blocked in; ``total_s`` defaults to ``timeout``."""
        from edge_runtime.uplink import _Conn, _TLSConn

        p = self._parts
        if self._ssl is not None:
            conn = _TLSConn(p.hostname, p.port, self.timeout, self.timeout, self._ssl)
        else:
            conn = _Conn(p.hostname, p.port, self.timeout, self.timeout)
        conn.set_deadline(time.monotonic() + (self.timeout if total_s is None else total_s))
        return conn

    @staticmethod
    def _deadline_error(conn, exc: BaseException, what: str) -> BaseException:
        from edge_runtime.uplink import DeadlineExceeded

        if conn.deadline_hit and isinstance(exc, (OSError, http.client.HTTPException)):
            return DeadlineExceeded(f"{what} aborted: its total deadline passed (the collector or a proxy answers "
                                    f"too slowly; {type(exc).__name__})")
        return exc

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self._token}", "X-Device-Id": self.device_id}

    # ------------------------------------------------------------------------------------------ poll
    def poll(self) -> PollResult:
        try:
            res = self._poll()
        except (OSError, http.client.HTTPException) as exc:
            res = PollResult("error", f"cannot reach the collector ({type(exc).__name__}: {exc})")
        except Exception as exc:  # never into the inspection loop
            log.exception("update channel poll failed")
            res = PollResult("error", f"{type(exc).__name__}: {exc}")
        if res.outcome == "error":
            log.warning("update channel: %s", res.detail)
        self.status = f"{res.outcome}{': ' + res.detail if res.detail else ''}"[:250]
        self.last = res
        self.polls += 1
        if res.outcome not in ("refused", "freeze", "error", "busy"):
            self._last_problem = None
        return res

    def _problem(self, kind: str, key: tuple, version: Optional[str], detail: str, meta=None,
                 remember: bool = False) -> PollResult:
        """Record a refusal (kind refused) or a freeze once per distinct cause; the status says it every poll."""
        if (kind, key) != self._last_problem:
            self._last_problem = (kind, key)
            if kind == "refused" and meta is not None:
                self.manager.refuse_target(meta, detail, remember=remember)
            else:
                self.manager.event(kind, version, detail)
        return PollResult(kind, detail, version)

    def _poll(self) -> PollResult:
        line = self.manager.line
        if not line:
            return PollResult("error", "the box's line is not known yet (no bundle loaded)")
        conn = self._conn()
        try:
            conn.request("GET", f"{self._prefix}/api/v1/devices/{quote(self.device_id, safe='')}/target",
                         headers={**self._headers(), "Accept": "application/json"})
            resp = conn.getresponse()
            body = resp.read(MAX_METADATA_BYTES + 1)
            status = resp.status
        except (OSError, http.client.HTTPException) as exc:
            raise self._deadline_error(conn, exc, f"target request ({self.timeout:.0f} s)") from exc
        finally:
            conn.close()
        if status == 204:
            return PollResult("none", "the line has no active version")
        if status != 200:
            text = body[:300].decode("utf-8", "replace")
            return PollResult("error", f"target route answered HTTP {status}: {text}")
        if len(body) > MAX_METADATA_BYTES:
            return self._problem("refused", ("oversized",), None,
                                 f"target metadata larger than {MAX_METADATA_BYTES} bytes: refused")
        try:
            doc = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return self._problem("refused", ("json",), None, "target metadata is not JSON: refused")
        signed = doc.get("signed") if isinstance(doc, dict) else None
        claimed = signed if isinstance(signed, dict) else {}
        try:
            meta = verify_target(doc, self.key, device=self.device_id, line=line, now=self._clock(),
                                 max_length=self.max_length)
        except TargetError as exc:
            key = (str(claimed.get("sha256")), str(claimed.get("version")), str(exc).split(" (now ")[0])
            kind = "freeze" if "expired at" in str(exc) else "refused"
            return self._problem(kind, key, str(claimed.get("version") or "") or None, str(exc))
        self.offered = meta.version
        return self._act(meta)

    def _act(self, meta: TargetMetadata) -> PollResult:
        m, st = self.manager, self.manager.state
        key = (meta.sha256, meta.version)
        if meta.hardware_target != self.hardware_target:
            return self._problem("refused", key + ("hw",), meta.version, f"it is for hardware target "
                                 f"{meta.hardware_target!r}, this box is {self.hardware_target!r}", meta)
        if meta.version == st.current:
            return PollResult("current", f"runs {meta.version}", meta.version)
        if meta.version in st.bad:
            return self._problem("refused", key + ("bad",), meta.version, f"version {meta.version} was reverted "
                                 "after a crash loop on this box", meta)
        if st.current and not is_newer(meta.version, st.current) and not meta.rollback:
            return self._problem("refused", key + ("downgrade",), meta.version,
                                 f"version {meta.version} is not newer than the running {st.current} and the "
                                 "metadata is not a signed rollback (a downgrade or a replay)", meta)
        if m.is_refused_target(meta.sha256) or meta.sha256 in self._bad_downloads:
            return PollResult("refused", f"{meta.version} ({meta.sha256[:12]}) was refused before", meta.version)
        if m.busy():
            return PollResult("busy", "another candidate is being prepared", meta.version)
        path, got, problem = self._download(meta)
        if problem:
            self._bad_downloads.add(meta.sha256)
            res = self._problem("refused", key + ("download",), meta.version, problem, meta)
            res.downloaded = got
            return res
        if path is None:
            return PollResult("error", f"download of {meta.version} failed or ended early ({got} of {meta.length} "
                                       "bytes); retrying at the next poll", meta.version, got)
        if not m.submit(path, meta):
            path.unlink()
            return PollResult("busy", "another candidate is being prepared", meta.version, got)
        log.info("update channel: %s %s downloaded (%d bytes, sha256 checked), preparing it", meta.line,
                 meta.version, got)
        return PollResult("submitted", f"{meta.version} downloaded and handed over", meta.version, got)

    def _download(self, meta: TargetMetadata) -> tuple[Optional[Path], int, Optional[str]]:
        """(path, bytes read, refusal): at most ``length + 1`` bytes are read; sha256 checked before returning."""
        if not meta.url.startswith("/") or meta.url.startswith("//") or "://" in meta.url:
            return None, 0, f"url {meta.url!r} is not a path on the collector: refused"
        dest = self.manager.downloads / f"{meta.sha256}.tar.gz"
        tmp = self.manager.downloads / f".{meta.sha256}.part"
        budget = self.timeout + meta.length / MIN_DOWNLOAD_BYTES_PER_S
        conn = self._conn(budget)
        got, digest, declared = 0, hashlib.sha256(), None
        try:
            conn.request("GET", self._prefix + meta.url, headers=self._headers())
            resp = conn.getresponse()
            if resp.status != 200:
                text = resp.read(300).decode("utf-8", "replace")
                return None, 0, None if resp.status >= 500 else f"bundle route answered HTTP {resp.status}: {text}"
            declared = resp.getheader("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > meta.length:
                return None, 0, (f"the server announces {declared} bytes, the signed length is {meta.length}: "
                                 "refused before reading")
            with open(tmp, "wb") as fh:
                while got <= meta.length:
                    chunk = resp.read(min(1 << 20, meta.length + 1 - got))
                    if not chunk:
                        break
                    got += len(chunk)
                    self.bytes_downloaded += len(chunk)
                    if got > meta.length:
                        break
                    digest.update(chunk)
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException as exc:
            _unlink(tmp)
            err = self._deadline_error(conn, exc, f"download of {meta.version} ({budget:.0f} s)")
            if err is exc:
                raise
            raise err from exc
        finally:
            conn.close()
        if got > meta.length:
            _unlink(tmp)
            return None, got, (f"the server sent more than the signed length of {meta.length} bytes: download "
                               f"stopped at {got} bytes and refused")
        if got < meta.length:
            _unlink(tmp)
            if declared is not None and declared.isdigit() and got == int(declared):  # complete, and short
                return None, got, (f"the server sent a complete body of {got} bytes, the signed length is "
                                   f"{meta.length}: refused before opening the archive")
            return None, got, None  # the connection broke: try again at the next poll
        if digest.hexdigest() != meta.sha256:
            _unlink(tmp)
            return None, got, (f"the downloaded {got} bytes have sha256 {digest.hexdigest()[:16]}…, the signed "
                               f"metadata says {meta.sha256[:16]}…: refused before opening the archive")
        os.replace(tmp, dest)
        return dest, got, None


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


__all__ = ["UpdateChannel", "PollResult", "MAX_METADATA_BYTES"]
