"""``create_app(settings)``: the collector as a FastAPI application (served by uvicorn in ``fleet.server``).

Besides the routes, the app runs one background task: every ``rollout_interval_s`` it evaluates the running
rollouts (:func:`fleet.rollout.evaluate_all`), so promotion and rollback happen without anyone watching.
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from edge_runtime.errors import BundleError, DefectkitError
from fleet import devices, rollout, store
from fleet.channel import load_targets_key
from fleet.api.deps import TokenBuckets
from fleet.api.routes import channel, dashboard, hard_examples, health, registry, reports
from fleet.settings import CollectorSettings

log = logging.getLogger("defectkit.collector")


def _evaluate_rollouts(settings: CollectorSettings) -> dict:
    with store.session(path=settings.db) as conn:
        return rollout.evaluate_all(conn, now=time.time())


async def _rollout_loop(app: FastAPI, settings: CollectorSettings) -> None:
    while True:
        try:
            decided = await run_in_threadpool(_evaluate_rollouts, settings)
            for line, d in decided.items():
                if d.action != "wait":
                    log.warning("rollout on %s: %s (%s)", line, d.action, d.reason)
            app.state.rollout_evaluations += 1
        except Exception:  # a broken evaluation must not stop the collector; the next round retries
            log.exception("rollout evaluation failed")
        await asyncio.sleep(settings.rollout_interval_s)


def create_app(settings: CollectorSettings) -> FastAPI:
    settings.check()
    from fleet import db

    db.migrate(settings.db)  # a store of an older schema is migrated; one of a newer schema is refused
    with store.session(path=settings.db) as conn:
        store.sync_devices(conn, token_hashes=settings.tokens.devices if settings.tokens else {})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(_rollout_loop(app, settings))
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(title="defectkit collector", lifespan=lifespan,
                  description="Reports and hard examples from edge boxes; the per-line registry and update channel.")
    app.state.settings = settings
    app.state.authenticator = devices.Authenticator()
    app.state.rollout_evaluations = 0
    app.state.limiter = TokenBuckets(settings.rate_per_s, settings.burst)
    app.state.targets_key = None
    if settings.targets_key is not None:
        app.state.targets_key = load_targets_key(settings.targets_key)
    for module in (reports, hard_examples, health, registry, channel, dashboard):
        app.include_router(module.router)

    from sqlalchemy.exc import DBAPIError, TimeoutError as PoolTimeout

    @app.exception_handler(DBAPIError)
    @app.exception_handler(PoolTimeout)
    @app.exception_handler(db.StoreUnavailable)
    async def store_busy(request: Request, exc: Exception) -> JSONResponse:
        # a locked or full SQLite file, a PostgreSQL server down or refusing: the device keeps the item, retries
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:200]
        log.error("store %s: %s", db.describe(settings.db), reason)
        return JSONResponse({"detail": f"collector store unavailable ({reason}); retry later"}, status_code=503,
                            headers={"Retry-After": "5"})

    @app.exception_handler(DefectkitError)
    async def refused(request: Request, exc: DefectkitError) -> JSONResponse:
        # registry/rollout refusals carry their reason; a bundle that does not verify is unprocessable
        return JSONResponse({"detail": str(exc)}, status_code=422 if isinstance(exc, BundleError) else 400)

    return app
