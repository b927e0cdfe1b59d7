"""``defectkit keys init`` and ``defectkit bundle build|verify``: signing keys and signed bundles."""
from __future__ import annotations

import argparse
from pathlib import Path

from edge_runtime.errors import UserInputError


def register(subparsers) -> None:
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
    b.set_defaults(func=_bundle_build)

    v = bsub.add_parser("verify", help="check the signature and every checksum of a bundle (dir or .tar.gz)")
    v.add_argument("path", type=Path)
    v.add_argument("--public-key", required=True, type=Path, help="the signer's public key (.pub.pem)")
    v.set_defaults(func=_bundle_verify)


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
    metrics = read_json(args.metrics, "metrics") if args.metrics else {}
    recipe = read_json(args.recipe, "recipe") if args.recipe else {}
    if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) for v in metrics.values()):
        raise UserInputError(f"metrics file {args.metrics} must hold a JSON object of numbers")
    if not isinstance(recipe, dict):
        raise UserInputError(f"recipe file {args.recipe} must hold a JSON object")
    out = build_bundle(
        args.out, first.line, args.bundle_version, args.parent_version, models, first.input, first.postprocess,
        first.classes, metrics, recipe, _golden_pairs(args.golden), args.drift_reference, key,
    )
    print(f"bundle {first.line} {args.bundle_version}: {out} and {out.parent / (out.name + '.tar.gz')}")
    return 0


def _bundle_verify(args: argparse.Namespace) -> int:
    import tempfile

    from edge_runtime.bundle import verify_bundle

    with tempfile.TemporaryDirectory(prefix="defectkit-verify-") as tmp:  # used only for a .tar.gz
        man = verify_bundle(args.path, args.public_key, extract_to=Path(tmp) / "bundle")
    n = len(man.files())
    print(f"OK: bundle {man.line} {man.version} (parent {man.parent_version or '-'}): signature and {n} file "
          f"checksums verified, no unlisted files")
    return 0
