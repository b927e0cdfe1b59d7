"""The registry over HTTP (admin token): list, upload, promote, roll back; the rollout status of a line."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from fleet import registry, rollout, store
from fleet.api.deps import AdminDep, DbDep, SettingsDep, parse_json
from fleet.settings import CollectorSettings

router = APIRouter(prefix="/api/v1/lines", tags=["registry"])


@router.get("/{line}/versions")
def list_versions(line: str, db: DbDep, _: AdminDep) -> dict:
    return {"line": line, "versions": registry.list_versions(db, line=line)}


def _push(settings: CollectorSettings, line: str, archive: Path) -> registry.PushResult:
    with store.session(path=settings.db) as conn:
        return registry.push(conn, archive=archive, registry_dir=settings.registry_dir, line=line)


@router.post("/{line}/versions", status_code=201)
async def upload(line: str, request: Request, settings: SettingsDep, _: AdminDep) -> JSONResponse:
    """Body: the bundle ``.tar.gz``. 201 registered, 200 the same archive was already registered."""
    tmp_dir = Path(settings.registry_dir) / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="upload-", suffix=".tar.gz", dir=tmp_dir)
    try:
        size = 0
        with os.fdopen(fd, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > settings.max_bundle_bytes:
                    raise HTTPException(status_code=413, detail=f"bundle larger than the collector's limit of "
                                                                f"{settings.max_bundle_bytes} bytes")
                out.write(chunk)
        if size == 0:
            raise HTTPException(status_code=400, detail="empty body: POST the bundle .tar.gz as the request body")
        res = await run_in_threadpool(_push, settings, line, Path(tmp))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return JSONResponse({"line": res.line, "version": res.version, "sha256": res.sha256, "length": res.length,
                         "duplicate": res.duplicate}, status_code=200 if res.duplicate else 201)


@router.post("/{line}/versions/{version}/promote")
def promote(line: str, version: str, db: DbDep, _: AdminDep) -> dict:
    previous = registry.promote(db, line=line, version=version)
    return {"line": line, "active": version, "previous": previous}


@router.post("/{line}/rollback")
async def rollback(line: str, request: Request, settings: SettingsDep, _: AdminDep) -> dict:
    body = await request.body()
    to: Optional[str] = None
    if body.strip():
        obj = parse_json(body, "rollback")
        if not isinstance(obj, dict) or set(obj) - {"to"} or not isinstance(obj.get("to", ""), (str, type(None))):
            raise HTTPException(status_code=422, detail='rollback body must be {"to": "VERSION"} or empty')
        to = obj.get("to")

    def run() -> str:
        with store.session(path=settings.db) as conn:
            return registry.rollback(conn, line=line, to=to)

    return {"line": line, "active": await run_in_threadpool(run)}


@router.get("/{line}/rollout")
def rollout_status(line: str, db: DbDep, _: AdminDep) -> dict:
    r = rollout.latest(db, line=line)
    if r is None:
        raise HTTPException(status_code=404, detail=f"line '{line}' has never had a rollout")
    return {"rollout": r, "decisions": rollout.decisions(db, rollout_id=r["id"])}
