"""POST /api/v1/reports (devices) and GET /api/v1/reports (admin)."""
from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from edge_runtime.wire_report import SCHEMA, report_errors
from fleet import store
from fleet.api.deps import (AdminDep, CurrentDevice, DbDep, SettingsDep, check_claim, check_line, parse_json,
                            rate_limit, read_body)
from fleet.validate import report_problems

router = APIRouter(prefix="/api/v1/reports", tags=["reports"])


@router.post("", status_code=201)
async def post_report(request: Request, settings: SettingsDep, device: CurrentDevice, db: DbDep) -> JSONResponse:
    """Store a report once: 201 new, 200 with duplicate=true if its id is already stored."""
    rate_limit(request, settings, device)
    obj = parse_json(await read_body(request, settings.max_report_bytes, "report"), "report", settings.max_json_depth)
    errs = report_errors(obj)  # the edge box's own schema code, then the collector's bounds
    if not errs:
        errs = report_problems(obj)
    if errs:
        raise HTTPException(status_code=422, detail=f"report does not follow {SCHEMA}: " + "; ".join(errs))
    check_claim(device, obj["device_id"], "report")
    check_line(db, device, obj["line"], "report", request)
    outcome = await run_in_threadpool(lambda: store.insert_report(db, report=obj))  # the request's one connection
    if outcome == "conflict":
        raise HTTPException(status_code=409, detail=f"report id {obj['id']} is already used by another device")
    return JSONResponse({"id": obj["id"], "duplicate": outcome == "duplicate"},
                        status_code=201 if outcome == "inserted" else 200)


@router.get("")
def get_reports(db: DbDep, _: AdminDep, line: Optional[str] = None, device: Optional[str] = None,
                limit: int = Query(100, ge=1, le=1000)) -> dict:
    return {"count": store.count_reports(db, line=line, device=device),
            "reports": store.list_reports(db, line=line, device=device, limit=limit)}
