"""``defectkit <verb>``: one CLI over the same functions the scripts and tests call.

Each verb lives in the package that owns it and registers its parser through a ``register(subparsers)``
function listed in :data:`VERB_MODULES` (an explicit table, no import side effects). Verb modules keep
heavy imports inside their functions, so ``defectkit --help`` starts in well under a second.
A kit error becomes one line on stderr and its exit code; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from edge_runtime.errors import DefectkitError

# Order here is the order in `defectkit --help`.
VERB_MODULES: tuple[str, ...] = (
    "defectkit.demo",
    "defectkit.fleet_demo",
    "detect.data.cli",
    "detect.cli",
    "detect.retrain_cli",
    "detect.pretrain",
    "compress.cli",
    "edge_runtime.cli",
    "fleet.cli",
    "fleet.ops_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="defectkit",
        description="Edge defect detection per production line: data, training, export, edge inference.",
    )
    parser.add_argument("--version", action="version", version=f"defectkit {_version()}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for name in VERB_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("defectkit")
    except Exception:  # not installed (running from a checkout)
        return "0+checkout"


# `defectkit bundle RUN --variant V` is the everyday form; argparse cannot mix a positional with the
# build/verify sub-commands, so a first word that is not one of them means `bundle run RUN`.
_BUNDLE_SUBCOMMANDS = {"build", "verify", "run", "-h", "--help"}


def _normalise(argv: Sequence[str]) -> list[str]:
    argv = list(argv)
    if len(argv) >= 2 and argv[0] == "bundle" and argv[1] not in _BUNDLE_SUBCOMMANDS:
        argv.insert(1, "run")
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_normalise(sys.argv[1:] if argv is None else argv))
    try:
        result = args.func(args)
    except DefectkitError as exc:
        print(f"defectkit {args.verb}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"defectkit {args.verb}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
