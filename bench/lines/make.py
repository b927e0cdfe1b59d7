"""Write one bench line: ``python -m bench.lines.make --line stone --out DIR [--train N --val N --seed S]``.

Runs in the bench's venv (scikit-image for line a). Prints one JSON line: the ``defectkit data import``
arguments for the written source (without ``--out``) and the classes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import stone, strip, weave

LINES = {"stone": stone, "strip": strip, "weave": weave}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--line", required=True, choices=sorted(LINES))
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--train", type=int, default=240)
    ap.add_argument("--val", type=int, default=80)
    ap.add_argument("--seed", type=int, default=20261130)
    args = ap.parse_args(argv)
    module = LINES[args.line]
    import_args = module.make(args.out, args.train, args.val, args.seed)
    print(json.dumps({"line": args.line, "classes": module.CLASSES, "import_args": import_args}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
