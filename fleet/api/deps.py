"""Dependencies shared by the routes: settings, a store session, the calling device, body limits.

Auth is a bearer token per device (``Authorization: Bearer <token>``). The token names the device;
a report or hard example that claims another device is refused with 403, so one leaked token cannot
speak for the whole fleet. Lists need the admin token.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Annotated, Any, AsyncIterator, Dict, Optional, Tuple

from fastapi import Depends, HTTPException, Request

from fleet import devices, store
from fleet.settings import CollectorSettings
from fleet.db import Conn

_AUTH_HINT = "send 'Authorization: Bearer <token>' with the device's token from the collector's token file"


async def get_settings(request: Request) -> CollectorSettings:
    """``async``: no I/O, so FastAPI calls it on the event loop instead of a worker-thread hop."""
    return request.app.state.settings


SettingsDep = Annotated[CollectorSettings, Depends(get_settings)]


async def get_db(settings: SettingsDep) -> AsyncIterator[Conn]:
    """A store handle (it holds no connection: each statement or ``tx`` checks one out in the worker thread that
    runs it). ``async``: making the handle does no I/O (the store was migrated when the app was created), so it
    costs no worker-thread hop on the way in and none on the way out."""
    with store.session(path=settings.db) as conn:
        yield conn


DbDep = Annotated[Conn, Depends(get_db)]


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(status_code=401, detail=message, headers={"WWW-Authenticate": "Bearer"})


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise _unauthorized(f"missing bearer token: {_AUTH_HINT}")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized(f"malformed Authorization header (scheme {scheme!r}): {_AUTH_HINT}")
    return token.strip()


def _identify(request: Request, settings: CollectorSettings, conn: Conn, token: str):
    """(device id, None) for a token of the token file or of an enrolled device; (None, why) otherwise.

    The device's enrolment (or None) is kept in ``request.state.enrolment`` for :func:`check_line`, so a post
    reads the enrolments table once."""
    if settings.tokens is not None:
        device = settings.tokens.device_for(token)
        if device is not None:
            enrolled = devices.find(conn, device_id=device)
            if enrolled is not None and enrolled.revoked_at is not None:
                return None, f"device {device!r} was revoked; enrol it again (defectkit fleet enroll)"
            request.state.enrolment = (device, enrolled)
            return device, None
    dev, why = request.app.state.authenticator.identify(conn, token)
    if dev is not None:
        request.state.enrolment = (dev.device_id, dev)
        return dev.device_id, None
    return None, why or "unknown token: no device in the collector's token file or enrolled in its store has it"


def current_device(request: Request, settings: SettingsDep, db: DbDep) -> Optional[str]:
    """The device the token belongs to; None in development mode (no token file) when no device token is sent."""
    if settings.tokens is None:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            return None
        device, _ = _identify(request, settings, db, bearer_token(request))
        return device  # development mode: an unknown token is anyone
    device, why = _identify(request, settings, db, bearer_token(request))
    if device is None:
        raise _unauthorized(why)
    claimed = request.headers.get("x-device-id")
    if claimed is not None and claimed != device:
        raise HTTPException(status_code=403, detail=f"the token of device {device!r} is not valid for device {claimed!r}")
    return device


CurrentDevice = Annotated[Optional[str], Depends(current_device)]


def require_admin(request: Request, settings: SettingsDep) -> None:
    if settings.tokens is None:
        return
    token = bearer_token(request)
    if settings.tokens.is_admin(token):
        return
    if settings.tokens.device_for(token) is not None or _is_enrolled_token(request, settings, token):
        raise HTTPException(status_code=403, detail="a device token cannot read the collector: use the admin token")
    raise _unauthorized("unknown token: lists need the admin token from the collector's token file")


AdminDep = Annotated[None, Depends(require_admin)]


def _is_enrolled_token(request: Request, settings: CollectorSettings, token: str) -> bool:
    with store.session(path=settings.db) as conn:
        dev, why = request.app.state.authenticator.identify(conn, token)
    return dev is not None or why is not None


def check_line(db: Conn, device: Optional[str], line: str, what: str, request: Optional[Request] = None) -> None:
    """403 when an enrolled device posts for another line than the one it is bound to (the enrolment read when
    the token was checked, else read now)."""
    if device is None:
        return
    known = getattr(request.state, "enrolment", None) if request is not None else None
    enrolled = known[1] if known is not None and known[0] == device else devices.find(db, device_id=device)
    if enrolled is not None and enrolled.line != line:
        raise HTTPException(status_code=403, detail=f"device {device!r} is enrolled on line {enrolled.line!r}: a "
                                                    f"{what} for line {line!r} is refused")


def check_claim(device: Optional[str], claimed: str, what: str) -> None:
    """403 when a body claims another device than the token's."""
    if device is not None and claimed != device:
        raise HTTPException(status_code=403,
                            detail=f"the token of device {device!r} is not valid for a {what} from device {claimed!r}")


class BodyTooLarge(HTTPException):
    """413; the route answers it with ``Connection: close`` (the rest of the body is never read)."""


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The request body, or 413 as soon as it is known to exceed ``limit`` bytes.

    A declared ``Content-Length`` above the limit is refused before reading any of the body; a chunked body is
    read only until it passes the limit. The answer carries ``Connection: close``: the unread rest is dropped
    with the connection, never read (an uplink files a 413 as refused, not to be retried).
    """
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BodyTooLarge(status_code=413, headers={"Connection": "close"},
                           detail=f"{what} of {declared} bytes is larger than the collector's limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(status_code=413, headers={"Connection": "close"},
                               detail=f"{what} of more than {limit} bytes (read {size} before stopping) is larger "
                                      f"than the collector's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes, what: str, max_depth: int = 8) -> Any:
    """Bounded JSON (fleet.validate.parse_bounded_json): 400 naming the reason for anything else."""
    from fleet.validate import BadJson, parse_bounded_json

    if not body:
        raise HTTPException(status_code=400, detail=f"empty body: POST the {what} as JSON")
    try:
        return parse_bounded_json(body, max_depth=max_depth)
    except BadJson as exc:
        raise HTTPException(status_code=400, detail=f"{what} body is not valid UTF-8 JSON: {exc}") from None


def rate_limit(request: Request, settings: CollectorSettings, device: Optional[str]) -> None:
    """429 with Retry-After when the device (or, in development mode, the client address) is over its rate."""
    who = device or f"addr:{request.client.host if request.client else '?'}"
    wait = request.app.state.limiter.take(who)
    if wait > 0:
        raise HTTPException(status_code=429, headers={"Retry-After": str(max(1, math.ceil(wait)))},
                            detail=f"{who} is over the collector's rate of {settings.rate_per_s:g} posts/s "
                                   f"(burst {settings.burst}); retry after {wait:.1f} s")


class TokenBuckets:
    """Per-key token buckets in this process's memory: ``rate`` tokens per second, ``burst`` at most."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic) -> None:
        self.rate, self.burst, self._clock = float(rate), float(burst), clock
        self._buckets: Dict[str, Tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when a token was taken; else the seconds until one is available."""
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            if len(self._buckets) > 100_000:  # forget full buckets: they are the default anyway
                self._buckets = {k: v for k, v in self._buckets.items() if v[0] < self.burst}
            return (1.0 - tokens) / self.rate
