"""Dependencies shared by the routes: settings, a store session, the calling device, body limits.

Auth is a bearer token per device (``Authorization: Bearer <token>``). The token names the device;
a report or hard example that claims another device is refused with 403, so one leaked token cannot
speak for the whole fleet. Lists need the admin token.
"""
from __future__ import annotations

import json
import sqlite3
from typing import Annotated, Any, Iterator, Optional

from fastapi import Depends, HTTPException, Request

from fleet import devices, store
from fleet.settings import CollectorSettings

_AUTH_HINT = "send 'Authorization: Bearer <token>' with the device's token from the collector's token file"


def get_settings(request: Request) -> CollectorSettings:
    return request.app.state.settings


SettingsDep = Annotated[CollectorSettings, Depends(get_settings)]


def get_db(settings: SettingsDep) -> Iterator[sqlite3.Connection]:
    with store.session(path=settings.db) as conn:
        yield conn


DbDep = Annotated[sqlite3.Connection, Depends(get_db)]


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


def _identify(request: Request, settings: CollectorSettings, conn: sqlite3.Connection, token: str):
    """(device id, None) for a token of the token file or of an enrolled device; (None, why) otherwise."""
    if settings.tokens is not None:
        device = settings.tokens.device_for(token)
        if device is not None:
            enrolled = devices.find(conn, device_id=device)
            if enrolled is not None and enrolled.revoked_at is not None:
                return None, f"device {device!r} was revoked; enrol it again (defectkit fleet enroll)"
            return device, None
    dev, why = request.app.state.authenticator.identify(conn, token)
    if dev is not None:
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


def check_line(db: sqlite3.Connection, device: Optional[str], line: str, what: str) -> None:
    """403 when an enrolled device posts for another line than the one it is bound to."""
    if device is None:
        return
    enrolled = devices.find(db, device_id=device)
    if enrolled is not None and enrolled.line != line:
        raise HTTPException(status_code=403, detail=f"device {device!r} is enrolled on line {enrolled.line!r}: a "
                                                    f"{what} for line {line!r} is refused")


def check_claim(device: Optional[str], claimed: str, what: str) -> None:
    """403 when a body claims another device than the token's."""
    if device is not None and claimed != device:
        raise HTTPException(status_code=403,
                            detail=f"the token of device {device!r} is not valid for a {what} from device {claimed!r}")


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The request body, or 413 past ``limit`` bytes.

    An oversized body is still read to its end (discarded, up to 16x the limit) before answering, so the
    client sees the 413 instead of a reset connection, and an uplink files the item as refused rather
    than retrying it forever.
    """
    declared = request.headers.get("content-length")
    too_big = declared is not None and declared.isdigit() and int(declared) > limit
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            too_big = True
        if too_big:
            chunks = []
            if size > 16 * limit:
                break
        else:
            chunks.append(chunk)
    if too_big:
        raise HTTPException(status_code=413, detail=f"{what} of {declared or size} bytes is larger than the "
                                                    f"collector's limit of {limit} bytes")
    return b"".join(chunks)


def parse_json(body: bytes, what: str) -> Any:
    if not body:
        raise HTTPException(status_code=400, detail=f"empty body: POST the {what} as JSON")
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise HTTPException(status_code=400, detail=f"{what} body is not valid UTF-8 JSON: {exc}") from exc
