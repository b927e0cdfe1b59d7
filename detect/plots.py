"""Training curves as a PNG: loss, validation mAP and learning rate per epoch."""
from __future__ import annotations

import json
from pathlib import Path


def read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training_curves(history: list[dict], out_png: Path, title: str = "") -> Path:
    """Three panels that share the epoch axis; epochs without evaluation show no mAP point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    epochs = [h["epoch"] for h in history]
    loss_keys = [k for k in ("loss", "loss_cls", "loss_iou", "loss_dfl") if any(k in h for h in history)]
    for key in loss_keys:
        axes[0].plot([h["epoch"] for h in history if key in h], [h[key] for h in history if key in h],
                     label=key, lw=1.5 if key == "loss" else 1.0)
    axes[0].set_title("training loss")
    axes[0].legend(fontsize=8)
    for key, label in (("map50", "mAP50"), ("map50_95", "mAP50-95")):
        pts = [(h["epoch"], h[key]) for h in history if key in h]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", ms=3, label=label)
    axes[1].set_ylim(0, 1)
    axes[1].set_title("validation mAP")
    axes[1].legend(fontsize=8)
    axes[2].plot(epochs, [h.get("lr", 0) for h in history])
    axes[2].set_title("learning rate (end of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
