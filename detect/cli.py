"""CLI verbs ``defectkit train | eval | export``: parse, then call the functions the tests call.

Settings resolve as defaults < line spec < command line. Common settings have their own flag;
any other ``train`` setting can be given as ``--set key=value`` (values parsed with ast.literal_eval).
"""
from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path
from typing import Any

from edge_runtime.errors import ConfigError, UserInputError

# flag -> train setting (the same names as in detect/defaults.yaml)
TRAIN_FLAGS = {"epochs": int, "batch_size": int, "lr": float, "patience": int, "freeze": str,
               "time_budget_min": float, "device": str, "pretrained": str, "seed": int, "workers": int}


def register(subparsers) -> None:
    tr = subparsers.add_parser("train", help="fine-tune PP-YOLOE+ on a line (runs/<line>/<run>/)")
    tr.add_argument("spec", type=Path, help="line spec YAML (lines/<line>.yaml)")
    tr.add_argument("--name", help="run name (default train-YYYYmmdd-HHMMSS)")
    tr.add_argument("--runs", type=Path, default=Path("runs"), help="runs folder (default ./runs)")
    tr.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run exactly")
    for flag, typ in TRAIN_FLAGS.items():
        tr.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=typ, help=f"train.{flag} (line spec default)")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other train setting, e.g. --set mosaic=0.5 (repeatable)")
    tr.set_defaults(func=_train)

    ap = subparsers.add_parser("augment-preview", help="PNG grid of augmented training samples with their boxes")
    ap.add_argument("spec", type=Path, help="line spec YAML")
    ap.add_argument("--out", type=Path, default=Path("augment_preview.png"), help="PNG file (augment_preview.png)")
    ap.add_argument("-n", type=int, default=16, help="number of samples (16)")
    ap.add_argument("--epoch", type=int, default=0, help="which epoch's augmentations to show (0)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="train settings to preview, e.g. --set mosaic=1.0 (repeatable)")
    ap.set_defaults(func=_augment_preview)

    ev = subparsers.add_parser("eval", help="COCO mAP50-95, mAP50 and per-class AP of weights on a split")
    ev.add_argument("spec", type=Path, help="line spec YAML")
    ev.add_argument("--weights", type=Path, help="a .pdparams file (default: --run's best weights)")
    ev.add_argument("--run", type=Path, help="a run folder runs/<line>/<run>")
    ev.add_argument("--split", choices=("val", "train"), default="val")
    ev.add_argument("--out", type=Path, help="folder for bbox.json and eval.json (default <run>/eval/<split>)")
    ev.set_defaults(func=_eval)

    ex = subparsers.add_parser("export", help="paddle inference (NMS / no NMS) and ONNX, with deploy.json")
    ex.add_argument("spec", type=Path, help="line spec YAML")
    ex.add_argument("--run", type=Path, help="a run folder (exports its best weights into <run>/export)")
    ex.add_argument("--weights", type=Path, help="a .pdparams file instead of --run")
    ex.add_argument("--out", type=Path, help="export folder (default <run>/export)")
    ex.add_argument("--formats", help="comma-separated subset of paddle,paddle_nonms,onnx,onnx_nonms")
    ex.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs paddle.inference check")
    ex.set_defaults(func=_export)


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["mosaic=0.5", "hsv=[0,0,0]"]`` -> ``{"mosaic": 0.5, "hsv": [0, 0, 0]}`` (no eval)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserInputError(f"--set expects KEY=VALUE, got '{item}'.")
        try:
            out[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key.strip()] = raw  # plain text, e.g. freeze=backbone
    return out


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    over = parse_sets(args.set)
    over.update({k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None})
    return over


def _load_spec(path: Path):
    from detect.linespec import LineSpec

    return LineSpec.load(path)


def _train(args: argparse.Namespace) -> int:
    from detect import train as training

    spec = _load_spec(args.spec)
    overrides = train_overrides(args)
    if args.resume:
        result = training.resume(args.resume, overrides, spec=spec)
    else:
        run_dir = training.default_run_dir(spec, args.runs, args.name)
        result = training.train(spec, run_dir, overrides)
    rank = training.process_rank()[0]
    if rank != 0:  # multi-GPU: only rank 0 evaluates and reports figures
        print(f"rank {rank}: {result.metrics.get('stop_reason', 'finished')}")
        return 0
    m = result.metrics
    print(f"run {result.run.root}: best mAP50-95 {m['val']['map50_95']:.3f}, mAP50 {m['val']['map50']:.3f} "
          f"(epoch {m['best_epoch']}); {m['stop_reason']}")
    print(f"metrics: {result.run.metrics}\ncurves:  {result.run.curves_png}")
    return 0


def _augment_preview(args: argparse.Namespace) -> int:
    from detect.augment_preview import augment_preview

    png = augment_preview(_load_spec(args.spec), args.out, n=args.n, overrides=parse_sets(args.set), epoch=args.epoch)
    print(f"augmented samples: {png}")
    return 0


def _weights_from(args: argparse.Namespace) -> Path:
    if args.weights:
        return args.weights
    if args.run:
        from detect.ppyoloe import RunPaths

        return RunPaths(args.run).best_weights
    raise UserInputError("give --run RUN_DIR or --weights FILE.pdparams.")


def _eval(args: argparse.Namespace) -> int:
    from detect.evaluate import format_table
    from edge_runtime.fileio import atomic_write_json

    from detect.infer import evaluate_weights

    spec = _load_spec(args.spec)
    weights = _weights_from(args)
    ann = spec.paths.val if args.split == "val" else spec.paths.train
    out = args.out or (args.run / "eval" / args.split if args.run else weights.parent / "eval" / args.split)
    result = evaluate_weights(spec, weights, ann, out)
    print(format_table(result))
    atomic_write_json(out / "eval.json", {"weights": str(weights), "annotations": str(ann), **result.to_dict()})
    print(f"results: {out / 'eval.json'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from detect.export import export

    spec = _load_spec(args.spec)
    weights = _weights_from(args)
    out = args.out or (args.run / "export" if args.run else weights.parent / "export")
    formats = [f.strip() for f in args.formats.split(",")] if args.formats else None
    result = export(spec, weights, out, formats)
    for name, path in result.files.items():
        print(f"{name:<13} {path}  ({result.seconds.get(name, 0):.1f} s)")
    print(f"deploy.json   {result.deploy_json}")
    if not args.no_verify and {"onnx", "paddle"} <= set(result.files):
        agreement = verify_export(spec, out)
        print(f"ONNX Runtime vs paddle.inference: {agreement.summary()}")
        if not agreement.ok():
            raise ConfigError(f"ONNX Runtime and paddle.inference disagree on the validation images: "
                              f"{agreement.summary()}. Do not deploy this export; report it with {out}.")
    return 0


def verify_export(spec, export_dir: Path, max_images: int = 16):
    """ONNX Runtime vs paddle.inference on up to ``max_images`` validation images."""
    from detect.compare import compare_models

    coco = json.loads(spec.paths.val.read_text())
    images = [spec.paths.images / im["file_name"] for im in coco["images"][:max_images]]
    return compare_models(export_dir / "model.onnx", export_dir / "model.pdmodel", images,
                          backend_a="onnxruntime", backend_b="paddle")
