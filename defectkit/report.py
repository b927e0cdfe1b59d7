"""The demo report: one Markdown page (with the training curves) and the same figures as JSON."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edge_runtime.fileio import atomic_write_json, atomic_write_text


MAP50_TARGET = 0.8  # the demo's bar (issue 2): what a factory engineer should expect from the recipe


def _ap(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _compress_section(out: Path, figures: dict[str, Any]) -> str:
    c = figures.get("compress")
    if not c:
        return "not run"
    table = Path(c["table"])
    body = table.read_text().split("\n", 2)[-1] if table.is_file() else ""
    png = table.with_suffix(".png")
    pic = f"\n![compression table]({os.path.relpath(png, out)})\n" if png.is_file() else ""
    loop = figures.get("edge_loop") or {}
    ran = (f" The box timed them on its own CPU and ran **{loop['variant']}** ({loop['variant_reason']})."
           if loop.get("variant") else "")
    return (f"{body.strip()}\n{pic}\nShipped **{' + '.join(c['shipped'])}** in the signed bundle "
            f"`{os.path.relpath(c['bundle'], out)}` (public key `{os.path.relpath(c['public_key'], out)}`).{ran}")


def write_demo_report(out: Path, figures: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``out/report.md`` and ``out/report.json``; paths in the page are relative to ``out``."""
    val, edge = figures["val"], figures["edge"]
    rel = lambda p: os.path.relpath(p, out)  # noqa: E731
    rows = "\n".join(f"| {name} | {_ap(ap)} | {_ap(val['per_class_ap50'].get(name))} |"
                     for name, ap in val["per_class"].items())
    exports = "\n".join(f"- `{name}`: `{rel(path)}`" for name, path in figures["export"].items())
    loop = figures.get("edge_loop") or {}
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

## Compression (gate: mAP50-95 drop ≤ max_map_drop, golden images within the self-test tolerance)
{_compress_section(out, figures)}

## Edge runtime on held-back boards (signed bundle, local collector)
{loop.get('summary', '')}

{edge['images']} boards: verdict accuracy **{edge['verdict_accuracy']:.3f}**
(NG found {edge['true_ng']}, NG missed {edge['missed_ng']}, false NG {edge['false_ng']}, OK {edge['true_ok']}).
The collector received {loop.get('collector_reports', 0)} report(s) covering {loop.get('collector_frames', 0)} frames.
One JSON line per board: `{rel(figures['predictions'])}`; NG images annotated beside it.

## Time per stage (s)
{', '.join(f'{k} {v}' for k, v in figures['stage_seconds'].items())}
"""
    md_path = atomic_write_text(out / "report.md", md)
    js_path = atomic_write_json(out / "report.json", figures)
    return md_path, js_path
