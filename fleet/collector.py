"""Run the collector: ``python -m fleet.collector serve --db PATH --port N --tokens FILE``.

Same verbs as ``defectkit collector ...`` (both are built by :func:`fleet.cli.add_commands`).
"""
from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
from typing import Callable, Optional, Sequence

from edge_runtime.errors import DefectkitError, require
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
        from edge_runtime.errors import ConfigError

        raise ConfigError(f"collector cannot listen on {host}:{port} ({exc.strerror}); "
                          f"choose another --port or stop what uses it") from exc
    sock.listen(128)
    return sock


def serve(settings: CollectorSettings, *, announce: Callable[[str], None] = print) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn finishes the requests in flight, then returns)."""
    require("fastapi", "fleet", "the collector")
    uvicorn = require("uvicorn", "fleet", "the collector")
    from fleet.app import create_app

    app = create_app(settings)  # checks settings: refuses a non-loopback host without tokens
    sock = bind_socket(settings.host, settings.port)
    settings.port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                            timeout_keep_alive=5)
    mode = "DEVELOPMENT mode, no tokens: anyone may post" if settings.dev_mode else \
        f"{len(settings.tokens.devices)} device token(s)"
    announce(f"collector listening on {settings.url} (db {settings.db}, {mode})")
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
        app = create_app(settings)
        self._sock = bind_socket(settings.host, settings.port)
        settings.port = self._sock.getsockname()[1]
        self.url = settings.url
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=2))
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    from fleet.cli import add_commands

    parser = argparse.ArgumentParser(prog="python -m fleet.collector", description="The defectkit collector.")
    add_commands(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except DefectkitError as exc:
        print(f"collector: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
