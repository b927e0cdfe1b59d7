"""Collector settings and the token file, in one place that refuses insecure setups.

Token file (JSON or YAML)::

    admin: <token>                     # reads GET /api/v1/... lists
    devices:
      press-01: <token>                # plain, or
      press-02: sha256:<64 hex>        # the SHA-256 of the token, so the file holds no secret

A token is valid only for its own device. Without a token file the collector runs in development
mode (anyone may post and read) and refuses any host but loopback.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Union

from edge_runtime.errors import ConfigError
from edge_runtime.wire_report import NAME_RE

MIN_TOKEN_LEN = 16
_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_HINT = "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass
class Tokens:
    """Device id -> SHA-256 of its token, plus the admin token's hash (None = no admin access)."""

    devices: Dict[str, str] = field(default_factory=dict)
    admin: Optional[str] = None

    @classmethod
    def load(cls, path: str | Path) -> "Tokens":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"token file {path} cannot be read ({exc.strerror}); give --tokens FILE") from exc
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                raw = yaml.safe_load(text)
            else:
                raw = json.loads(text)
        except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError: both mean "fix the file"
            raise ConfigError(f"token file {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from exc
        if not isinstance(raw, dict) or not isinstance(raw.get("devices"), dict):
            raise ConfigError(f"token file {path} must map 'devices' to {{device_id: token}} (and may set 'admin')")
        unknown = sorted(set(raw) - {"devices", "admin"})
        if unknown:
            raise ConfigError(f"token file {path}: unknown keys {', '.join(unknown)}; expected 'devices' and 'admin'")
        devices = {}
        for dev, tok in raw["devices"].items():
            if not NAME_RE.match(str(dev)):
                raise ConfigError(f"token file {path}: device id {dev!r} must be 1-64 letters, digits, '.', '_' or '-'")
            devices[str(dev)] = cls._hash(path, f"device {dev!r}", tok)
        admin = cls._hash(path, "admin", raw["admin"]) if raw.get("admin") is not None else None
        return cls(devices=devices, admin=admin)

    @staticmethod
    def _hash(path: Path, who: str, tok: object) -> str:
        if not isinstance(tok, str):
            raise ConfigError(f"token file {path}: the token of {who} must be a string")
        if _HASH_RE.match(tok):
            return tok[len("sha256:"):]
        if len(tok) < MIN_TOKEN_LEN or any(ch.isspace() for ch in tok):
            raise ConfigError(f"token file {path}: the token of {who} is shorter than {MIN_TOKEN_LEN} characters "
                              f"or has spaces; {_HINT}")
        return token_hash(tok)

    def device_for(self, token: str) -> Optional[str]:
        """The device this token belongs to, compared in constant time; None if no device has it."""
        h = token_hash(token)
        found = None
        for dev, expected in self.devices.items():
            if hmac.compare_digest(h, expected):
                found = dev
        return found

    def is_admin(self, token: str) -> bool:
        return self.admin is not None and hmac.compare_digest(token_hash(token), self.admin)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class CollectorSettings:
    """Everything the collector needs; :meth:`check` refuses what would be unsafe or cannot work."""

    db: Union[Path, str]  # a SQLite file, or a postgresql:// URL (fleet.db)
    host: str = "127.0.0.1"
    port: int = 8765
    tokens_file: Optional[Path] = None
    data_dir: Optional[Path] = None
    max_report_bytes: int = 1 << 20
    max_hard_example_bytes: int = 5 << 20
    tokens: Optional[Tokens] = None
    registry_dir: Optional[Path] = None  # bundle archives (content-addressed) and the trusted bundle key
    max_bundle_bytes: int = 1 << 30
    targets_key: Optional[Path] = None  # Ed25519 private key (PEM) that signs target metadata
    target_expiry_s: float = 86400.0
    rollout_interval_s: float = 60.0
    tls_cert: Optional[Path] = None
    tls_key: Optional[Path] = None
    tls_client_ca: Optional[Path] = None
    rate_per_s: float = 5.0  # per-device token bucket over POSTs (reports and hard examples)
    burst: int = 120
    quota_bytes_per_day: int = 1 << 30  # per-device hard-example image bytes stored per 24 h
    max_json_depth: int = 8
    # uvicorn's event loop and HTTP parser: "auto" = uvloop + httptools when installed (the fleet extra installs
    # them), else asyncio + h11; "asyncio" forces the pure-Python pair (a fallback should the C ones misbehave)
    server_stack: str = "auto"

    def __post_init__(self) -> None:
        from fleet.db import is_url

        self.db = self.db if is_url(self.db) else Path(self.db)
        if self.data_dir is None:
            if is_url(self.db):
                raise ConfigError("with a database URL, give --data-dir (hard-example images, shared by every "
                                  "collector process on that database) and --registry-dir")
            self.data_dir = self.db.parent / f"{self.db.stem}_hard_examples"
        self.data_dir = Path(self.data_dir)
        self.registry_dir = Path(self.registry_dir) if self.registry_dir else default_registry_dir(self.db)
        for name in ("targets_key", "tls_cert", "tls_key", "tls_client_ca"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        if self.tokens_file is not None:
            self.tokens_file = Path(self.tokens_file)
            if self.tokens is None:
                self.tokens = Tokens.load(self.tokens_file)

    @property
    def dev_mode(self) -> bool:
        """No tokens: anyone may post and read (only allowed on loopback)."""
        return self.tokens is None

    def check(self) -> "CollectorSettings":
        if not (0 <= self.port <= 65535):
            raise ConfigError(f"collector port {self.port} is out of range 0-65535")
        if self.dev_mode and not is_loopback(self.host):
            raise ConfigError(f"refusing to serve on {self.host} without tokens: anyone on the network could post "
                              f"reports. Give --tokens FILE (device_id -> token) or bind to 127.0.0.1")
        if self.tokens is not None and not self.tokens.devices and not self._has_enrolments():
            raise ConfigError(f"token file {self.tokens_file} lists no devices and none is enrolled in {self.db}: "
                              f"no edge box could report (defectkit fleet enroll --line L --device D --db {self.db})")
        if self.rate_per_s <= 0 or self.burst < 1 or self.quota_bytes_per_day <= 0:
            raise ConfigError("--rate, --burst and --quota-mb-per-day must be positive")
        if self.max_report_bytes <= 0 or self.max_hard_example_bytes <= 0 or self.max_bundle_bytes <= 0:
            raise ConfigError("size limits must be positive")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("--tls-client-ca (client certificates) needs --tls-cert and --tls-key")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "targets_key"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ConfigError(f"--{name.replace('_', '-')} {path} does not exist")
        if self.target_expiry_s <= 0 or self.rollout_interval_s <= 0:
            raise ConfigError("--target-expiry and --rollout-interval must be positive durations")
        return self

    def _has_enrolments(self) -> bool:
        from fleet import db

        if not db.exists(self.db):
            return False
        try:
            with db.engine(self.db).connect() as c:
                from sqlalchemy import inspect, text

                if "enrolments" not in inspect(c).get_table_names():
                    return False
                return c.execute(text("SELECT COUNT(*) FROM enrolments WHERE revoked_at IS NULL")).scalar() > 0
        except Exception:  # an unreachable server or a broken file: create_app reports it with its cause
            return False

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"


def default_registry_dir(db: Union[Path, str]) -> Path:
    """``<db stem>_registry`` beside the store (bundle archives and the trusted bundle key)."""
    from fleet.db import is_url

    if is_url(db):
        raise ConfigError("with a database URL, give --registry-dir (bundle archives and the trusted key, shared "
                          "by every collector process on that database)")
    db = Path(db)
    return db.parent / f"{db.stem}_registry"
