"""``defectkit retrain``: incremental retrain of a line from its current model (see :mod:`detect.retrain`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from detect.cli import parse_sets
from edge_runtime.errors import UserInputError

RETRAIN_FLAGS = {"epochs": int, "replay": float, "lr_factor": float, "freeze": str, "distill": float, "ewc": float}
EXIT_REFUSED = 6  # the retrained model forgot old classes (or did not learn a new one): kept, not fit to ship


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "retrain", help="retrain a line's model with new images / hard examples / new classes, without forgetting",
        description="Start from a finished run of the line (--from), add new data folders (--add, as made by "
                    "`defectkit data import`), optionally a line spec with new classes appended (--spec). The old "
                    "classes are checked on the parent's validation set: exit 6 if they got worse beyond "
                    "retrain.max_class_drop / retrain.max_map_drop.")
    p.add_argument("--from", dest="parent", type=Path, metavar="RUN_DIR", help="the line's current run (runs/<line>/<run>)")
    p.add_argument("--add", action="append", default=[], type=Path, metavar="DATA_DIR",
                   help="data folder with images/ and annotations/ (repeatable)")
    p.add_argument("--spec", type=Path, help="line spec with new classes appended / new settings (default: the parent's)")
    p.add_argument("--name", help="run name (default retrain-YYYYmmdd-HHMMSS, beside the parent)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted retrain exactly")
    for flag, typ in RETRAIN_FLAGS.items():
        p.add_argument(f"--{flag.replace('_', '-')}", dest=f"r_{flag}", type=typ, metavar=flag.upper(),
                       help=f"retrain.{flag} (line spec default)")
    p.add_argument("--set", action="append", default=[], metavar="[SECTION.]KEY=VALUE",
                   help="any setting, e.g. --set max_class_drop=2 --set batch_size=4 --set train.seed=3; a key "
                        "without a section is retrain.* if that section has it, else train.* (repeatable)")
    p.set_defaults(func=_retrain)
    lin = subparsers.add_parser(
        "lineage", help="what a model was trained on: data version, sources, reviews, parent models",
        description="Print a run's lineage: the data version its retrain trained on (content hashes of images and "
                    "annotations per source, duplicates, who reviewed hard examples where the export says so) and "
                    "its chain of parent models back to the line's first fine-tune.")
    lin.add_argument("run", type=Path, metavar="RUN_DIR")
    lin.add_argument("--json", action="store_true", help="the lineage record as JSON")
    lin.set_defaults(func=_lineage)


def _lineage(args: argparse.Namespace) -> int:
    from detect.retrain_lineage import describe, lineage_json

    if not (args.run / "settings.yaml").is_file():
        raise UserInputError(f"'{args.run}' is not a run of the kit (no settings.yaml): give runs/<line>/<run>.")
    print(lineage_json(args.run) if args.json else describe(args.run))
    return 0


def retrain_layer(args: argparse.Namespace) -> dict[str, dict]:
    """The command line's settings layer of ``defectkit retrain``: ``--set`` items, then the named flags."""
    from detect.settings import field_names

    retrain_keys = set(field_names("retrain"))
    layer = parse_sets(args.set, bare_section=lambda key: "retrain" if key in retrain_keys else "train")
    flags = {k: getattr(args, f"r_{k}") for k in RETRAIN_FLAGS if getattr(args, f"r_{k}") is not None}
    if flags:
        layer.setdefault("retrain", {}).update(flags)
    return layer


def _retrain(args: argparse.Namespace) -> int:
    from detect.linespec import LineSpec
    from detect.retrain import resume_retrain, retrain

    layer = retrain_layer(args)
    if args.resume:
        result = resume_retrain(args.resume, layer)
    else:
        if args.parent is None:
            raise UserInputError("give --from RUN_DIR (the line's current run) and at least one --add DATA_DIR.")
        spec = LineSpec.load(args.spec) if args.spec else None
        run_dir = args.parent.parent / args.name if args.name else None
        result = retrain(args.parent, args.add, spec, run_dir, layer)
    m = result.metrics
    print(f"run {result.run.root}: mAP50-95 {m['val']['map50_95']:.3f} on the merged val set; {result.verdict.line()}")
    if not result.verdict.passed:
        print("refused: `defectkit bundle` will not ship this run. Figures: " + str(result.run.root / "retrain.md"))
        return EXIT_REFUSED
    return 0
