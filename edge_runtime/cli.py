"""``predict``: run a deployed model over a folder of images.

The same parser serves ``defectkit predict`` (via :func:`register`) and ``python -m edge_runtime
predict`` (via :func:`main`, which must not import the ``defectkit`` package: the edge box lacks the
trainer's dependencies). Settings resolve as: the bundle manifest's (runtime defaults for a bare export) <
--settings-override file < flags.
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
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", type=Path, default=None,
                      help="model file (model.onnx, model.pdmodel, ...) with deploy.json beside it, or its directory; "
                      "decides with the runtime defaults (an export carries no line settings)")
    what.add_argument("--bundle", type=Path, default=None,
                      help="signed bundle (directory or .tar.gz; needs --public-key): decides with the line's "
                      "settings from its verified manifest")
    parser.add_argument("--public-key", type=Path, default=None, help="the bundle signer's public key (.pub.pem)")
    parser.add_argument("--source", required=True, type=Path, help="folder of images (searched recursively)")
    parser.add_argument("--out", type=Path, default=Path("preds.jsonl"), help="JSON-lines output (default: %(default)s)")
    parser.add_argument("--save-annotated", type=Path, default=None, metavar="DIR",
                        help="write annotated PNGs (boxes, labels, verdict) into DIR")
    parser.add_argument("--backend", default=None, metavar="NAME",
                        help=f"force a backend ({', '.join(BACKEND_CHOICES)}); default: by model format and what is installed")
    parser.add_argument("--threads", type=int, default=None, help="inference threads (default: the runtime's)")
    parser.add_argument("--settings-override", type=Path, default=None, metavar="JSON_FILE",
                        help='on top of the line settings: any subset of {"runtime": {...}, "drift": {...}, "report": {...}} '
                        "(predict uses runtime)")
    parser.add_argument("--score-threshold", type=float, default=None,
                        help="override runtime.score_threshold (over the bundle's or the override file's)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the model file")
    parser.set_defaults(func=run_predict)
    return parser


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``predict`` verb to the kit's CLI."""
    parser = subparsers.add_parser(
        "predict",
        help="run a deployed model or a signed bundle over a folder of images (JSON lines, OK/NG)",
        description="Run a deployed model (deploy.json beside it) or a signed bundle over a folder of images; "
        "write one JSON line per image and print a summary.",
    )
    add_predict_arguments(parser)


def run_predict(args: argparse.Namespace) -> int:
    """Handler of ``predict``: returns 0; kit errors propagate to the CLI layer.

    Settings: the bundle manifest's (or the runtime defaults for a bare export) < --settings-override < flags."""
    import tempfile

    from edge_runtime.errors import UserInputError
    from edge_runtime.predict import Detector, predict_folder
    from edge_runtime.settings import BoxSettings, EffectiveSettings, SettingsLayer

    layers = [SettingsLayer.load(args.settings_override)] if args.settings_override else []
    layers.append(SettingsLayer.flags(runtime={"score_threshold": args.score_threshold}))
    threads = {} if args.threads is None else {"threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="defectkit-predict-") as tmp:
        if args.bundle is not None:
            from edge_runtime.bundle import load_public_key, verify_bundle
            from edge_runtime.selftest import bundle_detector, choose_model

            if args.public_key is None:
                raise UserInputError("--bundle needs --public-key KEY.pub.pem (the signer's key) to verify it")
            bundle = Path(args.bundle)
            manifest = verify_bundle(bundle, load_public_key(args.public_key),
                                     extract_to=None if bundle.is_dir() else Path(tmp) / "bundle")
            base, where = manifest.settings, f"bundle {manifest.line} {manifest.version}"
            backend, model = choose_model(manifest, args.backend)
            detector = bundle_detector(manifest, model, backend, **threads)
        else:
            base, where = BoxSettings(), "runtime defaults"
            detector = Detector.from_model(args.model, backend=args.backend, verify=not args.no_verify, **threads)
        runtime = EffectiveSettings.resolve(base, where, layers).settings.runtime
        summary = predict_folder(detector, args.source, args.out, runtime, save_annotated=args.save_annotated)
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
