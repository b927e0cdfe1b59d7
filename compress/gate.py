"""The accuracy gate: a compressed variant replaces its parent only if it keeps the parent's accuracy.

Two checks, both against the FP32 parent, both with the figures in the verdict:
- mAP50-95 on the line's validation set (same COCO evaluation as training) may drop at most the line's
  ``compress.max_map_drop`` points;
- on the golden images the variant's detections must match the parent's within the *edge self-test's*
  tolerance (``edge_runtime.selftest.compare``): the box runs that same check at every start, so a variant
  that passed here cannot fail its own self-test on the box, and verdicts (OK/NG) must be identical.

Golden images are chosen from the validation set where the parent is unambiguous (top score far from the
decision threshold), NG and OK parts both, so a golden mismatch means the variant changed, not that a
borderline part flipped.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from compress.measure import read_image
from detect.linespec import LineSpec
from edge_runtime.decision import decide
from edge_runtime.settings import RuntimeSettings
from edge_runtime.selftest import Tolerance, compare


@dataclass
class GoldenCheck:
    images: int = 0
    mismatched: dict[str, str] = field(default_factory=dict)  # image name -> first problem
    verdict_flips: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.images > 0 and not self.mismatched and not self.verdict_flips


@dataclass
class GateResult:
    variant: str
    parent: str
    passed: bool
    parent_map50_95: float
    variant_map50_95: float
    map_drop_pts: float  # (parent - variant) * 100
    max_map_drop: float
    golden: GoldenCheck
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        head = (f"gate {'PASSED' if self.passed else 'REFUSED'} for {self.variant}: mAP50-95 "
                f"{self.variant_map50_95:.4f} vs {self.parent} {self.parent_map50_95:.4f} (drop "
                f"{self.map_drop_pts:+.2f} pt, limit {self.max_map_drop:.2f}); golden images "
                f"{self.golden.images - len(self.golden.mismatched)}/{self.golden.images} within tolerance, "
                f"{len(self.golden.verdict_flips)} verdict flips")
        return head + ("" if self.passed else " — " + "; ".join(self.reasons))


def gate_settings(spec: LineSpec) -> tuple[float, Tolerance, RuntimeSettings]:
    """The line's gate limits: max mAP drop, golden tolerance (the self-test's), decision settings."""
    c = spec.settings.compress
    tol = Tolerance(**golden_tolerance(spec))
    return c.max_map_drop, tol, runtime_config(spec)


def golden_tolerance(spec: LineSpec) -> dict[str, float]:
    """The golden check's tolerance (compress.golden_*): the gate judges with it and the bundle manifest carries
    it, so the box's self-test compares with the same numbers."""
    c = spec.settings.compress
    return {"score": c.golden_score_tol, "box_px": c.golden_box_px, "box_rel": c.golden_box_rel,
            "min_score": c.golden_min_score}


def runtime_config(spec: LineSpec) -> RuntimeSettings:
    """The OK/NG decision settings of the line: the one source for the gate's verdicts, the golden images, the
    drift reference and the bundle manifest's ``settings.runtime`` (what the box decides with)."""
    return spec.settings.runtime


def choose_golden(parent_model: Path, spec: LineSpec, count: int, margin: float = 0.2,
                  candidates: Sequence[Path] | None = None) -> list[Path]:
    """Up to ``count`` validation images on which the parent is unambiguous, NG and OK alternating.

    Unambiguous: every detection's score is at least ``margin`` away from the decision threshold, so small
    numeric differences of a compressed model cannot flip the verdict by themselves.
    """
    from detect.data.coco import load_coco
    from edge_runtime.predict import Detector

    if candidates is None:
        coco = load_coco(spec.paths.val)
        candidates = [spec.paths.images / im["file_name"] for im in coco["images"]]
    det = Detector.from_model(parent_model)
    cfg = runtime_config(spec)
    thr = cfg.thresholds_for(det.classes)
    ng, ok = [], []
    for path in candidates:
        dets = det(read_image(path, "golden image"))
        limits = thr[dets.class_ids.astype(int)] if len(dets) else np.zeros(0)
        if len(dets) and np.any(np.abs(dets.scores - limits) < margin):
            continue
        (ng if decide(dets, det.classes, cfg).is_ng else ok).append(Path(path))
    picked: list[Path] = []
    while len(picked) < count and (ng or ok):
        for pool in (ng, ok):
            if pool and len(picked) < count:
                picked.append(pool.pop(0))
    return picked


def golden_check(parent_model: Path, variant_model: Path, images: Sequence[Path], spec: LineSpec,
                 variant_backend: str | None = None) -> GoldenCheck:
    """Compare the variant with the parent on ``images`` with the self-test's tolerance and the verdicts."""
    from edge_runtime.predict import Detector

    _, tol, cfg = gate_settings(spec)
    parent = Detector.from_model(parent_model)
    variant = Detector.from_model(variant_model, backend=variant_backend)
    out = GoldenCheck()
    for path in images:
        img = read_image(path, "golden image")
        a, b = parent(img), variant(img)
        out.images += 1
        problems = compare(a, b, tol)
        if problems:
            out.mismatched[Path(path).name] = problems[0]
        if decide(a, parent.classes, cfg).is_ng != decide(b, variant.classes, cfg).is_ng:
            out.verdict_flips.append(Path(path).name)
    return out


def judge(variant: str, parent: str, parent_map: float, variant_map: float, golden: GoldenCheck,
          max_map_drop: float) -> GateResult:
    """The verdict from the figures (pure: the tests drive it with chosen numbers)."""
    drop = round((parent_map - variant_map) * 100.0, 3)
    reasons = []
    if drop > max_map_drop:
        reasons.append(f"mAP50-95 dropped {drop:.2f} points (limit {max_map_drop:.2f}): "
                       f"{parent_map:.4f} -> {variant_map:.4f}")
    if golden.images == 0:
        reasons.append("no golden image to compare on (the validation set has no unambiguous image)")
    for name, problem in list(golden.mismatched.items())[:3]:
        reasons.append(f"golden {name}: {problem}")
    if len(golden.mismatched) > 3:
        reasons.append(f"... and {len(golden.mismatched) - 3} more golden images differ")
    if golden.verdict_flips:
        reasons.append(f"OK/NG verdict differs on {', '.join(golden.verdict_flips[:5])}")
    return GateResult(variant, parent, not reasons, parent_map, variant_map, drop, max_map_drop, golden, reasons)


__all__ = ["GateResult", "GoldenCheck", "gate_settings", "runtime_config", "choose_golden", "golden_check", "judge"]
