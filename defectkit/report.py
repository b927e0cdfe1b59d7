"""The demo report: one Markdown page (with the training curves) and the same figures as JSON."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edge_runtime.fileio import atomic_write_json, atomic_write_text


MAP50_TARGET = 0.8  # the demo's bar (issue 2): what a factory engineer should expect from the recipe


def _ap(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def write_demo_report(out: Path, figures: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``out/report.md`` and ``out/report.json``; paths in the page are relative to ``out``."""
    val, edge = figures["val"], figures["edge"]
    rel = lambda p: os.path.relpath(p, out)  # noqa: E731
    rows = "\n".join(f"| {name} | {_ap(ap)} | {_ap(val['per_class_ap50'].get(name))} |"
                     for name, ap in val["per_class"].items())
    exports = "\n".join(f"- `{name}`: `{rel(path)}`" for name, path in figures["export"].items())
    lat = edge.get("latency_ms") or {}
    md = f"""# defectkit demo — line `{figures['line']}`

## Detector (validation split)
**mAP50 {val['map50']:.3f}** (target ≥ {MAP50_TARGET}: {'met' if val['map50'] >= MAP50_TARGET else 'NOT met'}),
mAP50-95 {val['map50_95']:.3f} on {val['images']} images;
best epoch {figures['best_epoch']} of {figures['epochs_run']} ({figures['train_minutes']} min; {figures['stop_reason']}).

| class | AP50-95 | AP50 |
|---|---|---|
{rows}

![training curves]({rel(figures['curves'])})

## Export
{exports}

ONNX Runtime vs paddle.inference: {figures['onnx_vs_paddle']}

## Edge runtime on held-back boards (ONNX Runtime)
{edge['images']} boards: verdict accuracy **{edge['verdict_accuracy']:.3f}**
(NG found {edge['true_ng']}, NG missed {edge['missed_ng']}, false NG {edge['false_ng']}, OK {edge['true_ok']});
median latency pre {lat.get('pre', float('nan')):.1f} ms, infer {lat.get('infer', float('nan')):.1f} ms,
post {lat.get('post', float('nan')):.1f} ms. One JSON line per board: `{rel(figures['predictions'])}`;
annotated images in `edge/annotated/`.

## Time per stage (s)
{', '.join(f'{k} {v}' for k, v in figures['stage_seconds'].items())}
"""
    md_path = atomic_write_text(out / "report.md", md)
    js_path = atomic_write_json(out / "report.json", figures)
    return md_path, js_path
