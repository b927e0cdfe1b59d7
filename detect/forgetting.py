"""The forgetting gate of a retrain: the old classes, on the parent's own validation set, must not get worse.

Both models are scored now, by the same pycocotools evaluation as training, on the same images: the parent
on its val set, the retrained model on that set with categories renumbered to the new class list (old class
ids do not move; new classes have no ground truth there, so pycocotools leaves them out of the mean). A
class whose AP50-95 drops more than ``retrain.max_class_drop`` points, or an old-class mAP50-95 that drops
more than ``retrain.max_map_drop``, refuses the retrain with the figures; ``defectkit bundle`` then refuses it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from detect.evaluate import EvalResult

POINTS = 100.0  # AP in [0, 1] -> points


@dataclass
class ClassChange:
    name: str
    parent: float | None  # AP50-95 on the parent's val set (None: no ground truth there)
    retrained: float | None
    drop_points: float | None


@dataclass
class ForgettingVerdict:
    passed: bool
    old_map_parent: float
    old_map_retrained: float
    drop_points: float
    max_map_drop: float
    max_class_drop: float
    min_new_class_ap50: float = 0.0
    classes: list[ClassChange] = field(default_factory=list)
    new_classes: dict[str, float | None] = field(default_factory=dict)  # AP50-95 on the merged val set
    new_classes_ap50: dict[str, float | None] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def line(self) -> str:
        head = "PASSED" if self.passed else "REFUSED"
        text = (f"forgetting gate {head}: old classes mAP50-95 {self.old_map_parent:.4f} -> {self.old_map_retrained:.4f} "
                f"({-self.drop_points:+.2f} pt, limit -{self.max_map_drop:.2f})")
        return text + ("" if self.passed else "; " + "; ".join(self.reasons))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ap(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 4)


def judge(parent: EvalResult, retrained: EvalResult, old_classes: list[str], merged_val: EvalResult | None,
          max_map_drop: float, max_class_drop: float, min_new_class_ap50: float = 0.0) -> ForgettingVerdict:
    """Compare per-class AP of the old classes (thresholds in points, x100); a new class must reach
    ``min_new_class_ap50`` on the merged val set (a head row still at its prior has learned nothing)."""
    changes, reasons = [], []
    for name in old_classes:
        p, r = _ap(parent.per_class.get(name, math.nan)), _ap(retrained.per_class.get(name, math.nan))
        drop = None if p is None or r is None else round((p - r) * POINTS, 2)
        changes.append(ClassChange(name, p, r, drop))
        if drop is not None and drop > max_class_drop:
            reasons.append(f"class '{name}' AP50-95 {p:.4f} -> {r:.4f} (-{drop:.2f} pt > {max_class_drop:.2f})")
    drop = round((parent.map50_95 - retrained.map50_95) * POINTS, 2)
    if drop > max_map_drop:
        reasons.insert(0, f"old classes mAP50-95 dropped {drop:.2f} pt (> {max_map_drop:.2f})")
    new, new50 = {}, {}
    if merged_val is not None:
        new = {n: _ap(v) for n, v in merged_val.per_class.items() if n not in old_classes}
        new50 = {n: _ap(merged_val.per_class_ap50.get(n, math.nan)) for n in new}
    for name, ap50 in new50.items():
        if ap50 is not None and ap50 < min_new_class_ap50:
            reasons.append(f"new class '{name}' reached AP50 {ap50:.4f} (< {min_new_class_ap50:.2f}): not learned; "
                           f"train longer (retrain.epochs) or add images of it")
    return ForgettingVerdict(not reasons, round(parent.map50_95, 4), round(retrained.map50_95, 4), drop,
                             max_map_drop, max_class_drop, min_new_class_ap50, changes, new, new50, reasons)


def markdown(verdict: ForgettingVerdict, title: str) -> str:
    """The page an engineer reads before shipping: per-class table, new classes, verdict."""
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    rows = [f"# {title}", "", verdict.line(), "",
            "| old class | parent AP50-95 | retrained AP50-95 | change (pt) |", "|---|---:|---:|---:|"]
    for c in verdict.classes:
        change = "n/a" if c.drop_points is None else f"{-c.drop_points:+.2f}"
        rows.append(f"| {c.name} | {fmt(c.parent)} | {fmt(c.retrained)} | {change} |")
    rows.append(f"| **old classes mAP50-95** | {verdict.old_map_parent:.4f} | {verdict.old_map_retrained:.4f} | "
                f"{-verdict.drop_points:+.2f} |")
    if verdict.new_classes:
        rows += ["", "| new class | AP50-95 on the merged val set | AP50 |", "|---|---:|---:|"]
        rows += [f"| {n} | {fmt(v)} | {fmt(verdict.new_classes_ap50.get(n))} |" for n, v in verdict.new_classes.items()]
    return "\n".join(rows) + "\n"


def plot(verdict: ForgettingVerdict, out_png: Path, title: str) -> Path:
    """Bars per class: parent and retrained AP on the parent's val set; new classes on the merged val set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [c.name for c in verdict.classes] + list(verdict.new_classes)
    parent = [c.parent or 0.0 for c in verdict.classes] + [0.0] * len(verdict.new_classes)
    new = [c.retrained or 0.0 for c in verdict.classes] + [v or 0.0 for v in verdict.new_classes.values()]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 3.8))
    ax.bar(x - 0.2, parent, 0.4, label="parent")
    bars = ax.bar(x + 0.2, new, 0.4, label="retrained")
    for b in list(bars)[len(verdict.classes):]:
        b.set_hatch("//")
    ax.axvline(len(verdict.classes) - 0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("AP50-95")
    ax.set_title(f"{title}\n{'passed' if verdict.passed else 'REFUSED'}: old classes "
                 f"{verdict.old_map_parent:.3f} -> {verdict.old_map_retrained:.3f}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
