"""``defectkit collector serve|list|export-hard-examples``: run the collector, or read what its store holds.

This module builds the parser only; it imports the server (:mod:`fleet.server`) inside ``_serve`` and never
imports :mod:`fleet.collector` (the ``python -m`` entry point, which imports this one).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from edge_runtime.errors import UserInputError


def register(subparsers) -> None:
    p = subparsers.add_parser("collector", help="central collector of edge reports and hard examples",
                              description="The central collector: receives reports and hard examples from edge boxes.")
    add_commands(p)


def add_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="collector_cmd", metavar="COMMAND")
    sub.required = True
    s = sub.add_parser("serve", help="serve the collector HTTP API (prints its URL)")
    s.add_argument("--db", required=True, type=_db_location,
                   help="store: a SQLite file (created if missing, WAL) or postgresql://USER@HOST:PORT/NAME")
    s.add_argument("--host", default="127.0.0.1", help="listen address; non-loopback needs --tokens (default %(default)s)")
    s.add_argument("--port", default=8765, type=int, help="listen port; 0 = any free port (default %(default)s)")
    s.add_argument("--tokens", type=Path, help="token file (JSON/YAML): {admin: TOKEN, devices: {DEVICE_ID: TOKEN}}")
    s.add_argument("--data-dir", type=Path, help="hard-example images (default: <db stem>_hard_examples beside the db)")
    s.add_argument("--rate", type=float, default=5.0,
                   help="per-device posts per second sustained (token bucket; 429 + Retry-After past it; default %(default)s)")
    s.add_argument("--burst", type=int, default=120, help="per-device burst of posts (default %(default)s)")
    s.add_argument("--quota-mb-per-day", type=float, default=1024.0,
                   help="per-device hard-example bytes stored per 24 h (429 past it; default %(default)s MB)")
    s.add_argument("--max-report-kb", type=int, default=1024, help="largest report body (default %(default)s KB)")
    s.add_argument("--max-hard-example-kb", type=int, default=5120,
                   help="largest hard-example body, base64 image included (default %(default)s KB)")
    s.add_argument("--registry-dir", type=Path,
                   help="bundle archives and the trusted bundle key (default: <db stem>_registry beside the db)")
    s.add_argument("--targets-key", type=Path,
                   help="Ed25519 private key (PEM, 'defectkit keys init') that signs target metadata for the boxes")
    s.add_argument("--target-expiry", default="1d", help="target metadata lifetime (default %(default)s)")
    s.add_argument("--rollout-interval", default="60s",
                   help="how often running rollouts are evaluated (default %(default)s)")
    s.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM)")
    s.add_argument("--tls-key", type=Path, help="private key of --tls-cert (PEM)")
    s.add_argument("--tls-client-ca", type=Path, help="require client certificates signed by this CA (PEM)")
    s.add_argument("--server-stack", choices=("auto", "asyncio"), default="auto",
                   help="event loop and HTTP parser: auto = uvloop + httptools when installed, asyncio = asyncio + "
                        "h11 (default %(default)s)")
    s.set_defaults(func=_serve)
    m = sub.add_parser("migrate", help="create the store or bring it to the current schema (Alembic), then exit")
    m.add_argument("--db", required=True, type=_db_location, help="SQLite file or postgresql:// URL")
    m.set_defaults(func=_migrate)
    ls = sub.add_parser("list", help="list what the store holds (reads the db directly)")
    ls.add_argument("--db", required=True, type=_db_location, help="the collector's store (SQLite file or postgresql:// URL)")
    ls.add_argument("--what", choices=("reports", "hard-examples", "devices"), default="reports")
    ls.add_argument("--line", help="only this line")
    ls.add_argument("--device", help="only this device")
    ls.add_argument("--limit", type=int, default=20, help="newest N (default %(default)s)")
    ls.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    ls.set_defaults(func=_list)
    ex = sub.add_parser("export-hard-examples",
                        help="hard examples of a line as a data folder with model pre-labels, for labelling and retrain")
    ex.add_argument("--db", required=True, type=_db_location, help="the collector's store (SQLite file or postgresql:// URL)")
    ex.add_argument("--line", required=True, help="the line whose hard examples to export")
    ex.add_argument("--out", required=True, type=Path, help="new data folder (images/ + annotations/all.json)")
    ex.add_argument("--classes", help="the line's classes in contract order, comma-separated (categories 1..K)")
    ex.add_argument("--device", help="only this device")
    ex.add_argument("--min-score", type=float, default=0.3, help="pre-label detections at or above (default %(default)s)")
    ex.set_defaults(func=_export_hard_examples)


def _serve(args: argparse.Namespace) -> int:
    from fleet.rollout import parse_duration
    from fleet.server import serve
    from fleet.settings import CollectorSettings

    settings = CollectorSettings(db=args.db, host=args.host, port=args.port, tokens_file=args.tokens,
                                 data_dir=args.data_dir, max_report_bytes=args.max_report_kb * 1024,
                                 max_hard_example_bytes=args.max_hard_example_kb * 1024,
                                 registry_dir=args.registry_dir, targets_key=args.targets_key,
                                 target_expiry_s=parse_duration(args.target_expiry),
                                 rollout_interval_s=parse_duration(args.rollout_interval),
                                 tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                                 rate_per_s=args.rate, burst=args.burst,
                                 quota_bytes_per_day=int(args.quota_mb_per_day * 2**20),
                                 server_stack=args.server_stack)
    serve(settings)
    return 0


def _db_location(text: str):
    from fleet.db import location

    return location(text)


def _migrate(args: argparse.Namespace) -> int:
    from fleet import db

    before = db.current_revision(args.db)
    after = db.migrate(args.db)
    print(f"store {db.describe(args.db)}: schema {before or 'empty'} -> {after}")
    return 0


def _export_hard_examples(args: argparse.Namespace) -> int:
    from fleet import db, store
    from fleet.labelling import export_hard_examples

    if not db.exists(args.db):
        raise UserInputError(f"collector store {args.db} does not exist; give the --db that 'collector serve' uses")
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else []
    with store.session(path=args.db) as conn:
        done = export_hard_examples(conn, line=args.line, out=args.out, classes=classes, min_score=args.min_score,
                                    device=args.device)
    if done.skipped:
        print(f"skipped {done.skipped} stored image(s) that do not decode")
    print(f"{done.images} hard examples, {done.boxes} pre-labelled boxes ({', '.join(done.classes) or 'no class'}) "
          f"-> {done.root}\nreview them in a labelling tool, then: defectkit retrain --from RUN --add {done.root}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from fleet import db, store

    if not db.exists(args.db):
        raise UserInputError(f"collector store {args.db} does not exist; give the --db that 'collector serve' uses")
    with store.session(path=args.db) as conn:
        if args.what == "reports":
            rows = store.list_reports(conn, line=args.line, device=args.device, limit=args.limit)
            cols = [("id", lambda r: r["id"]), ("device", lambda r: r["device_id"]), ("line", lambda r: r["line"]),
                    ("bundle", lambda r: r["bundle_version"]), ("window_end", lambda r: r["window"]["end"]),
                    ("frames", lambda r: r["counts"]["frames"]), ("ng", lambda r: r["counts"]["ng"]),
                    ("drift", lambda r: r["drift"]["state"]), ("alarm", lambda r: "ALARM" if r["alarm"] else "")]
            total = store.count_reports(conn, line=args.line, device=args.device)
        elif args.what == "hard-examples":
            rows = store.list_hard_examples(conn, line=args.line, device=args.device, limit=args.limit)
            cols = [("id", lambda r: r["id"]), ("device", lambda r: r["device_id"]), ("line", lambda r: r["line"]),
                    ("time", lambda r: r["time"]), ("max_score", lambda r: f"{r['max_score']:.3f}"),
                    ("image", lambda r: r["image_path"])]
            total = len(rows)
        else:
            rows = store.list_devices(conn)
            cols = [("device", lambda r: r["device_id"]), ("line", lambda r: r["line"] or ""),
                    ("reports", lambda r: r["reports"]), ("token", lambda r: "yes" if r["has_token"] else "no")]
            total = len(rows)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    table = [[name for name, _ in cols]] + [[str(f(r)) for _, f in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(f"{len(rows)} shown of {total} {args.what}")
    return 0
