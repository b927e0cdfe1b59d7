"""POST /api/v1/hard-examples: JSON ``{"meta": {...}, "image_b64": "<JPEG>"}``; GET lists them (admin).

JSON with base64 rather than multipart: the edge box builds it with the standard library alone and
the metadata is validated by the same code (``edge_runtime.hard_examples``) on both sides.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import time
from typing import Optional

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from edge_runtime.fileio import atomic_write_bytes
from edge_runtime.hard_examples import SCHEMA, hard_example_errors
from fleet import store
from fleet.api.deps import (AdminDep, CurrentDevice, DbDep, SettingsDep, check_claim, check_line, parse_json,
                            rate_limit, read_body)
from fleet.validate import hard_example_problems, jpeg_problem
from fleet.db import Conn
from fleet.settings import CollectorSettings

router = APIRouter(prefix="/api/v1/hard-examples", tags=["hard-examples"])


QUOTA_WINDOW_S = 86400.0


def _store(settings: CollectorSettings, conn: Conn, meta: dict, image: bytes) -> tuple:
    """(outcome, retry_after): ``inserted``, ``duplicate``, ``conflict`` (another device's id) or ``quota``.
    On the request's own connection: a second one per request can exhaust the pool under load."""
    owner = store.hard_example_owner(conn, hard_example_id=meta["id"])
    if owner is not None:
        return ("duplicate" if owner == meta["device_id"] else "conflict"), 0
    now = time.time()
    used, oldest = store.hard_example_bytes(conn, device=meta["device_id"], since=now - QUOTA_WINDOW_S)
    if used + len(image) > settings.quota_bytes_per_day:
        return "quota", max(1, int((oldest or now) + QUOTA_WINDOW_S - now) + 1)
    path = settings.data_dir / meta["line"] / meta["device_id"] / f"{meta['id']}.jpg"
    atomic_write_bytes(path, image)  # file first: a crash leaves an orphan file, never a row without image
    return store.insert_hard_example(conn, meta=meta, image_path=str(path), received_at=now,
                                     image_sha256=hashlib.sha256(image).hexdigest(), image_bytes=len(image)), 0


@router.post("", status_code=201)
async def post_hard_example(request: Request, settings: SettingsDep, device: CurrentDevice, db: DbDep) -> JSONResponse:
    rate_limit(request, settings, device)
    obj = parse_json(await read_body(request, settings.max_hard_example_bytes, "hard example"), "hard example",
                     settings.max_json_depth)
    if not isinstance(obj, dict) or set(obj) != {"meta", "image_b64"} or not isinstance(obj["image_b64"], str):
        raise HTTPException(status_code=422, detail='hard example must be {"meta": {...}, "image_b64": "<JPEG>"}')
    errs = hard_example_errors(obj["meta"])
    if not errs:
        errs = hard_example_problems(obj["meta"])
    if errs:
        raise HTTPException(status_code=422, detail=f"hard-example meta does not follow {SCHEMA}: " + "; ".join(errs))
    meta = obj["meta"]
    check_claim(device, meta["device_id"], "hard example")
    check_line(db, device, meta["line"], "hard example", request)
    try:
        image = base64.b64decode(obj["image_b64"], validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise HTTPException(status_code=400, detail=f"image_b64 is not valid base64: {exc}") from exc
    problem = await run_in_threadpool(jpeg_problem, image, meta)
    if problem:
        raise HTTPException(status_code=422, detail=problem)
    outcome, retry = await run_in_threadpool(_store, settings, db, meta, image)
    if outcome == "conflict":
        raise HTTPException(status_code=409, detail=f"hard example id {meta['id']} is already used by another device")
    if outcome == "quota":
        raise HTTPException(status_code=429, headers={"Retry-After": str(retry)},
                            detail=f"device {meta['device_id']!r} is over its hard-example quota of "
                                   f"{settings.quota_bytes_per_day} bytes per 24 h; retry after {retry} s")
    return JSONResponse({"id": meta["id"], "duplicate": outcome == "duplicate"},
                        status_code=201 if outcome == "inserted" else 200)


@router.get("")
def get_hard_examples(db: DbDep, _: AdminDep, line: Optional[str] = None, device: Optional[str] = None,
                      limit: int = Query(100, ge=1, le=1000)) -> dict:
    return {"hard_examples": store.list_hard_examples(db, line=line, device=device, limit=limit)}
