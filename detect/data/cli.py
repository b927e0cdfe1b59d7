"""CLI verbs for line data: ``defectkit synth`` and ``defectkit data import|check|stats|split``.

Handlers only parse arguments and call the library functions the tests call; modules are imported
inside the handlers so ``defectkit --help`` stays fast.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from edge_runtime.errors import UserInputError


def register(subparsers) -> None:
    p = subparsers.add_parser("synth", help="generate a synthetic PCB line (PKU-Market-PCB defect classes)")
    p.add_argument("--out", required=True, type=Path, help="output folder (normalised COCO layout + line spec)")
    p.add_argument("--line", default="pcb-demo", help="line id (default pcb-demo)")
    p.add_argument("--count", type=int, default=300, help="number of boards (default 300)")
    p.add_argument("--size", type=int, nargs=2, default=(320, 320), metavar=("W", "H"), help="image size (320 320)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    p.add_argument("--format", dest="image_format", choices=("jpg", "png"), default="jpg", help="image format")
    p.add_argument("--defect-free", type=float, default=0.12, help="share of boards without defects (0.12)")
    p.add_argument("--val", type=float, help="validation share of the split (default: data.val_fraction)")
    _base_flags(p)
    p.set_defaults(func=_synth)

    data = subparsers.add_parser("data", help="import, check, split and describe a line's data set")
    sub = data.add_subparsers(dest="data_verb", metavar="ACTION")
    sub.required = True

    imp = sub.add_parser("import", help="convert COCO / VOC / YOLO / LabelMe labels into the kit's layout")
    imp.add_argument("src", type=Path, nargs="+", metavar="SRC",
                     help="folder (VOC, YOLO, LabelMe) or COCO JSON file / folder; two sources = your own "
                          "train and val split (same as SRC --val-from VAL)")
    imp.add_argument("--format", dest="src_format", required=True, choices=("coco", "voc", "yolo", "labelme"))
    imp.add_argument("--classes", help="comma-separated class names in contract order")
    imp.add_argument("--spec", type=Path, help="line spec whose classes to use (instead of --classes)")
    imp.add_argument("--line", help="line id of the line spec written to OUT (default: the folder name)")
    imp.add_argument("--out", required=True, type=Path, help="output folder")
    imp.add_argument("--images", type=Path, help="image folder (COCO: default beside the JSON)")
    imp.add_argument("--drop-unknown", action="store_true", help="drop boxes of classes not in the list")
    imp.add_argument("--val", type=float, help="validation share of the split (default: data.val_fraction)")
    imp.add_argument("--seed", type=int, help="split seed (default: data.split_seed)")
    imp.add_argument("--val-from", type=Path, metavar="FILE_OR_FOLDER",
                     help="your own validation split: a source in the same format (COCO file/folder, VOC, YOLO or "
                          "LabelMe folder), or a .txt listing SRC's validation images (names or stems, one a line)")
    _base_flags(imp)
    imp.set_defaults(func=_import)

    chk = sub.add_parser("check", help="report every fault of a data set (exit code 2 if any)")
    chk.add_argument("target", type=Path, help="line spec YAML, data set folder, or COCO JSON file")
    chk.add_argument("--fix", type=Path, metavar="OUT", help="write a repaired copy into OUT")
    chk.set_defaults(func=_check)

    st = sub.add_parser("stats", help="per-class counts, box and image sizes (text and PNG)")
    st.add_argument("target", type=Path, help="line spec YAML, data set folder, or COCO JSON file")
    st.add_argument("--out", type=Path, help="PNG file for the histograms")
    st.set_defaults(func=_stats)

    sp = sub.add_parser("split", help="stratified train/val split of annotations/all.json")
    sp.add_argument("target", type=Path, help="line spec YAML or data set folder")
    sp.add_argument("--val", type=float, help="validation share (default: the line spec's data.val_fraction)")
    sp.add_argument("--seed", type=int, help="split seed (default: the line spec's data.split_seed)")
    sp.set_defaults(func=_split)


def _base_flags(p) -> None:
    """What the written line spec starts from: the kit's shipped base model unless told otherwise."""
    from detect.linespec import MODEL_SIZES

    p.add_argument("--model-size", choices=MODEL_SIZES,
                   help="model size of the line spec (default: the shipped base's, tiny)")
    p.add_argument("--image-size", type=int, help="network input size (default: the shipped base's, 320; synth: "
                                                  "the frame size)")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                   help="do not start from the shipped base weights (train.pretrained stays empty)")


def _synth(args: argparse.Namespace) -> int:
    from .synth import generate_line

    spec = generate_line(
        args.out, line=args.line, count=args.count, size=tuple(args.size), seed=args.seed,
        defect_free_fraction=args.defect_free, val_fraction=args.val, image_format=args.image_format,
        image_size=args.image_size, model_size=args.model_size, pretrained=args.pretrained,
    )
    print(spec.source)
    return 0


def _import(args: argparse.Namespace) -> int:
    from .importers import import_dataset, resolve_classes

    if len(args.src) > 2 or (len(args.src) == 2 and args.val_from):
        raise UserInputError("data import takes one source, or two (train and val): not more, and not two "
                             "sources with --val-from.")
    src, val_from = args.src[0], (args.src[1] if len(args.src) == 2 else args.val_from)
    if val_from is not None and (args.val is not None or args.seed is not None):
        raise UserInputError("--val and --seed split the data; with your own validation split leave them out.")
    classes, base = resolve_classes(args.classes, args.spec, args.src_format, src)
    spec = import_dataset(
        args.src_format, src, classes, args.out, line=args.line, images_dir=args.images,
        drop_unknown=args.drop_unknown, val_fraction=args.val, seed=args.seed, base_spec=base,
        val_from=val_from, image_size=args.image_size, model_size=args.model_size, pretrained=args.pretrained,
    )
    print(spec.source)
    return 0


def _check(args: argparse.Namespace) -> int:
    from .check import check_target
    from .fix import fix_dataset_target

    report = check_target(args.target)
    print(report.format())
    if args.fix:
        fixed = fix_dataset_target(args.target, args.fix)
        print(f"repaired copy written to {args.fix} ({len(fixed.changes)} change(s), see {fixed.report_path})")
    return 0 if report.ok else 2


def _stats(args: argparse.Namespace) -> int:
    from .stats import dataset_stats
    from .target import resolve_target

    target = resolve_target(args.target)
    stats = dataset_stats(target.main_ann, target.classes, input_size=target.spec.image_size if target.spec else None)
    print(stats.format())
    if args.out:
        stats.plot(args.out)
        print(f"histograms written to {args.out}")
    return 0


def _split(args: argparse.Namespace) -> int:
    from detect.linespec import LineSpec
    from detect.settings import DataSettings

    from .split import split_dataset

    target = args.target
    data = DataSettings()  # a bare folder: the table's defaults
    if target.suffix in (".yaml", ".yml"):
        spec = LineSpec.load(target)
        root, data = spec.paths.root, spec.settings.data
    elif target.is_dir():
        root = target
    else:
        raise UserInputError(f"data split: '{target}' is neither a line spec (.yaml) nor a data set folder.")
    train, val_path = split_dataset(root, data.val_fraction if args.val is None else args.val,
                                    data.split_seed if args.seed is None else args.seed)
    print(f"wrote {train} and {val_path}")
    return 0
