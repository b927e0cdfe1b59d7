"""``predict``: run a deployed model over a folder of images.

The same parser serves ``defectkit predict`` (via :func:`register`) and ``python -m edge_runtime
predict`` (via :func:`main`, which must not import the ``defectkit`` package: the edge box lacks the
trainer's dependencies). Settings resolve as: RuntimeSettings defaults < --runtime-config file < flags.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from edge_runtime.errors import DefectkitError

BACKEND_CHOICES = ("onnxruntime", "paddle", "paddlelite")


def add_predict_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``predict`` options; one definition for both entry points."""
    parser.add_argument("--model", required=True, type=Path,
                        help="model file (model.onnx, model.pdmodel, ...) with deploy.json beside it, or its directory")
    parser.add_argument("--source", required=True, type=Path, help="folder of images (searched recursively)")
    parser.add_argument("--out", type=Path, default=Path("preds.jsonl"), help="JSON-lines output (default: %(default)s)")
    parser.add_argument("--save-annotated", type=Path, default=None, metavar="DIR",
                        help="write annotated PNGs (boxes, labels, verdict) into DIR")
    parser.add_argument("--backend", default=None, metavar="NAME",
                        help=f"force a backend ({', '.join(BACKEND_CHOICES)}); default: by model format and what is installed")
    parser.add_argument("--threads", type=int, default=2, help="inference threads (default: %(default)s)")
    parser.add_argument("--score-threshold", type=float, default=None,
                        help="score from which a detection makes the part NG (default 0.5, or the runtime config)")
    parser.add_argument("--runtime-config", type=Path, default=None, metavar="JSON_FILE",
                        help='runtime settings: {"score_threshold", "class_thresholds", "min_area", "roi"}')
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the model file")
    parser.set_defaults(func=run_predict)
    return parser


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``predict`` verb to the kit's CLI."""
    parser = subparsers.add_parser(
        "predict",
        help="run a deployed model over a folder of images (JSON lines, OK/NG)",
        description="Run a deployed model (deploy.json beside it) over a folder of images; "
        "write one JSON line per image and print a summary.",
    )
    add_predict_arguments(parser)


def run_predict(args: argparse.Namespace) -> int:
    """Handler of ``predict``: returns 0; kit errors propagate to the CLI layer."""
    from edge_runtime.settings import RuntimeSettings
    from edge_runtime.predict import Detector, predict_folder

    cfg = RuntimeSettings.load(args.runtime_config) if args.runtime_config else RuntimeSettings()
    cfg = cfg.with_overrides(score_threshold=args.score_threshold)
    detector = Detector.from_model(args.model, backend=args.backend, threads=args.threads, verify=not args.no_verify)
    summary = predict_folder(detector, args.source, args.out, cfg, save_annotated=args.save_annotated)
    print(summary.line())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m edge_runtime", description="defectkit edge runtime")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    register(sub)
    from edge_runtime.run import register as register_run

    register_run(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edge_runtime``: a kit error becomes one line on stderr and its exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DefectkitError as exc:
        print(f"edge_runtime {args.verb}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"edge_runtime {args.verb}: interrupted", file=sys.stderr)
        return 130
