"""``defectkit synth``: a synthetic PCB line with the PKU-Market-PCB defect classes.

Why: the demo, the tests and the training experiments need a labelled line that exists on every
machine, is the same on every machine (same seed, same bytes) and is learnable by a tiny detector
in minutes. Boards come from ``board.py``, defects from ``defects.py``; this module plans the
data set (which boards are defect-free, which classes go where, balanced over the set) and writes
the kit's normalised layout plus a line spec.
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from edge_runtime.errors import ConfigError, DataError, UserInputError
from edge_runtime.fileio import atomic_write_bytes

from detect.linespec import LineSpec
from detect.settings import DataSettings

from .board import draw_board, render
from .coco import Layout, box_annotation, make_coco, write_coco
from .defects import DEFECT_CLASSES, add_defects
from .linefile import new_line_settings
from .split import stratified_split

IMAGE_FORMATS = ("jpg", "png")
_DEFECTS_PER_BOARD = ((1, 2, 3, 4), (0.3, 0.3, 0.25, 0.15))


def encode_image(img: np.ndarray, image_format: str) -> bytes:
    """Encode deterministically (fixed JPEG quality, no metadata)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, 92] if image_format == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    ok, buf = cv2.imencode(f".{image_format}", img, params)
    if not ok:  # pragma: no cover - cv2 encodes every uint8 BGR image
        raise DataError(f"could not encode a {img.shape} image as {image_format}.")
    return buf.tobytes()


def plan_defects(rng: np.random.Generator, count: int, defect_free_fraction: float, classes: tuple[str, ...]) -> list[list[str]]:
    """For each board, the defect classes to paint; a shuffled bag keeps the classes balanced."""
    n_free = int(round(count * defect_free_fraction))
    free = set(rng.permutation(count)[:n_free].tolist())
    sizes = [0 if i in free else int(rng.choice(_DEFECTS_PER_BOARD[0], p=_DEFECTS_PER_BOARD[1])) for i in range(count)]
    total = sum(sizes)
    bag = np.tile(np.arange(len(classes)), total // len(classes) + 1)[:total]
    bag = bag[rng.permutation(total)]
    plans, at = [], 0
    for n in sizes:
        plans.append([classes[c] for c in bag[at:at + n]])
        at += n
    return plans


def _check_args(count: int, size: tuple[int, int], defect_free_fraction: float, val_fraction: float, image_format: str) -> None:
    if count < 2:
        raise ConfigError(f"synth: --count must be at least 2 (one train and one val image), got {count}.")
    if len(size) != 2 or min(size) < 64 or max(size) > 4096:
        raise ConfigError(f"synth: --size must be two numbers W H between 64 and 4096, got {tuple(size)}.")
    if not 0.0 <= defect_free_fraction < 1.0:
        raise ConfigError(f"synth: --defect-free must be in [0, 1), got {defect_free_fraction}.")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"synth: val fraction must be in (0, 1), got {val_fraction}.")
    if image_format not in IMAGE_FORMATS:
        raise ConfigError(f"synth: --format must be one of {', '.join(IMAGE_FORMATS)}, got '{image_format}'.")


def _clear_previous_run(layout: Layout, line: str) -> None:
    """Remove boards of an earlier synth run (another count would leave stale files); refuse foreign files."""
    if not layout.images.exists():
        return
    ours = re.compile(rf"^{re.escape(line)}_\d{{5}}\.(jpg|png)$")
    files = list(layout.images.iterdir())
    others = [f.name for f in files if not ours.match(f.name)]
    if others:
        raise UserInputError(
            f"synth: '{layout.images}' already holds other files ({', '.join(sorted(others)[:3])}...); "
            "choose an empty or new --out folder (synth never deletes data it did not write)."
        )
    for f in files:
        f.unlink()


def synth_images(
    images_dir: Path,
    count: int,
    size: tuple[int, int],
    seed: int,
    defect_free_fraction: float,
    image_format: str,
    classes: tuple[str, ...] = DEFECT_CLASSES,
    prefix: str = "board",
    progress: bool = True,
    style: str = "green",
) -> tuple[list[dict], list[dict]]:
    """Draw ``count`` boards into ``images_dir``; returns COCO images and annotations (ids from 1)."""
    from tqdm import tqdm

    width, height = int(size[0]), int(size[1])
    plans = plan_defects(np.random.default_rng([seed, 0]), count, defect_free_fraction, classes)
    cat_id = {name: i + 1 for i, name in enumerate(classes)}
    images, annotations = [], []
    images_dir.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(count), desc="synth", unit="img", disable=not progress):
        rng = np.random.default_rng([seed, 1, i])
        board = draw_board(rng, width, height, style)
        placed = add_defects(board, rng, plans[i])
        file_name = f"{prefix}_{i:05d}.{image_format}"
        atomic_write_bytes(images_dir / file_name, encode_image(render(board, rng), image_format))
        images.append({"id": i + 1, "file_name": file_name, "width": width, "height": height})
        for name, (x0, y0, x1, y1) in placed:
            annotations.append(box_annotation(len(annotations) + 1, i + 1, cat_id[name], (x0, y0, x1 - x0, y1 - y0)))
    return images, annotations


def generate_line(
    out_dir: Path,
    line: str = "pcb-demo",
    count: int = 300,
    size: tuple[int, int] = (320, 320),
    seed: int = 0,
    defect_free_fraction: float = 0.12,
    val_fraction: float | None = None,
    image_format: str = "jpg",
    progress: bool = True,
    style: str = "green",
    classes: tuple[str, ...] = DEFECT_CLASSES,
    image_size: int | None = None,
    model_size: str | None = None,
    pretrained: bool = True,
) -> LineSpec:
    """Write a synthetic PCB line into ``out_dir`` (normalised layout + ``<line>.yaml``) and return its spec.

    ``classes``: a subset of the drawable defects, in contract order (a line that has not met the others yet).
    The spec starts from the kit's shipped base model (its model size, ``train.pretrained``) unless
    ``model_size`` or ``pretrained=False`` say otherwise; ``image_size`` defaults to the frame size rounded to
    32 (the default 320 x 320 frames: the base's input size)."""
    val_fraction = DataSettings.val_fraction if val_fraction is None else val_fraction  # None: the table's
    _check_args(count, size, defect_free_fraction, val_fraction, image_format)
    unknown = [c for c in classes if c not in DEFECT_CLASSES]
    if unknown or not classes:
        raise UserInputError(f"synthetic defects {unknown or '(none)'} cannot be drawn; choose from {list(DEFECT_CLASSES)}")
    out_dir = Path(out_dir)
    layout = Layout(out_dir)
    _clear_previous_run(layout, line)
    images, annotations = synth_images(
        layout.images, count, size, seed, defect_free_fraction, image_format, tuple(classes), line, progress,
        style,
    )
    coco = make_coco(images, annotations, classes, f"defectkit synth line={line} seed={seed}")
    write_coco(layout.all, coco)
    train, val = stratified_split(coco, val_fraction, seed)
    write_coco(layout.train, train)
    write_coco(layout.val, val)
    frame_size = max(64, int(round(max(size) / 32.0)) * 32)
    image_size, model_size, train = new_line_settings(out_dir, image_size or frame_size, model_size, pretrained)
    data = {}
    if val_fraction != DataSettings.val_fraction:
        data["val_fraction"] = val_fraction
    if seed:
        data["split_seed"] = seed
    raw = {"line": line, "classes": list(classes), "image_size": image_size, "model_size": model_size,
           "paths": {"root": "."}, "data": data, "train": train}
    spec = LineSpec.from_dict(raw, out_dir.resolve(), where=f"synth line '{line}'")
    path = spec.save(out_dir / f"{line}.yaml")
    return replace(spec, source=path.resolve())
