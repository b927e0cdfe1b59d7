"""``defectkit data stats``: what a line's data set holds, as text and as one PNG.

Per class: boxes and images; box sizes (sqrt of area, px) and image sizes as histograms. These
are the numbers to look at before training: a class with a handful of boxes, or boxes far below
the network's stride at the chosen input size, explains a poor mAP before any epoch is run.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from edge_runtime.fileio import atomic_write_bytes

from detect.ppyoloe import FPN_STRIDES

from .coco import class_names, load_coco

BOX_BINS = (0, 8, 16, 24, 32, 48, 64, 96, 128, 256, 100000)
FINEST_STRIDE = min(FPN_STRIDES)  # anchor points every 8 px of the model input


@dataclass
class DatasetStats:
    classes: list[str]
    images: int
    instances: dict[str, int] = field(default_factory=dict)
    images_with: dict[str, int] = field(default_factory=dict)
    defect_free: int = 0
    box_sizes: list[float] = field(default_factory=list)  # sqrt(w*h) per box
    image_sizes: Counter = field(default_factory=Counter)  # (w, h) -> images
    input_size: int | None = None  # the model input the thin-box count refers to (a line spec's image_size)
    thin: dict[str, int] = field(default_factory=dict)  # boxes narrower than FINEST_STRIDE at the model input

    def format(self) -> str:
        lines = [f"{self.images} image(s), {sum(self.instances.values())} box(es), {self.defect_free} without boxes",
                 f"{'class':<24}{'boxes':>8}{'images':>8}"]
        if self.input_size:
            lines[-1] += f"{f'thin at {self.input_size} px':>18}"
        lines += [f"{c:<24}{self.instances.get(c, 0):>8}{self.images_with.get(c, 0):>8}"
                  + (f"{self.thin.get(c, 0):>18}" if self.input_size else "") for c in self.classes]
        if self.box_sizes:
            sizes = np.asarray(self.box_sizes)
            lines.append(f"box size sqrt(w*h) px: min {sizes.min():.1f}, median {np.median(sizes):.1f}, max {sizes.max():.1f}")
            counts, _ = np.histogram(sizes, bins=BOX_BINS)
            top = max(counts.max(), 1)
            for lo, hi, n in zip(BOX_BINS[:-1], BOX_BINS[1:], counts):
                label = f"{lo}-{hi}" if hi < 100000 else f">={lo}"
                lines.append(f"  {label:>9} px {n:>6} {'#' * int(round(30 * n / top))}")
        if self.input_size and sum(self.thin.values()):
            lines.append(f"thin: {sum(self.thin.values())} box(es) narrower than the {FINEST_STRIDE} px stride once "
                         f"resized to the {self.input_size} px model input; many contain no anchor point. The "
                         "kit's assigner gives them the anchors near their centre (train.assign_center_radius).")
        lines.append("image sizes (w x h): " + ", ".join(f"{w}x{h} ({n})" for (w, h), n in self.image_sizes.most_common()))
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Three panels: boxes per class, box-size histogram, image sizes. Written atomically."""
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        x = np.arange(len(self.classes))
        axes[0].bar(x - 0.2, [self.instances.get(c, 0) for c in self.classes], 0.4, label="boxes")
        axes[0].bar(x + 0.2, [self.images_with.get(c, 0) for c in self.classes], 0.4, label="images")
        axes[0].set_xticks(x, self.classes, rotation=30, ha="right")
        axes[0].legend()
        axes[0].set_title("per class")
        axes[1].hist(self.box_sizes or [0], bins=30)
        axes[1].set_title("box size sqrt(w*h) [px]")
        sizes = list(self.image_sizes.items())
        axes[2].scatter([w for (w, _), _ in sizes], [h for (_, h), _ in sizes], s=[20 + 300 * n / max(self.image_sizes.values()) for _, n in sizes])
        axes[2].set_xlabel("width [px]")
        axes[2].set_ylabel("height [px]")
        axes[2].set_title("image sizes")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        return atomic_write_bytes(path, buf.getvalue())


def dataset_stats(ann: str | Path | dict, classes: Sequence[str] | None = None,
                  input_size: int | None = None) -> DatasetStats:
    """Statistics of one COCO file (or dict); classes default to its categories in id order. With
    ``input_size`` (the line's model input; images are stretched to it), also the boxes per class whose
    shorter side there is below the finest stride."""
    coco = ann if isinstance(ann, dict) else load_coco(ann)
    classes = list(classes) if classes else class_names(coco)
    name_of = {c["id"]: c["name"] for c in coco["categories"]}
    st = DatasetStats(classes, len(coco["images"]), input_size=input_size)
    image_of = {im["id"]: im for im in coco["images"]}
    per_image: dict[int, set[str]] = {}
    for a in coco["annotations"]:
        name = name_of.get(a.get("category_id"), f"<unknown id {a.get('category_id')}>")
        st.instances[name] = st.instances.get(name, 0) + 1
        per_image.setdefault(a.get("image_id"), set()).add(name)
        w, h = a["bbox"][2], a["bbox"][3]
        st.box_sizes.append(float(np.sqrt(max(w, 0) * max(h, 0))))
        im = image_of.get(a.get("image_id"), {})
        if input_size and im.get("width") and im.get("height"):
            side = min(w * input_size / im["width"], h * input_size / im["height"])
            st.thin[name] = st.thin.get(name, 0) + int(side < FINEST_STRIDE)
    for names in per_image.values():
        for n in names:
            st.images_with[n] = st.images_with.get(n, 0) + 1
    for n in st.instances:
        if n not in st.classes:
            st.classes.append(n)
    st.defect_free = sum(1 for im in coco["images"] if im["id"] not in per_image)
    st.image_sizes = Counter((im.get("width"), im.get("height")) for im in coco["images"])
    return st
