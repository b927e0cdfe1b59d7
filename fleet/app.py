"""``create_app(settings)``: the collector as a FastAPI application (served by uvicorn in ``collector``)."""
from __future__ import annotations

import logging
import sqlite3

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from fleet import store
from fleet.api.routes import hard_examples, health, reports
from fleet.settings import CollectorSettings

log = logging.getLogger("defectkit.collector")


def create_app(settings: CollectorSettings) -> FastAPI:
    settings.check()
    with store.session(path=settings.db) as conn:
        store.sync_devices(conn, token_hashes=settings.tokens.devices if settings.tokens else {})
    app = FastAPI(title="defectkit collector", description="Reports and hard examples from edge boxes.")
    app.state.settings = settings
    for module in (reports, hard_examples, health):
        app.include_router(module.router)

    @app.exception_handler(sqlite3.OperationalError)
    async def store_busy(request: Request, exc: sqlite3.OperationalError) -> JSONResponse:
        # locked or full store: the device keeps the item and retries later
        log.error("store %s: %s", settings.db, exc)
        return JSONResponse({"detail": f"collector store unavailable ({exc}); retry later"}, status_code=503,
                            headers={"Retry-After": "5"})

    return app
