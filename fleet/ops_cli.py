"""``defectkit registry|fleet|rollout``: the registry, enrolled devices and canary rollouts, on the store directly.

These read and write the collector's SQLite store (``--db``); a running collector sees every change at its
next request (it reads the store per request), so nothing needs a restart.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable, List, Sequence, Tuple

from edge_runtime.errors import UserInputError


def register(subparsers) -> None:
    _registry_parser(subparsers.add_parser("registry", help="per-line model registry: push, list, promote, rollback",
                                           description="Signed bundles per line, with lineage and state."))
    _fleet_parser(subparsers.add_parser("fleet", help="enrol, rotate, revoke and list edge devices",
                                        description="Devices bound to a line, with tags and a token each."))
    _rollout_parser(subparsers.add_parser("rollout", help="canary rollout of a version: start, status, stop",
                                          description="A canary group first; promotion or rollback from its reports."))


def _db(p: argparse.ArgumentParser) -> None:
    from fleet.db import location

    p.add_argument("--db", required=True, type=location, help="the collector's store: SQLite file or postgresql:// URL")


def _registry_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="registry_cmd", metavar="COMMAND")
    sub.required = True
    s = sub.add_parser("push", help="verify a signed bundle and register it as a candidate")
    s.add_argument("bundle", type=Path, help="the bundle .tar.gz")
    _db(s)
    s.add_argument("--public-key", type=Path, help="bundle public key (stored as the registry's trusted key on the "
                                                  "first push; later pushes must match it)")
    s.add_argument("--registry-dir", type=Path, help="archives (default: <db stem>_registry beside the db)")
    s.set_defaults(func=_push)
    s = sub.add_parser("list", help="versions of a line with their state")
    s.add_argument("line")
    _db(s)
    s.add_argument("--json", action="store_true", help="JSON lines")
    s.set_defaults(func=_list)
    s = sub.add_parser("show", help="one version: lineage, gate figures, state history")
    s.add_argument("line")
    s.add_argument("version")
    _db(s)
    s.set_defaults(func=_show)
    s = sub.add_parser("promote", help="make a version active on the whole line now")
    s.add_argument("line")
    s.add_argument("version")
    _db(s)
    s.set_defaults(func=_promote)
    s = sub.add_parser("rollback", help="back to a version that passed its gates and was active before")
    s.add_argument("line")
    s.add_argument("--to", help="that version (default: the most recently active earlier one)")
    _db(s)
    s.set_defaults(func=_rollback)


def _fleet_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="fleet_cmd", metavar="COMMAND")
    sub.required = True
    s = sub.add_parser("enroll", help="bind a device to a line; prints its token once")
    s.add_argument("--line", required=True)
    s.add_argument("--device", required=True)
    s.add_argument("--tag", action="append", default=[], help="KEY=VALUE, repeatable; target=onnx|x86|arm chooses "
                                                                "the artifact (default onnx)")
    _db(s)
    s.set_defaults(func=_enroll)
    for name, helptext, func in (("rotate", "a new token for a device (printed once); the old one stops at once",
                                  _rotate), ("revoke", "the device's token stops working at once", _revoke)):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--device", required=True)
        _db(s)
        s.set_defaults(func=func)
    s = sub.add_parser("list", help="enrolled devices")
    s.add_argument("--line", help="only this line")
    _db(s)
    s.add_argument("--json", action="store_true", help="JSON lines")
    s.set_defaults(func=_fleet_list)


def _rollout_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="rollout_cmd", metavar="COMMAND")
    sub.required = True
    s = sub.add_parser("start", help="canary a candidate version on part of the line")
    s.add_argument("line")
    s.add_argument("version")
    group = s.add_mutually_exclusive_group(required=True)
    group.add_argument("--canary", help="share of the line's devices, e.g. 10%% (at least one device)")
    group.add_argument("--devices", help="the canary devices, comma-separated")
    s.add_argument("--window", required=True, help="how long the canary must hold: 90s, 30m, 2h")
    s.add_argument("--ng-band", type=float, default=0.05, help="NG-rate band, absolute (default %(default)s)")
    s.add_argument("--ng-band-rel", type=float, default=2.0,
                   help="NG-rate band relative to the stable rate (default %(default)sx)")
    s.add_argument("--min-frames", type=int, default=20, help="canary frames before judging (default %(default)s)")
    _db(s)
    s.set_defaults(func=_rollout_start)
    s = sub.add_parser("status", help="evaluate the running rollout now and print every decision")
    s.add_argument("line")
    _db(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_rollout_status)
    s = sub.add_parser("stop", help="halt the running rollout (the canary version is retired)")
    s.add_argument("line")
    _db(s)
    s.set_defaults(func=_rollout_stop)


# --------------------------------------------------------------------------------------------------- helpers


def _session(args: argparse.Namespace, must_exist: bool = True):
    from fleet import store

    from fleet.db import exists

    if must_exist and not exists(args.db):
        raise UserInputError(f"store {args.db} does not exist; give the --db that 'collector serve' uses")
    return store.session(path=args.db)


def _when(ts: Any) -> str:
    return "" if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(ts)))


def _table(rows: Sequence[Any], cols: List[Tuple[str, Callable[[Any], Any]]]) -> None:
    table = [[name for name, _ in cols]] + [[str(f(r)) for _, f in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


# --------------------------------------------------------------------------------------------------- registry


def _push(args: argparse.Namespace) -> int:
    from fleet import registry
    from fleet.settings import default_registry_dir

    with _session(args, must_exist=False) as conn:
        res = registry.push(conn, archive=args.bundle, registry_dir=args.registry_dir or default_registry_dir(args.db),
                            public_key=args.public_key)
    state = "already registered (same archive): nothing changed" if res.duplicate else "registered as candidate"
    print(f"{res.line} {res.version}: {state}; sha256 {res.sha256}, {res.length} bytes")
    return 0


def _list(args: argparse.Namespace) -> int:
    from fleet import registry

    with _session(args) as conn:
        rows = registry.list_versions(conn, line=args.line)
    if not rows:
        raise UserInputError(f"line '{args.line}' has no version in the registry (defectkit registry push BUNDLE)")
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    _table(rows, [("version", lambda r: r["version"]), ("state", lambda r: r["state"]),
                  ("parent", lambda r: r["parent_version"] or ""), ("targets", lambda r: ",".join(r["hardware_targets"])),
                  ("pushed", lambda r: _when(r["pushed_at"])), ("active_since", lambda r: _when(r["activated_at"])),
                  ("sha256", lambda r: r["sha256"][:16])])
    return 0


def _show(args: argparse.Namespace) -> int:
    from fleet import registry

    with _session(args) as conn:
        v = registry.get_version(conn, line=args.line, version=args.version)
        evs = [e for e in registry.events(conn, line=args.line) if e["version"] == args.version]
    print(json.dumps({**v, "events": [{**e, "at": _when(e["at"])} for e in evs]}, indent=2, sort_keys=True))
    return 0


def _promote(args: argparse.Namespace) -> int:
    from fleet import registry

    with _session(args) as conn:
        prev = registry.promote(conn, line=args.line, version=args.version)
    print(f"{args.line} {args.version} is active" + (f" ({prev} retired)" if prev else ""))
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from fleet import registry

    with _session(args) as conn:
        now_active = registry.rollback(conn, line=args.line, to=args.to)
    print(f"{args.line} rolled back: {now_active} is active; boxes get it with rollback=true in their target metadata")
    return 0


# --------------------------------------------------------------------------------------------------- devices


def _enroll(args: argparse.Namespace) -> int:
    from fleet import devices

    tags = devices.parse_tags(args.tag)
    with _session(args, must_exist=False) as conn:
        token = devices.enroll(conn, line=args.line, device_id=args.device, tags=tags)
    print(f"enrolled {args.device} on line {args.line} (hardware target {tags.get('target', devices.DEFAULT_TARGET)})")
    print(f"token (shown once, only its salted hash is stored): {token}")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    from fleet import devices

    with _session(args) as conn:
        token = devices.rotate(conn, device_id=args.device)
    print(f"new token for {args.device} (shown once; the old one no longer works): {token}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from fleet import devices

    with _session(args) as conn:
        devices.revoke(conn, device_id=args.device)
    print(f"{args.device} revoked: its token is refused from the next request on")
    return 0


def _fleet_list(args: argparse.Namespace) -> int:
    from fleet import devices

    with _session(args) as conn:
        rows = [d.public() for d in devices.list_enrolled(conn, line=args.line)]
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    _table(rows, [("device", lambda r: r["device_id"]), ("line", lambda r: r["line"]),
                  ("target", lambda r: r["hardware_target"]),
                  ("tags", lambda r: ",".join(f"{k}={v}" for k, v in sorted(r["tags"].items()))),
                  ("state", lambda r: "revoked" if r["revoked_at"] else "active"),
                  ("last_target", lambda r: r["last_target"] or "")])
    print(f"{len(rows)} device(s)")
    return 0


# --------------------------------------------------------------------------------------------------- rollout


def _rollout_start(args: argparse.Namespace) -> int:
    from fleet import rollout

    policy = rollout.Policy(ng_band_abs=args.ng_band, ng_band_rel=args.ng_band_rel, min_frames=args.min_frames)
    explicit = [d.strip() for d in (args.devices or "").split(",") if d.strip()]
    with _session(args) as conn:
        r = rollout.start(conn, line=args.line, version=args.version, window_s=rollout.parse_duration(args.window),
                          percent=rollout.parse_canary(args.canary) if args.canary else None, devices=explicit,
                          policy=policy)
    print(f"rollout of {r['line']} {r['version']} started: canary {', '.join(r['canary'])}; stable on "
          f"{r['from_version']}; window {r['window_s']:g}s")
    return 0


def print_status(r: dict, decisions: Sequence[dict]) -> None:
    print(f"rollout {r['id']} of {r['line']} {r['version']} (from {r['from_version']}): {r['state']}"
          + (f" — {r['reason']}" if r.get("reason") else ""))
    print(f"canary: {', '.join(r['canary'])}; window {r['window_s']:g}s; started {_when(r['started_at'])}")
    for d in decisions:
        f = d["figures"]
        figs = ""
        if "canary_frames" in f:
            rate = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
            figs = (f" [canary ng {rate(f['canary_ng_rate'])} over {f['canary_frames']} frames, "
                    f"{f['baseline']} {rate(f['baseline_ng_rate'])} over {f['baseline_frames']}, band "
                    f"{rate(f['ng_band'])}; on new: {','.join(f['on_new_version']) or 'none'}]")
        print(f"  {_when(d['at'])}  {d['action']:<11} {d['reason']}{figs}")


def _rollout_status(args: argparse.Namespace) -> int:
    from fleet import rollout

    with _session(args) as conn:
        rollout.evaluate(conn, line=args.line)
        r = rollout.latest(conn, line=args.line)
        if r is None:
            raise UserInputError(f"line '{args.line}' has never had a rollout (defectkit rollout start ...)")
        ds = rollout.decisions(conn, rollout_id=r["id"])
    if args.json:
        print(json.dumps({"rollout": r, "decisions": ds}, indent=2, sort_keys=True))
    else:
        print_status(r, ds)
    return 0


def _rollout_stop(args: argparse.Namespace) -> int:
    from fleet import rollout

    with _session(args) as conn:
        r = rollout.stop(conn, line=args.line)
    print(f"rollout of {r['line']} {r['version']} stopped; {r['from_version']} stays active")
    return 0
