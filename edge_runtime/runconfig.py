"""Options of ``python -m edge_runtime run``: the flags, and how they go on top of the line's settings.

The line's ``runtime`` / ``drift`` / ``report`` sections (:mod:`edge_runtime.settings`) come from the verified
bundle manifest; an override file (``--settings-override``) and flags go on top of them, and the same layers go
on top of the next bundle's settings after an update.
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from edge_runtime.errors import UserInputError
from edge_runtime.settings import SettingsLayer
from edge_runtime.sources import SETTLE_MS
from edge_runtime.typedconf import field_default
from edge_runtime.wire_report import NAME_RE

@dataclass
class RunOptions:
    """Everything ``run`` needs; the CLI builds it from flags, tests and the bench build it directly.

    The one place of the run options' defaults (the CLI's flags default to None and take these). The line's
    settings are not here: they come from the verified bundle; ``settings_override`` (a JSON file) and
    ``overrides`` (``{"report": {"interval_s": 5}}``, what the flags set) go on top of them, in that order."""

    bundle: Optional[Path]
    public_key: Path
    source: str
    device_id: str
    out_dir: Path = Path("edge_out")
    state_dir: Optional[Path] = None  # default: <out_dir>/state
    collector: Optional[str] = None
    token: Optional[str] = None
    insecure_http: bool = False  # accept http:// to a host that is not loopback (the token travels in clear)
    ca_file: Optional[Path] = None  # verify the collector's https certificate against this CA only (else system CAs)
    backend: Optional[str] = None
    variant: Optional[str] = None  # run this variant of the bundle (fp32, ort-int8) instead of the timed choice
    threads: int = 2
    settings_override: Optional[Path] = None
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    watch: bool = False
    settle_ms: float = SETTLE_MS
    watch_after: str = "keep"
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9108  # -1 = no metrics server, 0 = any free port
    max_frames: Optional[int] = None
    update_poll_s: float = 5.0
    line: Optional[str] = None  # the box's line; default: the line of the bundle it runs
    targets_public_key: Optional[Path] = None  # the fleet's targets key: with --collector, the update channel is on
    hardware_target: Optional[str] = None  # onnx | x86 | arm; default: from the backend (paddlelite: this machine)
    max_bundle_mb: float = 1024.0  # the largest archive the box downloads (a larger signed length is refused)
    max_bundle_files: int = 4096  # members of an archive / entries of a bundle folder
    confirm_after_s: float = 300.0
    confirm_after_frames: int = 100
    max_crashes: int = 3
    save_ng: bool = True
    keep_days: int = 30
    selftest_all: bool = True
    uplink_interval_s: float = 5.0
    exit_flush_s: float = 2.0  # on the way out, how long the box keeps sending spooled items (the rest waits in the spool)
    capture_factory: Optional[Callable[..., Any]] = None  # a fake camera in tests; cv2.VideoCapture otherwise

    def __post_init__(self) -> None:
        if not NAME_RE.fullmatch(str(self.device_id)):
            raise UserInputError(f"device id {self.device_id!r} is not usable: use 1-64 letters, digits, '.', '_' or '-'")
        if self.collector and not self.token:
            raise UserInputError("--collector needs the device's token: pass --token-file FILE")
        if self.collector:
            from edge_runtime.uplink import collector_tls

            collector_tls(self.collector, insecure_http=self.insecure_http, ca_file=self.ca_file)  # refuses at start
        elif self.ca_file is not None or self.insecure_http:
            raise UserInputError("--ca-file and --insecure-http are about --collector: give --collector URL")
        if self.threads < 1:
            raise UserInputError(f"threads must be at least 1, got {self.threads}")
        if self.targets_public_key is not None and not self.collector:
            raise UserInputError("--targets-public-key is for the update channel of --collector: give --collector URL")
        if self.line is not None and not NAME_RE.fullmatch(str(self.line)):
            raise UserInputError(f"line {self.line!r} is not usable: use 1-64 letters, digits, '.', '_' or '-'")
        if self.hardware_target is None:
            self.hardware_target = _default_hardware_target(self.backend)
        if self.hardware_target not in ("onnx", "x86", "arm"):
            raise UserInputError(f"hardware target {self.hardware_target!r} is not one of onnx, x86, arm")
        if not self.max_bundle_mb > 0 or self.max_bundle_files < 1:
            raise UserInputError("--max-bundle-mb and --max-bundle-files must be positive")
        self.out_dir = Path(self.out_dir)
        self.state_dir = Path(self.state_dir) if self.state_dir else self.out_dir / "state"
        # read and check the override layers now: an unknown key stops the start before any bundle is loaded
        layers = [SettingsLayer.load(self.settings_override)] if self.settings_override else []
        if self.overrides:
            layers.append(SettingsLayer.checked(self.overrides, "command line"))
        self.settings_layers: tuple[SettingsLayer, ...] = tuple(layers)

    @property
    def archive_limits_download(self) -> int:
        """The cap on a signed target's length (bytes)."""
        return int(self.max_bundle_mb * 2**20)

    @property
    def archive_limits(self):
        """Caps on what a bundle may unpack to: --max-bundle-files members, twice --max-bundle-mb."""
        from edge_runtime.bundle import ArchiveLimits

        return ArchiveLimits(max_members=self.max_bundle_files, max_unpacked_bytes=2 * self.archive_limits_download)


def _default_hardware_target(backend: Optional[str]) -> str:
    """``onnx`` unless the box runs Paddle Lite: then ``arm`` or ``x86`` by this machine."""
    if backend == "paddlelite":
        import platform

        return "arm" if platform.machine().lower() in ("aarch64", "arm64", "armv7l", "armv8l") else "x86"
    return "onnx"


RUN_DEFAULTS = {f.name: field_default(f) for f in fields(RunOptions) if f.default is not MISSING or f.default_factory is not MISSING}


def read_token(path: Path) -> str:
    """The device token from its file (one line); the file should be readable by the service user only."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UserInputError(f"token file {path} cannot be read ({exc.strerror}); give --token-file FILE") from None
    if not token or any(ch.isspace() for ch in token):
        raise UserInputError(f"token file {path} must hold one token on one line (no spaces)")
    return token


def _d(name: str) -> str:
    return f"(default: {RUN_DEFAULTS[name]})"


def add_run_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``python -m edge_runtime run``; every default is RunOptions' (flags default to None)."""
    a = parser.add_argument
    a("--bundle", type=Path, default=None,
      help="signed bundle (directory or .tar.gz); after an update the installed one in --state-dir runs instead")
    a("--public-key", type=Path, required=True, help="the signer's Ed25519 public key (.pub.pem)")
    a("--source", required=True, help="folder of images, video file, camera index (0) or stream URL (rtsp://...)")
    a("--watch", action="store_true", default=None, help="keep watching the --source folder for new images")
    a("--settle-ms", type=float, default=None,
      help=f"watched folder: a file is read after its size is stable this long {_d('settle_ms')}")
    a("--watch-after", choices=("keep", "delete", "move"), default=None,
      help=f"watched folder: what to do with a file once read (move = into <folder>/done) {_d('watch_after')}")
    a("--device-id", required=True, help="this box's id (letters, digits, . _ -)")
    a("--collector", default=None, metavar="URL", help="collector base URL; without it reports stay in the spool")
    a("--token-file", type=Path, default=None, help="file holding this device's bearer token")
    a("--ca-file", type=Path, default=None, metavar="PEM",
      help="verify the https:// collector's certificate against this CA (default: the system's CAs)")
    a("--insecure-http", action="store_true", default=None,
      help="accept an http:// collector that is not on loopback (the token and reports travel in clear)")
    a("--out", type=Path, default=None, help=f"outputs: predictions/, ng/, summary/ {_d('out_dir')}")
    a("--state-dir", type=Path, default=None, help="installed bundles, update inbox, spool (default: OUT/state)")
    a("--backend", default=None, help="force a backend (onnxruntime, paddlelite, paddle); default: by bundle and install")
    a("--variant", default=None, metavar="NAME",
      help="run this variant of the bundle (e.g. fp32, ort-int8) when it passes its self-test; default: each "
      "variant is timed on this CPU at install and the fastest runs, never one slower than fp32")
    a("--threads", type=int, default=None, help=f"inference threads {_d('threads')}")
    a("--settings-override", type=Path, default=None, metavar="JSON_FILE",
      help='on top of the bundle\'s line settings: any subset of {"runtime": {...}, "drift": {...}, "report": {...}}')
    a("--score-threshold", type=float, default=None, help="override runtime.score_threshold (over the bundle's)")
    a("--report-interval", type=float, default=None, help="override report.interval_s (seconds)")
    a("--spool-max-mb", type=float, default=None, help="override report.spool_max_mb")
    a("--metrics-host", default=None, help=f"address of /healthz and /metrics {_d('metrics_host')}")
    a("--metrics-port", type=int, default=None,
      help=f"port of /healthz and /metrics; 0 = any free, -1 = off {_d('metrics_port')}")
    a("--max-frames", type=int, default=None, help="stop after this many frames (tests, benchmarks)")
    a("--exit-flush-seconds", type=float, default=None,
      help=f"on the way out, keep sending spooled reports this long; what is left stays spooled for the next start "
      f"{_d('exit_flush_s')}")
    a("--targets-public-key", type=Path, default=None,
      help="the fleet's targets public key (.pub.pem; the collector's --targets-key pair, not the bundle signer's): "
      "with --collector, the box polls /api/v1/devices/ID/target for signed target metadata and installs what it "
      "names (both signatures checked); without it, no updates from the collector")
    a("--line", default=None, help="this box's line: updates for another line are refused (default: the line of the "
      "bundle it runs)")
    a("--hardware-target", choices=("onnx", "x86", "arm"), default=None,
      help="the artifact this box takes (default: onnx; paddlelite: arm or x86 by this machine)")
    a("--max-bundle-mb", type=float, default=None,
      help=f"largest bundle archive taken; a larger signed length is refused; twice it unpacked {_d('max_bundle_mb')}")
    a("--max-bundle-files", type=int, default=None,
      help=f"most members of a bundle archive or folder {_d('max_bundle_files')}")
    a("--update-poll", type=float, default=None,
      help=f"seconds between polls of the target route and looks into the update inbox {_d('update_poll_s')}")
    a("--update-url", default=None, help=argparse.SUPPRESS)  # gone (its /api/v1/bundles/latest is 410): warned, ignored
    a("--no-ng-images", action="store_true", default=None, help="do not save annotated NG images")
    a("--keep-days", type=int, default=None, help=f"days of predictions, NG images and summaries kept {_d('keep_days')}")
    return parser


def options_from_args(args: argparse.Namespace) -> RunOptions:
    """Flags -> RunOptions: a flag not given keeps RunOptions' default; the settings flags become the top layer
    (bundle manifest < --settings-override file < flags, resolved when a bundle is loaded)."""
    flags = SettingsLayer.flags(runtime={"score_threshold": args.score_threshold},
                                report={"interval_s": args.report_interval, "spool_max_mb": args.spool_max_mb})
    given = {
        "out_dir": args.out, "state_dir": args.state_dir, "collector": args.collector, "backend": args.backend,
        "insecure_http": args.insecure_http, "ca_file": args.ca_file,
        "threads": args.threads, "variant": args.variant, "watch": args.watch, "settle_ms": args.settle_ms, "watch_after": args.watch_after,
        "metrics_host": args.metrics_host, "metrics_port": args.metrics_port, "max_frames": args.max_frames,
        "exit_flush_s": args.exit_flush_seconds,
        "update_poll_s": args.update_poll, "keep_days": args.keep_days, "line": args.line,
        "targets_public_key": args.targets_public_key, "hardware_target": args.hardware_target,
        "max_bundle_mb": args.max_bundle_mb, "max_bundle_files": args.max_bundle_files,
        "save_ng": False if args.no_ng_images else None, "settings_override": args.settings_override,
    }
    if getattr(args, "update_url", None):
        import logging

        logging.getLogger("defectkit.run").warning(
            "--update-url is gone and ignored (the collector answers 410 there): updates come from the target route "
            "of --collector; give --targets-public-key FILE")
    return RunOptions(
        bundle=args.bundle, public_key=args.public_key, source=args.source, device_id=args.device_id,
        token=read_token(args.token_file) if args.token_file else None, overrides=flags.sections,
        **{k: v for k, v in given.items() if v is not None},
    )
