"""Checks before anything is built: the data set, the class contract, and training-policy values that are
wrong together. Training, resume, evaluation, pruning and QAT call them; this module imports none of them.

The settings' own types and relations are checked when they are resolved (:mod:`detect.settings`); what
is left here needs the data or a second module (freeze specs, checkpoint retention).
"""
from __future__ import annotations

import json
from pathlib import Path

from detect.linespec import LineSpec
from edge_runtime.errors import ConfigError, DataError


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


CLASS_HEAD = "yolo_head.pred_cls."  # the only tensors that may differ from pretrained weights (class count)


def weights_file(path_or_url: str) -> Path:
    """The ``.pdparams`` file a local ``train.pretrained`` names (a file, a stem, or a checkpoint folder)."""
    path = Path(path_or_url)
    if path.is_dir():  # a checkpoint directory: its evaluated (EMA) weights, else the raw ones
        file = path / "ema.pdparams"
        return file if file.is_file() else path / "model.pdparams"
    return path if str(path).endswith(".pdparams") else Path(f"{path}.pdparams")


def weights_model_size(stored) -> tuple[float | None, str | None]:
    """(width multiplier, model size) of PP-YOLOE+ weights, read from the stem's last conv (64 x width outputs)."""
    from detect.ppyoloe import MODEL_MULTIPLIERS

    stem = stored.get("backbone.stem.conv3.conv.weight")
    if stem is None:
        return None, None
    width = round(int(stem.shape[0]) / 64.0, 4)
    size = next((name for name, (_, w) in MODEL_MULTIPLIERS.items() if abs(w - width) < 1e-6), None)
    return width, size


def pretrained_mismatch(spec: LineSpec, file: Path, stored, bad: list[str], total: int) -> str:
    """The refusal of weights that do not fit the spec's model beyond its class head, with the fix."""
    from detect.ppyoloe import MODEL_MULTIPLIERS

    width, size = weights_model_size(stored)
    where = spec.source or f"the line spec of '{spec.line}'"
    what = (f"a {size} model (width {width:g})" if size else
            f"a model of width {width:g}" if width else "not a PP-YOLOE+ CSPResNet model")
    fix = (f"set model_size: {size} in {where} (or pass weights of a {spec.model_size} model)" if size else
           f"pass weights of a {spec.model_size} model")
    return (f"pretrained weights '{file}' are {what}, the spec says model_size {spec.model_size} "
            f"(width {MODEL_MULTIPLIERS[spec.model_size][1]:g}): {len(bad)} of {total} tensors do not fit "
            f"beyond the class head (e.g. {', '.join(bad[:3])}), so training would start from random "
            f"initialisation. Fix: {fix}, or train without them (--set pretrained='').")


def check_pretrained(spec: LineSpec) -> None:
    """Refuse, before anything is built, local ``train.pretrained`` weights made for another model size.

    Only the class head may differ (another class count); URLs are checked after download, when loaded
    (:func:`detect.session.load_pretrained` refuses the same way)."""
    from detect.ppyoloe import MODEL_MULTIPLIERS

    pretrained = spec.settings.train.pretrained
    if not pretrained or "://" in pretrained:
        return
    file = weights_file(pretrained)
    if not file.is_file():
        raise ConfigError(f"pretrained weights '{file}' do not exist (train.pretrained in "
                          f"{spec.source or 'the line spec'}). Give a .pdparams path, a checkpoint directory or a URL.")
    from detect.heavy import paddle_stack

    stored = paddle_stack().paddle.load(str(file))
    width, size = weights_model_size(stored)
    if width is not None and abs(width - MODEL_MULTIPLIERS[spec.model_size][1]) > 1e-6:
        bad = [k for k in stored if not k.startswith(CLASS_HEAD)]
        raise ConfigError(pretrained_mismatch(spec, file, stored, bad, len(stored)))
