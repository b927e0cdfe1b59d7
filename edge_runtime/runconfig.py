"""Options of ``python -m edge_runtime run``: the flags, and how they go on top of the line's settings.

The line's ``runtime`` / ``drift`` / ``report`` sections (:mod:`edge_runtime.settings`) come from the verified
bundle manifest; an override file and flags go on top of them.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

from edge_runtime.settings import BoxSettings
from edge_runtime.errors import UserInputError
from edge_runtime.wire_report import NAME_RE

@dataclass
class RunOptions:
    """Everything ``run`` needs; the CLI builds it from flags, tests and the bench build it directly."""

    bundle: Optional[Path]
    public_key: Path
    source: str
    device_id: str
    out_dir: Path = Path("edge_out")
    state_dir: Optional[Path] = None  # default: <out_dir>/state
    collector: Optional[str] = None
    token: Optional[str] = None
    backend: Optional[str] = None
    threads: int = 2
    settings: BoxSettings = field(default_factory=BoxSettings)
    watch: bool = False
    settle_ms: float = 300.0
    watch_after: str = "keep"
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9108  # -1 = no metrics server, 0 = any free port
    max_frames: Optional[int] = None
    update_poll_s: float = 5.0
    update_url: Optional[str] = None
    confirm_after_s: float = 300.0
    confirm_after_frames: int = 100
    max_crashes: int = 3
    save_ng: bool = True
    keep_days: int = 30
    selftest_all: bool = True
    uplink_interval_s: float = 5.0
    capture_factory: Optional[Callable[..., Any]] = None  # a fake camera in tests; cv2.VideoCapture otherwise

    def __post_init__(self) -> None:
        if not NAME_RE.match(str(self.device_id)):
            raise UserInputError(f"device id {self.device_id!r} is not usable: use 1-64 letters, digits, '.', '_' or '-'")
        if self.collector and not self.token:
            raise UserInputError("--collector needs the device's token: pass --token-file FILE")
        if self.threads < 1:
            raise UserInputError(f"threads must be at least 1, got {self.threads}")
        self.out_dir = Path(self.out_dir)
        self.state_dir = Path(self.state_dir) if self.state_dir else self.out_dir / "state"


def read_token(path: Path) -> str:
    """The device token from its file (one line); the file should be readable by the service user only."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UserInputError(f"token file {path} cannot be read ({exc.strerror}); give --token-file FILE") from None
    if not token or any(ch.isspace() for ch in token):
        raise UserInputError(f"token file {path} must hold one token on one line (no spaces)")
    return token


def add_run_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``python -m edge_runtime run``."""
    a = parser.add_argument
    a("--bundle", type=Path, default=None,
      help="signed bundle (directory or .tar.gz); after an update the installed one in --state-dir runs instead")
    a("--public-key", type=Path, required=True, help="the signer's Ed25519 public key (.pub.pem)")
    a("--source", required=True, help="folder of images, video file, camera index (0) or stream URL (rtsp://...)")
    a("--watch", action="store_true", help="keep watching the --source folder for new images")
    a("--settle-ms", type=float, default=300.0, help="watched folder: a file is read after its size is stable this long")
    a("--watch-after", choices=("keep", "delete", "move"), default="keep",
      help="watched folder: what to do with a file once read (move = into <folder>/done)")
    a("--device-id", required=True, help="this box's id (letters, digits, . _ -)")
    a("--collector", default=None, metavar="URL", help="collector base URL; without it reports stay in the spool")
    a("--token-file", type=Path, default=None, help="file holding this device's bearer token")
    a("--out", type=Path, default=Path("edge_out"), help="outputs: predictions/, ng/, summary/ (default: %(default)s)")
    a("--state-dir", type=Path, default=None, help="installed bundles, update inbox, spool (default: OUT/state)")
    a("--backend", default=None, help="force a backend (onnxruntime, paddlelite, paddle); default: by bundle and install")
    a("--threads", type=int, default=2, help="inference threads (default: %(default)s)")
    a("--settings", type=Path, default=None, metavar="JSON_FILE",
      help='line settings: {"runtime": {...}, "drift": {...}, "report": {...}} (sections of defaults.yaml)')
    a("--score-threshold", type=float, default=None, help="override runtime.score_threshold")
    a("--report-interval", type=float, default=None, help="override report.interval_s (seconds)")
    a("--spool-max-mb", type=float, default=None, help="override report.spool_max_mb")
    a("--metrics-host", default="127.0.0.1", help="address of /healthz and /metrics (default: %(default)s)")
    a("--metrics-port", type=int, default=9108, help="port of /healthz and /metrics; 0 = any free, -1 = off")
    a("--max-frames", type=int, default=None, help="stop after this many frames (tests, benchmarks)")
    a("--update-url", default=None, help="poll this URL for a new bundle archive (bearer token, ETag)")
    a("--update-poll", type=float, default=5.0, help="seconds between looks into the update inbox / URL")
    a("--no-ng-images", action="store_true", help="do not save annotated NG images")
    a("--keep-days", type=int, default=30, help="days of predictions, NG images and summaries kept")
    return parser


def options_from_args(args: argparse.Namespace) -> RunOptions:
    """Defaults < --settings file < flags, in one visible place."""
    settings = BoxSettings.load_overrides(args.settings, BoxSettings()) if args.settings else BoxSettings()
    settings = settings.with_overrides("runtime", score_threshold=args.score_threshold)
    settings = settings.with_overrides("report", interval_s=args.report_interval, spool_max_mb=args.spool_max_mb)
    token = read_token(args.token_file) if args.token_file else None
    return RunOptions(
        bundle=args.bundle, public_key=args.public_key, source=args.source, device_id=args.device_id,
        out_dir=args.out, state_dir=args.state_dir, collector=args.collector, token=token, backend=args.backend,
        threads=args.threads, settings=settings, watch=args.watch,
        settle_ms=args.settle_ms, watch_after=args.watch_after, metrics_host=args.metrics_host,
        metrics_port=args.metrics_port, max_frames=args.max_frames, update_poll_s=args.update_poll,
        update_url=args.update_url, save_ng=not args.no_ng_images, keep_days=args.keep_days,
    )
