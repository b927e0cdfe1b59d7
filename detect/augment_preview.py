"""``defectkit augment-preview``: a PNG grid of training samples exactly as the model receives them.

The samples go through the same ppdet reader (Mosaic, MixUp, HSV, flip, multi-scale resize) with the
same seeds as the training loader (:class:`detect.seeded_loader.SeededLoader`), so the grid for epoch E shows the
first images of epoch E of a run with these settings, boxes included. An engineer sees whether Mosaic
cuts defects in half, whether HSV jitter turns a green board blue, or whether boxes drift after a flip.
"""
from __future__ import annotations

import math
from pathlib import Path
import cv2
import numpy as np

from detect.linespec import LineSpec
from detect.ppyoloe import RunPaths, activate, build_config
from edge_runtime.errors import ConfigError
from edge_runtime.fileio import atomic_write_bytes

TILE = 256
_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]  # RGB


def preview_samples(spec: LineSpec, n: int, epoch: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The first ``n`` training samples of ``epoch`` after every transform: (RGB uint8 image, boxes, classes),
    with ``spec.settings.train`` as a run of this spec would use them."""
    from detect.preflight import check_class_contract, check_settings
    from detect.seeded_loader import SeededCollate, SeededLoader
    from detect.session import min_box_side

    train = spec.settings.train
    check_settings(spec)
    check_class_contract(spec, spec.paths.train)
    if n < 1:
        raise ConfigError(f"augment-preview: -n must be at least 1, got {n}.")
    if not 0 <= epoch < train.epochs:
        raise ConfigError(f"augment-preview: --epoch {epoch} is not an epoch of this run (0-{train.epochs - 1}).")
    cfg = build_config(spec, RunPaths(Path("/nonexistent")))
    cfg.pop("use_vdl", None)
    activate(cfg)
    from ppdet.core.workspace import create

    dataset = create("TrainDataset")()
    reader = create("TrainReader")  # transforms only: calling it would start a loader thread
    dataset.check_or_download_dataset()
    dataset.parse_dataset()
    dataset.set_transform(reader._sample_transforms)
    dataset.set_kwargs(**reader.kwargs)
    dataset.set_epoch(epoch)
    loader = SeededLoader(dataset, reader._batch_transforms, reader.batch_size, train.seed,
                          drop_last=False, shuffle=True, min_box_side=min_box_side(train))
    samples = loader.samples()
    # the batch operators (multi-scale resize, normalise, CHW, pad boxes) without the final collation
    batch_ops = SeededCollate(_NoCollate(reader._batch_transforms), loader.seed)
    # NormalizeImage(is_scale) hands the model pixels / 255: scale back for display
    unit = 255.0 if any(getattr(op, "is_scale", False) for op in reader._batch_transforms.transforms_cls) else 1.0
    out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for keys in loader.batches(epoch):
        for sample in batch_ops([samples[k] for k in keys]):
            image = np.clip(sample["image"].transpose(1, 2, 0) * unit, 0, 255).astype(np.uint8)
            boxes, labels = np.asarray(sample["gt_bbox"]).reshape(-1, 4), np.asarray(sample["gt_class"]).reshape(-1)
            if "pad_gt_mask" in sample:
                keep = sample["pad_gt_mask"].reshape(-1) > 0
                boxes, labels = boxes[keep], labels[keep]
            out.append((image, boxes, labels.astype(int)))
            if len(out) == n:
                return out
    return out


class _NoCollate:
    """ppdet's BatchCompose minus the collation: returns the transformed list of samples."""

    def __init__(self, batch_compose):
        self.transforms = batch_compose.transforms_cls

    def __call__(self, samples: list[dict]) -> list[dict]:
        for op in self.transforms:
            samples = op(samples)
        return samples


def draw_grid(tiles: list[tuple[np.ndarray, np.ndarray, np.ndarray]], classes: list[str], title: str) -> np.ndarray:
    """Tiles of TILE x TILE px with boxes and class names; returns a BGR image for cv2."""
    cols = max(1, math.ceil(math.sqrt(len(tiles))))
    rows = max(1, math.ceil(len(tiles) / cols))
    width = max(cols * TILE, 512)
    lines = [title[i:i + width // 7] for i in range(0, len(title), width // 7)]
    header = 8 + 16 * len(lines)
    canvas = np.full((header + rows * TILE, width, 3), 255, np.uint8)
    for k, text in enumerate(lines):
        cv2.putText(canvas, text, (6, 18 + 16 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    for i, (image, boxes, labels) in enumerate(tiles):
        h, w = image.shape[:2]
        scale = TILE / max(h, w)
        tile = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        tile = np.ascontiguousarray(tile)
        for box, label in zip(boxes, labels):
            colour = _COLOURS[int(label) % len(_COLOURS)]
            x1, y1, x2, y2 = (int(round(v * scale)) for v in box)
            cv2.rectangle(tile, (x1, y1), (x2, y2), colour, 1)
            name = classes[int(label)] if 0 <= int(label) < len(classes) else str(label)
            cv2.putText(tile, name, (x1, max(9, y1 - 2)), cv2.FONT_HERSHEY_SIMPLEX, 0.3, colour, 1, cv2.LINE_AA)
        r, c = divmod(i, cols)
        y0, x0 = header + r * TILE, c * TILE
        canvas[y0:y0 + tile.shape[0], x0:x0 + tile.shape[1]] = tile
    return cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR)


def augment_preview(spec: LineSpec, out_png: Path | str, n: int = 16, epoch: int = 0) -> Path:
    """Write a grid of the first ``n`` augmented training samples of ``epoch`` with their boxes to ``out_png``."""
    train = spec.settings.train
    tiles = preview_samples(spec, n, epoch)
    mosaic_on = train.mosaic > 0 and epoch < train.epochs - train.close_mosaic
    title = (f"{spec.line} epoch {epoch}: mosaic {train.mosaic if mosaic_on else 'off'}, "
             f"mixup {train.mixup if mosaic_on else 'off'}, hsv {list(train.hsv)}, flip {train.flip}, "
             f"multiscale {'on' if train.multiscale else 'off'}")
    ok, buf = cv2.imencode(".png", draw_grid(tiles, spec.classes, title))
    if not ok:  # pragma: no cover - cv2 encodes every uint8 image
        raise ConfigError(f"could not encode the preview grid for {out_png}")
    return atomic_write_bytes(Path(out_png), buf.tobytes())
