"""Run the collector: ``python -m fleet.collector serve --db PATH --port N --tokens FILE``.

Same verbs as ``defectkit collector ...``: the parser is :func:`fleet.cli.add_commands`. Imports go one way
only: this entry point imports ``fleet.cli`` and ``fleet.server``; neither imports this module.
``CollectorThread``, ``serve`` and ``bind_socket`` are re-exported from :mod:`fleet.server` for callers of
the older path.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from edge_runtime.errors import DefectkitError
from fleet.cli import add_commands
from fleet.server import CollectorThread, bind_socket, serve


def main(argv: Optional[Sequence[str]] = None) -> int:
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


__all__ = ["main", "CollectorThread", "bind_socket", "serve"]

if __name__ == "__main__":
    sys.exit(main())
