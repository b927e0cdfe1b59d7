"""Contact sheet of a corpus: one PNG that shows what the base model learns from, boxes and classes drawn.

A glance at the sheet catches what counts cannot: a texture that swallows its defects, boxes that miss,
frames that all look alike. Frames keep their aspect ratio (letterboxed into equal cells).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from edge_runtime.errors import DataError
from edge_runtime.fileio import atomic_write_bytes

from .coco import Layout, class_names, load_coco

# BGR colours per class index (distinct on light and dark textures).
_COLOURS = ((0, 0, 255), (255, 0, 255), (255, 255, 0), (0, 255, 0), (0, 165, 255), (255, 64, 64), (0, 255, 255))


def _cell(img: np.ndarray, boxes: Sequence[tuple[int, Sequence[float]]], side: int, caption: str) -> np.ndarray:
    h, w = img.shape[:2]
    f = side / max(h, w)
    small = cv2.resize(img, (max(1, int(w * f)), max(1, int(h * f))), interpolation=cv2.INTER_AREA)
    cell = np.full((side + 16, side, 3), 40, np.uint8)
    oy, ox = (side - small.shape[0]) // 2, (side - small.shape[1]) // 2
    cell[oy:oy + small.shape[0], ox:ox + small.shape[1]] = small
    for c, (x, y, bw, bh) in boxes:
        p0 = (int(ox + x * f), int(oy + y * f))
        p1 = (int(ox + (x + bw) * f + 0.999), int(oy + (y + bh) * f + 0.999))
        cv2.rectangle(cell, p0, p1, _COLOURS[c % len(_COLOURS)], 1)
    cv2.putText(cell, caption[:28], (3, side + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.36, (230, 230, 230), 1, cv2.LINE_AA)
    return cell


def contact_sheet(root: Path, out_png: Path, n: int = 48, cols: int = 8, side: int = 160) -> Path:
    """PNG grid of the first ``n`` frames of the corpus at ``root`` with their boxes and a class legend."""
    layout = Layout(Path(root))
    coco = load_coco(layout.all)
    if not coco["images"]:
        raise DataError(f"{layout.all} holds no images: nothing to draw. Generate the corpus first.")
    meta_path = Path(root) / "surfaces.json"
    meta = {f["file_name"]: f for f in json.loads(meta_path.read_text())["frames"]} if meta_path.is_file() else {}
    names = class_names(coco)
    by_image: dict[int, list] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append((a["category_id"] - 1, a["bbox"]))
    cells = []
    for im in coco["images"][:n]:
        img = cv2.imread(str(layout.images / im["file_name"]), cv2.IMREAD_COLOR)
        if img is None:
            raise DataError(f"{layout.images / im['file_name']} cannot be read (record {im['id']} of {layout.all}); "
                            "regenerate the corpus.")
        m = meta.get(im["file_name"], {})
        caption = f"{m.get('family', '')}{' grey' if m.get('gray') else ''} {im['width']}x{im['height']}"
        cells.append(_cell(img, by_image.get(im["id"], []), side, caption))
    while len(cells) % cols:
        cells.append(np.full_like(cells[0], 40))
    rows = [np.hstack(cells[i:i + cols]) for i in range(0, len(cells), cols)]
    legend = np.full((22, rows[0].shape[1], 3), 255, np.uint8)
    x = 6
    for i, name in enumerate(names):
        cv2.rectangle(legend, (x, 6), (x + 12, 16), _COLOURS[i % len(_COLOURS)], -1)
        cv2.putText(legend, name, (x + 16, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        x += 24 + 9 * len(name)
    sheet = np.vstack([legend] + rows)
    ok, buf = cv2.imencode(".png", sheet, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:  # pragma: no cover
        raise DataError(f"could not encode the contact sheet {sheet.shape}.")
    return atomic_write_bytes(Path(out_png), buf.tobytes())
