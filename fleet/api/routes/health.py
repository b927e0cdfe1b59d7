"""GET /healthz (open: load balancers and the edge demo probe it; figures only with the admin token) and
GET /api/v1/devices (admin)."""
from __future__ import annotations

from fastapi import APIRouter, Request

from fleet import store
from fleet.api.deps import AdminDep, DbDep, SettingsDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(request: Request, db: DbDep, settings: SettingsDep) -> dict:
    """``{"status": "ok"}`` once the store answers; the report count and mode only for the admin token."""
    db.execute("SELECT 1")
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if settings.dev_mode or (token and settings.tokens.is_admin(token)):
        return {"status": "ok", "reports": store.count_reports(db), "dev_mode": settings.dev_mode}
    return {"status": "ok"}


@router.get("/api/v1/devices")
def devices(db: DbDep, _: AdminDep) -> dict:
    return {"devices": store.list_devices(db)}
