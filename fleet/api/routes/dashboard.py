"""The dashboard (server-rendered HTML, charts as inline SVG): ``GET /``, ``POST /login``, ``GET /logout`` and the
hard-example images it shows.

Access: the admin token, as ``Authorization: Bearer`` or typed once into the login form, which sets a session
cookie: ``<expiry>.<HMAC-SHA256 of the expiry>`` keyed by the admin token's hash, so every collector process on
the same token file accepts it and rotating the admin token ends every session. HttpOnly, SameSite=Strict,
Secure under TLS. In development mode (no token file, loopback only) the page is open.
"""
from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from fleet import dashboard, store
from fleet.api.deps import SettingsDep
from fleet.settings import CollectorSettings

router = APIRouter(tags=["dashboard"], include_in_schema=False)
COOKIE = "defectkit_session"
SESSION_S = 12 * 3600


def _key(settings: CollectorSettings) -> bytes:
    return hashlib.sha256(b"defectkit dashboard session\0" + settings.tokens.admin.encode()).digest()


def session_cookie(settings: CollectorSettings, now: float) -> str:
    exp = str(int(now + SESSION_S))
    return f"{exp}.{hmac.new(_key(settings), exp.encode(), hashlib.sha256).hexdigest()}"


def _admin(request: Request, settings: CollectorSettings) -> bool:
    if settings.dev_mode:
        return True
    if settings.tokens.admin is None:
        return False
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer ") and settings.tokens.is_admin(header[7:].strip()):
        return True
    exp, _, mac = request.cookies.get(COOKIE, "").partition(".")
    if not exp.isdigit() or int(exp) < time.time():
        return False
    return hmac.compare_digest(mac, hmac.new(_key(settings), exp.encode(), hashlib.sha256).hexdigest())


def _env():
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).resolve().parents[2] / "templates")),
                              autoescape=True)


_ENV = None


def render(**ctx) -> str:
    global _ENV
    if _ENV is None:
        _ENV = _env()
    return _ENV.get_template("dashboard.html").render(**ctx)


def _page(settings: CollectorSettings) -> str:
    with store.session(path=settings.db) as conn:
        lines = dashboard.overview(conn)
    return render(login=False, lines=lines, generated=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))


@router.get("/", response_class=HTMLResponse)
async def index(request: Request, settings: SettingsDep) -> Response:
    if not _admin(request, settings):
        return HTMLResponse(render(login=True, error=None), status_code=401 if "authorization" in request.headers
                            else 200, headers={"Cache-Control": "no-store"})
    return HTMLResponse(await run_in_threadpool(_page, settings), headers={"Cache-Control": "no-store"})


@router.post("/login")
async def login(request: Request, settings: SettingsDep) -> Response:
    body = await request.body()
    token = (parse_qs(body[:4096].decode("utf-8", "replace")).get("token") or [""])[0].strip()
    if settings.dev_mode:
        return RedirectResponse("/", status_code=303)
    if not token or not settings.tokens.is_admin(token):
        return HTMLResponse(render(login=True, error="That is not the collector's admin token."), status_code=401)
    resp = RedirectResponse("/", status_code=303)
    resp.set_cookie(COOKIE, session_cookie(settings, time.time()), max_age=SESSION_S, httponly=True,
                    samesite="strict", secure=settings.tls, path="/")
    return resp


@router.get("/logout")
def logout() -> Response:
    resp = RedirectResponse("/", status_code=303)
    resp.delete_cookie(COOKIE, path="/")
    return resp


@router.get("/dashboard/hard-examples/{hid}.jpg")
def hard_example_image(hid: str, request: Request, settings: SettingsDep) -> Response:
    if not _admin(request, settings):
        raise HTTPException(status_code=401, detail="sign in at / with the admin token")
    with store.session(path=settings.db) as conn:
        row = conn.execute("SELECT image_path FROM hard_examples WHERE id = ?", (hid,)).fetchone()
    if row is None or not Path(row[0]).is_file():
        raise HTTPException(status_code=404, detail=f"no hard-example image {hid}")
    return FileResponse(row[0], media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})
