"""A real PostgreSQL server for the tests: Debian's binaries, a fresh cluster in a temporary folder, loopback only.

``initdb`` into a new folder, ``pg_ctl start`` on a free 127.0.0.1 port with its socket in that folder, trust
authentication (nothing but this machine can reach it), ``pg_ctl stop`` at the end. PostgreSQL refuses to run
as root: as root the cluster belongs to the ``postgres`` user (made by Debian's postgresql package) and every
command runs through ``runuser -u postgres``. ``scripts/host_deps.sh`` installs the package.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import List

import pytest


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        raise RuntimeError("Debian's PostgreSQL server is not installed: bash scripts/host_deps.sh "
                           "(or apt-get install postgresql)")
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    def __init__(self) -> None:
        self.bin = _bindir()
        self.root = Path(tempfile.mkdtemp(prefix="defectkit-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        self.started = False

    def _run(self, args: List[str], **kw) -> subprocess.CompletedProcess:
        cmd = (["runuser", "-u", "postgres", "--"] if self.as_root else []) + args
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120, **kw)

    def start(self) -> "PgServer":
        self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                   "--no-sync"])
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
                f"-c max_connections=200 -c fsync=off -c shared_buffers=64MB")
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-o", opts,
                   "-w", "-t", "60", "start"])
        self.started = True
        return self

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_db(self, prefix: str = "t") -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.url(), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self, mode: str = "fast") -> None:
        if self.started:
            self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])
            self.started = False

    def start_again(self) -> None:
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
                f"-c max_connections=200 -c fsync=off")
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-o", opts,
                   "-w", "-t", "60", "start"])
        self.started = True

    def cleanup(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server():
    server = PgServer().start()
    yield server
    from fleet import db

    db.dispose_all()
    server.cleanup()
