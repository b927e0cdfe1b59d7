"""``defectkit compress``, ``defectkit keys init`` and ``defectkit bundle RUN|build|verify``.

``defectkit bundle RUN --variant NAME`` is the engineer's verb (a bundle from gated variants of a run);
``bundle build`` is the low-level form that takes export directories and files explicitly.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from edge_runtime.errors import UserInputError


def register(subparsers) -> None:
    comp = subparsers.add_parser(
        "compress", help="prune | ptq | qat a run, gate every variant against its FP32 parent, tabulate",
        description="Make compressed variants of a training run, evaluate them on the line's validation set, "
                    "refuse those that lose accuracy (compress.max_map_drop, golden images) and write "
                    "<run>/compress/table.{md,csv,png}.")
    comp.add_argument("run", type=Path, help="a training run folder runs/<line>/<run>")
    comp.add_argument("--method", required=True, choices=("prune", "ptq", "qat"),
                      help="prune: structured filter pruning + fine-tune; ptq: PaddleSlim INT8 (Paddle/Lite) and "
                           "ONNX Runtime INT8; qat: quantization-aware training")
    comp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a compress.* setting of the run, e.g. --set prune_flops=0.3 --set ptq_algo=mse "
                           "(everything else comes from the run's settings.yaml)")
    comp.add_argument("--no-lite", action="store_true", help="skip the Paddle Lite .nb conversion (edge box)")
    comp.add_argument("--no-latency", action="store_true", help="skip the latency columns of the table")
    comp.set_defaults(func=_compress)

    keys = subparsers.add_parser("keys", help="make the Ed25519 key pair that signs bundles")
    ksub = keys.add_subparsers(dest="keys_cmd", metavar="CMD")
    ksub.required = True
    init = ksub.add_parser("init", help="write a new private key (0600) and its public key; never overwrites")
    init.add_argument("--dir", required=True, type=Path, help="directory for the key files")
    init.set_defaults(func=_keys_init)

    bundle = subparsers.add_parser("bundle", help="build or verify a signed, versioned bundle")
    bsub = bundle.add_subparsers(dest="bundle_cmd", metavar="CMD")
    bsub.required = True
    b = bsub.add_parser("build", help="write <out>/<line>/<version>/ and <version>.tar.gz, signed")
    b.add_argument("--out", required=True, type=Path, help="bundle store root")
    b.add_argument("--version", required=True, dest="bundle_version", help="new version (immutable)")
    b.add_argument("--parent-version", default=None, help="version this one replaces")
    b.add_argument("--deploy", required=True, action="append", type=Path,
                   help="export directory (or its deploy.json) whose models to ship; repeatable")
    b.add_argument("--key", required=True, type=Path, help="private signing key (defectkit keys init)")
    b.add_argument("--drift-reference", required=True, type=Path, help="drift_reference.json of the line")
    b.add_argument("--golden", action="append", default=[], metavar="IMAGE=EXPECTED.json",
                   help="a golden image and the parent's detections on it; repeatable")
    b.add_argument("--metrics", type=Path, help="JSON object of gate metrics (name -> number)")
    b.add_argument("--recipe", type=Path, help="JSON object describing the compression recipe")
    given = b.add_mutually_exclusive_group()
    given.add_argument("--run", type=Path, dest="settings_run", metavar="RUN",
                       help="take the runtime, drift and report settings from this training run's settings.yaml")
    given.add_argument("--settings-json", type=Path, metavar="FILE",
                       help="JSON object with any of the runtime, drift, report sections (over the table defaults)")
    b.set_defaults(func=_bundle_build)

    r = bsub.add_parser("run", help="(default form: `defectkit bundle RUN --variant NAME`) bundle gated variants of a run")
    r.add_argument("run", type=Path, help="a training run folder runs/<line>/<run> (after `defectkit compress`)")
    r.add_argument("--variant", action="append", default=None,
                   help="variant to ship (fp32, ort-int8, ptq-int8, prune-30, qat-int8, ...); repeatable. Default: "
                   "fp32 and every gate-passed ONNX Runtime variant (the box times them on its CPU, runs the fastest)")
    r.add_argument("--key", required=True, type=Path, help="private signing key (defectkit keys init)")
    r.add_argument("--out", type=Path, default=Path("bundles"), help="bundle store root (default ./bundles)")
    r.add_argument("--version", dest="bundle_version", help="new version (default: next major, e.g. 2.0.0)")
    r.add_argument("--parent-version", default=None, help="version this one replaces (default: the newest)")
    r.set_defaults(func=_bundle_from_run)

    v = bsub.add_parser("verify", help="check the signature and every checksum of a bundle (dir or .tar.gz)")
    v.add_argument("path", type=Path)
    v.add_argument("--public-key", required=True, type=Path, help="the signer's public key (.pub.pem)")
    v.set_defaults(func=_bundle_verify)


def _compress(args: argparse.Namespace) -> int:
    from compress.pipeline import compress_layer, compress_run, load_run
    from detect.cli import parse_sets

    spec, _ = load_run(args.run)
    layer = compress_layer(parse_sets(args.set, bare_section=lambda key: "compress"))
    spec = spec.with_cli(layer)  # the run's settings < this command line, once per command
    result = compress_run(args.run, args.method, spec, lite=not args.no_lite, latency=not args.no_latency)
    for msg in result.messages:
        print(msg)
    print(result.table.markdown.read_text())
    print(f"table: {result.table.markdown}  {result.table.csv}  {result.table.png}")
    refused = [v.name for v in result.variants if v.gate and not v.gate["passed"]]
    if refused:
        print(f"refused by the gate: {', '.join(refused)} (kept on disk for study; `defectkit bundle` will not ship them)")
    return 0


def _bundle_from_run(args: argparse.Namespace) -> int:
    from compress.bundle_from_run import bundle_from_run

    out = bundle_from_run(args.run, args.variant, args.out, args.key, args.bundle_version, args.parent_version)
    print(f"bundle {out}  and  {out.parent / (out.name + '.tar.gz')}")
    return 0


def _keys_init(args: argparse.Namespace) -> int:
    from compress.keys import init_keys

    pair = init_keys(args.dir)
    print(f"private key {pair.private} (keep it secret, mode 0600)")
    print(f"public key  {pair.public} (copy it to the edge boxes); key id {pair.key_id}")
    return 0


def _golden_pairs(items: list[str]) -> list[tuple[Path, Path]]:
    pairs = []
    for item in items:
        image, sep, expected = item.partition("=")
        if not sep or not image or not expected:
            raise UserInputError(f"--golden {item!r}: expected IMAGE=EXPECTED.json")
        pairs.append((Path(image), Path(expected)))
    return pairs


def _bundle_settings(args: argparse.Namespace, line: str, classes: list[str]):
    """The box settings of ``bundle build``: a run's, a JSON file's, or the table defaults (said so)."""
    from edge_runtime.settings import BoxSettings

    if args.settings_run is not None:
        from compress.bundle_from_run import box_settings
        from detect.run_settings import load_run_spec, settings_path

        spec = load_run_spec(args.settings_run)
        if (spec.line, list(spec.classes)) != (line, classes):
            raise UserInputError(f"--run {args.settings_run} is line {spec.line} with classes {spec.classes}; the "
                                 f"models are line {line} with {classes}: give the run they were trained in")
        return box_settings(spec, str(settings_path(args.settings_run)))
    if args.settings_json is not None:
        from compress.bundle import box_settings_from_json

        return box_settings_from_json(args.settings_json)
    print("note: no --run or --settings-json: the bundle carries the default runtime, drift and report settings "
          "(detect/defaults.yaml); the box will decide and monitor with those")
    return BoxSettings()


def _bundle_build(args: argparse.Namespace) -> int:
    from compress.bundle import build_bundle, models_from_deploy, read_json
    from compress.keys import load_private_key

    key = load_private_key(args.key)
    specs, models = [], []
    for d in args.deploy:
        spec, files = models_from_deploy(d)
        specs.append(spec)
        models.extend(files)
    first = specs[0]
    for d, spec in zip(args.deploy[1:], specs[1:]):
        if (spec.line, spec.classes, spec.input, spec.postprocess) != (first.line, first.classes, first.input,
                                                                       first.postprocess):
            raise UserInputError(
                f"--deploy {d} disagrees with {args.deploy[0]} on line, classes, input or postprocess: "
                "one bundle ships models of one line with one pre/post-processing"
            )
    settings = _bundle_settings(args, first.line, list(first.classes))
    metrics = read_json(args.metrics, "metrics") if args.metrics else {}
    recipe = read_json(args.recipe, "recipe") if args.recipe else {}
    if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) for v in metrics.values()):
        raise UserInputError(f"metrics file {args.metrics} must hold a JSON object of numbers")
    if not isinstance(recipe, dict):
        raise UserInputError(f"recipe file {args.recipe} must hold a JSON object")
    out = build_bundle(
        args.out, first.line, args.bundle_version, args.parent_version, models, first.input, first.postprocess,
        first.classes, metrics, recipe, _golden_pairs(args.golden), args.drift_reference, key, settings=settings,
    )
    print(f"bundle {first.line} {args.bundle_version}: {out} and {out.parent / (out.name + '.tar.gz')}")
    return 0


def _bundle_verify(args: argparse.Namespace) -> int:
    import tempfile

    from edge_runtime.bundle import verify_bundle
    from edge_runtime.errors import UserInputError

    if not Path(args.path).exists():  # a mistyped path is the user's (exit 2), not a bundle that failed (exit 4)
        raise UserInputError(f"{args.path} does not exist: give a bundle directory or its .tar.gz")
    with tempfile.TemporaryDirectory(prefix="defectkit-verify-") as tmp:  # used only for a .tar.gz
        man = verify_bundle(args.path, args.public_key, extract_to=Path(tmp) / "bundle")
    n = len(man.files())
    print(f"OK: bundle {man.line} {man.version} (parent {man.parent_version or '-'}): signature and {n} file "
          f"checksums verified, no unlisted files")
    return 0
