"""Stratified train/val split of a COCO data set.

Each image falls into one stratum: the rarest class it contains (rarest by number of images over the
whole set), or "defect-free" when it has no boxes. Every stratum is split in the same proportion, so a
rare class is not left out of validation by chance and defect-free images land on both sides.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from detect.settings import DataSettings
from edge_runtime.errors import ConfigError, DataError

from .coco import Layout, load_coco, subset, write_coco

DEFECT_FREE = -1


def strata(coco: dict[str, Any]) -> dict[int, list[int]]:
    """Image ids grouped by stratum key (a category id, or DEFECT_FREE)."""
    cats_of: dict[int, set[int]] = defaultdict(set)
    for ann in coco["annotations"]:
        cats_of[ann["image_id"]].add(ann["category_id"])
    images_per_cat = Counter(c for cats in cats_of.values() for c in cats)
    groups: dict[int, list[int]] = defaultdict(list)
    for im in coco["images"]:
        cats = cats_of.get(im["id"])
        key = min(cats, key=lambda c: (images_per_cat[c], c)) if cats else DEFECT_FREE
        groups[key].append(im["id"])
    return groups


def _allocate(sizes: dict[int, int], fraction: float, total: int) -> dict[int, int]:
    """Validation images per stratum: proportional, summing to round(total * fraction) where possible,
    and at least one image on each side for every stratum that has two or more."""
    exact = {k: n * fraction for k, n in sizes.items()}
    alloc = {k: min(max(int(np.floor(e)), 1 if sizes[k] >= 2 else 0), max(sizes[k] - 1, 0)) for k, e in exact.items()}
    left = int(round(total * fraction)) - sum(alloc.values())
    for k in sorted(exact, key=lambda k: (-(exact[k] - np.floor(exact[k])), k)):
        if left <= 0:
            break
        if alloc[k] < sizes[k] - 1:
            alloc[k] += 1
            left -= 1
    return alloc


def stratified_split(coco: dict[str, Any], val_fraction: float, seed: int = 0) -> tuple[dict, dict]:
    """Return (train, val) COCO dicts; deterministic for a given seed."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val fraction must be between 0 and 1 (exclusive), got {val_fraction}.")
    if len(coco["images"]) < 2:
        raise DataError(f"cannot split {len(coco['images'])} image(s) into train and val: need at least 2.")
    rng = np.random.default_rng(seed)
    groups = {key: sorted(ids) for key, ids in sorted(strata(coco).items())}
    n_val = _allocate({k: len(v) for k, v in groups.items()}, val_fraction, len(coco["images"]))
    val_ids: list[int] = []
    for key, ids in groups.items():
        order = rng.permutation(len(ids))
        val_ids.extend(ids[i] for i in order[: n_val[key]])
    val_set = set(val_ids)
    if not val_set:  # tiny sets: every stratum had one image
        val_set = {sorted(im["id"] for im in coco["images"])[-1]}
    train_ids = [im["id"] for im in coco["images"] if im["id"] not in val_set]
    return subset(coco, train_ids), subset(coco, val_set)


def split_dataset(root: str | Path, val_fraction: float = DataSettings.val_fraction,
                  seed: int = DataSettings.split_seed) -> tuple[Path, Path]:
    """Split ``<root>/annotations/all.json`` into train.json and val.json (each written atomically)."""
    layout = Layout(Path(root))
    coco = load_coco(layout.all)
    train, val = stratified_split(coco, val_fraction, seed)
    write_coco(layout.train, train)
    write_coco(layout.val, val)
    return layout.train, layout.val
