"""The update channel (device token): signed target metadata, then the archive it names.

``GET /api/v1/devices/{id}/target`` -> ``defectkit.target/1`` document (docs/fleet.md), 204 when the line has no
active version. ``GET /api/v1/bundles/{sha256}`` -> the archive, only to devices of the bundle's line.
``/api/v1/bundles/latest`` (the old systemd example) answers 410 instead of a 404 a puller took for "nothing new".
"""
from __future__ import annotations

import re
from datetime import datetime, timezone

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from edge_runtime.errors import UserInputError
from fleet import channel, devices, registry
from fleet.api.deps import CurrentDevice, DbDep, SettingsDep

router = APIRouter(prefix="/api/v1", tags=["update channel"])
_SHA = re.compile(r"^[0-9a-f]{64}$")


def _enrolled(db, device_id: str):
    dev = devices.find(db, device_id=device_id)
    if dev is None:
        raise HTTPException(status_code=403, detail=f"device {device_id!r} is not enrolled on a line "
                                                    f"(defectkit fleet enroll --line L --device {device_id})")
    return dev


@router.get("/devices/{device_id}/target")
def target(device_id: str, request: Request, db: DbDep, settings: SettingsDep, device: CurrentDevice) -> Response:
    if device is not None and device != device_id:
        raise HTTPException(status_code=403, detail=f"the token of device {device!r} cannot read the target of "
                                                    f"device {device_id!r}")
    key = request.app.state.targets_key
    if key is None:
        raise HTTPException(status_code=503, detail="the collector was started without --targets-key: it cannot "
                                                    "sign target metadata")
    _enrolled(db, device_id)
    try:
        doc = channel.signed_target(db, device_id=device_id, private_key=key, now=datetime.now(timezone.utc),
                                    expiry_s=settings.target_expiry_s)
    except channel.NoArtifact as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    except UserInputError as exc:
        raise HTTPException(status_code=403, detail=str(exc)) from None
    if doc is None:
        return Response(status_code=204)
    return JSONResponse(doc, headers={"Cache-Control": "no-store"})


@router.get("/bundles/latest")
def latest_gone() -> JSONResponse:
    return JSONResponse({"detail": "/api/v1/bundles/latest is gone: ask GET /api/v1/devices/{device_id}/target for "
                                   "signed target metadata, then download the bundle at its url"}, status_code=410)


@router.get("/bundles/{sha256}")
def bundle(sha256: str, db: DbDep, device: CurrentDevice) -> FileResponse:
    if not _SHA.match(sha256):
        raise HTTPException(status_code=404, detail=f"{sha256!r} is not a bundle sha256 (64 lowercase hex digits)")
    rows = registry.by_sha(db, sha256=sha256)
    if not rows:
        raise HTTPException(status_code=404, detail=f"no bundle with sha256 {sha256} in the registry")
    if device is not None:
        dev = _enrolled(db, device)
        if dev.line not in {r["line"] for r in rows}:
            raise HTTPException(status_code=403, detail=f"bundle {sha256[:16]}… belongs to line "
                                                        f"{rows[0]['line']!r}, device {device!r} to line {dev.line!r}")
    return FileResponse(rows[0]["path"], media_type="application/gzip", headers={"ETag": f'"{sha256}"'})
