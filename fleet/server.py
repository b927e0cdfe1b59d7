"""Serve the collector app with uvicorn: in the foreground (:func:`serve`) or in a thread (:class:`CollectorThread`).

TLS: ``settings.tls_cert`` / ``tls_key`` go to uvicorn's ``ssl_certfile`` / ``ssl_keyfile``; with
``tls_client_ca`` every client must present a certificate signed by that CA (``ssl.CERT_REQUIRED``).
"""
from __future__ import annotations

import signal
import socket
import ssl
import sys
import threading
from typing import Any, Callable, Dict

from edge_runtime.errors import ConfigError, require
from fleet.settings import CollectorSettings


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before serving so ``--port 0`` works and the printed URL has the real port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart on the same port at once
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"collector cannot listen on {host}:{port} ({exc.strerror}); "
                          f"choose another --port or stop what uses it") from exc
    sock.listen(128)
    return sock


def tls_options(settings: CollectorSettings) -> Dict[str, Any]:
    """uvicorn.Config keyword arguments for TLS (empty without a certificate)."""
    if not settings.tls:
        return {}
    opts: Dict[str, Any] = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
    if settings.tls_client_ca is not None:
        opts.update(ssl_ca_certs=str(settings.tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return opts


def stack_options(settings: CollectorSettings) -> Dict[str, Any]:
    """uvicorn.Config ``loop``/``http`` for ``settings.server_stack``; uvicorn's "auto" already prefers uvloop and
    httptools when importable, so "auto" passes nothing and "asyncio" pins the pure-Python pair."""
    if settings.server_stack not in ("auto", "asyncio"):
        raise ConfigError(f"collector server_stack {settings.server_stack!r} is unknown; use 'auto' or 'asyncio'")
    return {} if settings.server_stack == "auto" else {"loop": "asyncio", "http": "h11"}


def stack_name(config: Any) -> str:
    """What will serve, as uvicorn resolved it (e.g. 'uvloop + httptools' or 'asyncio + h11'): for the start-up line
    and the benches, so a figure is never credited to a stack that did not run. Loads ``config`` (uvicorn skips
    loading again when it serves)."""
    if not config.loaded:
        config.load()
    factory = config.get_loop_factory()
    loop = (getattr(factory, "__module__", None) or "asyncio").split(".")[0]
    http = config.http_protocol_class.__module__.rsplit(".", 1)[-1].replace("_impl", "")
    return f"{loop} + {http}"


def serve(settings: CollectorSettings, *, announce: Callable[[str], None] = print) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn finishes the requests in flight, then returns)."""
    require("fastapi", "fleet", "the collector")
    uvicorn = require("uvicorn", "fleet", "the collector")
    from fleet.app import create_app

    app = create_app(settings)  # checks settings: refuses a non-loopback host without tokens
    sock = bind_socket(settings.host, settings.port)
    settings.port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                            timeout_keep_alive=5, **tls_options(settings), **stack_options(settings))
    mode = "DEVELOPMENT mode, no tokens: anyone may post" if settings.dev_mode else \
        f"{len(settings.tokens.devices)} device token(s) in the token file"
    tls = "" if settings.tls else "; plain HTTP: give --tls-cert/--tls-key off loopback"
    announce(f"collector listening on {settings.url} (db {settings.db}, {mode}{tls}; {stack_name(config)})")
    sys.stdout.flush()
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises SIGTERM after its graceful shutdown; make that a clean exit (status 0) for systemd
        signal.signal(signal.SIGTERM, _exit_cleanly)
    uvicorn.Server(config).run(sockets=[sock])


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


class CollectorThread:
    """The collector in a background thread of this process (tests, the local demo); ``stop()`` ends it."""

    def __init__(self, settings: CollectorSettings) -> None:
        uvicorn = require("uvicorn", "fleet", "the collector")
        from fleet.app import create_app

        self.settings = settings
        self.app = create_app(settings)
        self._sock = bind_socket(settings.host, settings.port)
        settings.port = self._sock.getsockname()[1]
        self.url = settings.url
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=2, **tls_options(settings),
                                                    **stack_options(settings)))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="defectkit-collector", daemon=True)

    def start(self, timeout: float = 10.0) -> "CollectorThread":
        import time

        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"collector thread on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()


__all__ = ["bind_socket", "serve", "CollectorThread", "tls_options", "stack_options", "stack_name"]
