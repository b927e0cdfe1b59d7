"""Checks before anything is built: the data set, the class contract, and training-policy values that are
wrong together. Training, resume, evaluation, pruning and QAT call them; this module imports none of them.

The settings' own types and relations are checked when they are resolved (:mod:`detect.settings`); what
is left here needs the data or a second module (freeze specs, checkpoint retention).
"""
from __future__ import annotations

import json
from pathlib import Path

from detect.linespec import LineSpec
from edge_runtime.errors import DataError


def check_class_contract(spec: LineSpec, ann_file: Path) -> int:
    """The data set's category names, in id order, must be the line's classes; returns the image count.

    ppdet maps sorted category ids to class indices 0..K-1, so the id order *is* the class order.
    """
    if not ann_file.is_file():
        raise DataError(f"annotation file '{ann_file}' does not exist (line '{spec.line}'). "
                        f"Check paths in {spec.source or 'the line spec'} or run `defectkit data split`.")
    try:
        coco = json.loads(ann_file.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"'{ann_file}' is not valid JSON: {exc}") from exc
    cats = sorted(coco.get("categories", []), key=lambda c: c["id"])
    names = [c["name"] for c in cats]
    if names != list(spec.classes):
        raise DataError(
            f"'{ann_file}': categories in id order are {names}, but line '{spec.line}' has classes "
            f"{spec.classes} (the order is the contract). Fix: `defectkit data import --format coco` "
            f"renumbers categories in the line's order."
        )
    images = coco.get("images", [])
    if not images:
        raise DataError(f"'{ann_file}' lists no images: nothing to train or evaluate on.")
    return len(images)


def refuse_faulty_data(spec: LineSpec) -> None:
    """Run `defectkit data check` on the train and val splits; any fault stops training before it starts."""
    from detect.data.check import check_dataset

    for ann in (spec.paths.train, spec.paths.val):
        check_dataset(ann, spec.paths.images, spec.classes,
                      box_tolerance_px=spec.settings.data.box_tolerance_px).raise_if_faulty()


def check_settings(spec: LineSpec) -> None:
    """Training-policy values of ``spec.settings.train`` that the section alone cannot judge."""
    from detect.checkpoints import Retention
    from detect.freeze import check_unfreeze, parse_freeze

    train = spec.settings.train
    parse_freeze(train.freeze, f"{spec.source or f'line {spec.line!r}'}: train.freeze")
    check_unfreeze(train)
    Retention.from_settings(train)


def check_data(spec: LineSpec) -> int:
    """Data check, class contract and image count; returns the number of training images."""
    refuse_faulty_data(spec)
    n_train = check_class_contract(spec, spec.paths.train)
    check_class_contract(spec, spec.paths.val)
    batch = spec.settings.train.batch_size
    if n_train < batch:
        raise DataError(f"{n_train} training images but batch_size {batch}: lower "
                        f"train.batch_size in {spec.source or 'the line spec'} or add images.")
    return n_train
