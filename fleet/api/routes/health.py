"""GET /healthz (open: load balancers and the edge demo probe it) and GET /api/v1/devices (admin)."""
from __future__ import annotations

from fastapi import APIRouter

from fleet import store
from fleet.api.deps import AdminDep, DbDep, SettingsDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(db: DbDep, settings: SettingsDep) -> dict:
    return {"status": "ok", "reports": store.count_reports(db), "dev_mode": settings.dev_mode}


@router.get("/api/v1/devices")
def devices(db: DbDep, _: AdminDep) -> dict:
    return {"devices": store.list_devices(db)}
