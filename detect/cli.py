"""CLI verbs ``defectkit train | augment-preview | eval | export | migrate-run``: parse, then call the functions
the tests call.

Settings resolve as defaults < line spec < command line: each verb builds its command-line layer here
(``{"train": {"lr": 0.003}}``) and puts it on the spec once, with ``LineSpec.with_cli``. Common settings have
their own flag; any setting can be given as ``--set section.key=value`` (``--set key=value`` means the train
section; values parsed with ast.literal_eval). A flag not given is None: the table and the line spec decide.
Later verbs (``eval``, ``export`` with ``--run``) read the run's settings.yaml, not the spec file again.
"""
from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path
from typing import Any, Callable

from edge_runtime.errors import ConfigError, UserInputError

# flag -> train setting (the same names as in detect/defaults.yaml)
TRAIN_FLAGS = {"epochs": int, "batch_size": int, "lr": float, "patience": int, "freeze": str,
               "time_budget_min": float, "device": str, "pretrained": str, "seed": int, "workers": int}


def register(subparsers) -> None:
    tr = subparsers.add_parser("train", help="fine-tune PP-YOLOE+ on a line (runs/<line>/<run>/)")
    tr.add_argument("spec", type=Path, nargs="?",
                    help="line spec YAML (lines/<line>.yaml); with --resume optional (the run recorded it)")
    tr.add_argument("--name", help="run name (default train-YYYYmmdd-HHMMSS)")
    tr.add_argument("--runs", type=Path, default=Path("runs"), help="runs folder (default ./runs)")
    tr.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run exactly")
    for flag, typ in TRAIN_FLAGS.items():
        tr.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=typ, help=f"train.{flag} (line spec default)")
    tr.add_argument("--set", action="append", default=[], metavar="[SECTION.]KEY=VALUE",
                    help="any other setting, e.g. --set mosaic=0.5 or --set export.nms_iou=0.5 (repeatable)")
    tr.set_defaults(func=_train)

    ap = subparsers.add_parser("augment-preview", help="PNG grid of augmented training samples with their boxes")
    ap.add_argument("spec", type=Path, help="line spec YAML")
    ap.add_argument("--out", type=Path, default=Path("augment_preview.png"), help="PNG file (augment_preview.png)")
    ap.add_argument("-n", type=int, default=16, help="number of samples (16)")
    ap.add_argument("--epoch", type=int, default=0, help="which epoch's augmentations to show (0)")
    ap.add_argument("--set", action="append", default=[], metavar="[SECTION.]KEY=VALUE",
                    help="train settings to preview, e.g. --set mosaic=1.0 (repeatable)")
    ap.set_defaults(func=_augment_preview)

    ev = subparsers.add_parser("eval", help="COCO mAP50-95, mAP50 and per-class AP of weights on a split")
    ev.add_argument("spec", type=Path, nargs="?",
                    help="line spec YAML (with --run optional: the run's settings.yaml is used, a spec is compared)")
    ev.add_argument("--weights", type=Path, help="a .pdparams file (default: --run's best weights)")
    ev.add_argument("--run", type=Path, help="a run folder runs/<line>/<run>")
    ev.add_argument("--split", choices=("val", "train"), default="val")
    ev.add_argument("--out", type=Path, help="folder for bbox.json and eval.json (default <run>/eval/<split>)")
    ev.set_defaults(func=_eval)

    ex = subparsers.add_parser("export", help="paddle inference (NMS / no NMS) and ONNX, with deploy.json")
    ex.add_argument("spec", type=Path, nargs="?",
                    help="line spec YAML: required with --weights; with --run optional (the run's settings.yaml "
                         "is used, a spec given as well is only compared and its differences printed)")
    ex.add_argument("--run", type=Path, help="a run folder (exports its best weights into <run>/export)")
    ex.add_argument("--weights", type=Path, help="a .pdparams file instead of --run")
    ex.add_argument("--out", type=Path, help="export folder (default <run>/export)")
    ex.add_argument("--formats", help="comma-separated subset of paddle,paddle_nonms,onnx,onnx_nonms")
    ex.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs paddle.inference check")
    ex.set_defaults(func=_export)

    mg = subparsers.add_parser("migrate-run", help="write settings.yaml for a run made before runs recorded it "
                                                   "(from its config.yaml and line.yaml)")
    mg.add_argument("run", type=Path, help="a run folder runs/<line>/<run>")
    mg.set_defaults(func=_migrate_run)


def parse_sets(items: list[str], bare_section: Callable[[str], str] = lambda key: "train") -> dict[str, dict[str, Any]]:
    """``["mosaic=0.5", "export.nms_iou=0.5"]`` -> ``{"train": {"mosaic": 0.5}, "export": {"nms_iou": 0.5}}``.

    Values are Python literals (``ast.literal_eval``, never eval) or plain text (``freeze=backbone``); a key
    without a section goes to ``bare_section(key)``. Unknown sections and keys are refused when the layer is
    put on the spec ("did you mean")."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserInputError(f"--set expects [SECTION.]KEY=VALUE, got '{item}'.")
        section, dot, name = key.partition(".")
        if not dot:
            section, name = bare_section(key), key
        if not section or not name:
            raise UserInputError(f"--set expects [SECTION.]KEY=VALUE, got '{item}'.")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # plain text, e.g. freeze=backbone
        out.setdefault(section, {})[name] = value
    return out


def train_layer(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The command line's settings layer of ``defectkit train``: ``--set`` items, then the named flags."""
    layer = parse_sets(args.set)
    flags = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    if flags:
        layer.setdefault("train", {}).update(flags)
    return layer


def _load_spec(path: Path):
    from detect.linespec import LineSpec

    return LineSpec.load(path)


def _train(args: argparse.Namespace) -> int:
    from detect import train as training

    layer = train_layer(args)
    if args.resume:
        spec = _load_spec(args.spec) if args.spec else None
        result = training.resume(args.resume, layer, spec=spec)
    else:
        if args.spec is None:
            raise UserInputError("give the line spec: `defectkit train lines/<line>.yaml` (or --resume RUN_DIR).")
        spec = _load_spec(args.spec).with_cli(layer)
        run_dir = training.default_run_dir(spec, args.runs, args.name)
        result = training.train(spec, run_dir)
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

    spec = _load_spec(args.spec).with_cli(parse_sets(args.set))
    png = augment_preview(spec, args.out, n=args.n, epoch=args.epoch)
    print(f"augmented samples: {png}")
    return 0


def _weights_from(args: argparse.Namespace) -> Path:
    if args.weights:
        return args.weights
    if args.run:
        from detect.ppyoloe import RunPaths

        return RunPaths(args.run).best_weights
    raise UserInputError("give --run RUN_DIR or --weights FILE.pdparams.")


def spec_of(args: argparse.Namespace):
    """The spec a verb on trained weights uses: with ``--run`` the run's settings.yaml (a spec file given as
    well is only compared, its differences printed); with ``--weights`` alone the spec file."""
    if args.run:
        from detect.run_settings import spec_for_run

        return spec_for_run(args.run, args.spec)
    if args.spec is None:
        raise UserInputError("give --run RUN_DIR (its settings.yaml is the spec), or a line spec with --weights.")
    return _load_spec(args.spec)


def _eval(args: argparse.Namespace) -> int:
    from detect.evaluate import format_table
    from edge_runtime.fileio import atomic_write_json

    from detect.infer import evaluate_weights

    weights = _weights_from(args)
    spec = spec_of(args)
    ann = spec.paths.val if args.split == "val" else spec.paths.train
    out = args.out or (args.run / "eval" / args.split if args.run else weights.parent / "eval" / args.split)
    result = evaluate_weights(spec, weights, ann, out)
    print(format_table(result))
    atomic_write_json(out / "eval.json", {"weights": str(weights), "annotations": str(ann), **result.to_dict()})
    print(f"results: {out / 'eval.json'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from detect.export import export

    weights = _weights_from(args)
    spec = spec_of(args)
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


def _migrate_run(args: argparse.Namespace) -> int:
    from detect.run_settings import load_run_spec, migrate_legacy_run

    path = migrate_legacy_run(args.run)
    spec = load_run_spec(args.run)
    print(f"wrote {path} (line {spec.line}, {len(spec.classes)} classes, train.lr {spec.settings.train.lr}); "
          f"config.yaml and line.yaml are kept and no longer read")
    return 0


def verify_export(spec, export_dir: Path, max_images: int = 16):
    """ONNX Runtime vs paddle.inference on up to ``max_images`` validation images."""
    from detect.compare import compare_models

    coco = json.loads(spec.paths.val.read_text())
    images = [spec.paths.images / im["file_name"] for im in coco["images"][:max_images]]
    return compare_models(export_dir / "model.onnx", export_dir / "model.pdmodel", images,
                          backend_a="onnxruntime", backend_b="paddle")
