"""The comparison table every ``defectkit compress`` ends with: Markdown, CSV and a PNG plot.

One row per variant of the run (the FP32 parent first): mAP50-95, mAP50, the drop against the parent,
size, GFLOPs, median latency per backend and thread count, and the gate's verdict. The plot puts accuracy
against latency so the trade-off is seen, not read.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from compress.variants import COMPRESS_DIR, Variant
from edge_runtime.fileio import atomic_write_bytes, atomic_write_text


@dataclass
class TablePaths:
    markdown: Path
    csv: Path
    png: Path


def _fmt(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def latency_columns(variants: Sequence[Variant]) -> list[str]:
    """Every "<backend>@<threads>" key measured for any variant, backend then threads."""
    keys = {k for v in variants for k in v.latency_ms}
    return sorted(keys, key=lambda k: (k.split("@")[0], int(k.split("@")[1]) if "@" in k else 0))


def rows(variants: Sequence[Variant]) -> tuple[list[str], list[list[str]]]:
    parent = next((v for v in variants if v.parent is None), None)
    lat = latency_columns(variants)
    header = ["variant", "method", "mAP50-95", "mAP50", "Δ mAP50-95 (pt)", "size MB", "GFLOPs",
              *[f"{k} ms" for k in lat], "gate"]
    out = []
    for v in variants:
        drop = None
        if parent is not None and v.map50_95 is not None and parent.map50_95 is not None:
            drop = (v.map50_95 - parent.map50_95) * 100.0
        if v.gate is None:
            gate = "parent" if v.parent is None else "not run"
        else:
            gate = "passed" if v.gate["passed"] else "REFUSED"
        out.append([v.name, v.method, _fmt(v.map50_95, 4), _fmt(v.map50, 4),
                    "–" if drop is None else f"{drop:+.2f}", _fmt(v.size_mb, 2), _fmt(v.gflops, 2),
                    *[_fmt(v.latency_ms.get(k), 1) for k in lat], gate])
    return header, out


def to_markdown(variants: Sequence[Variant]) -> str:
    header, body = rows(variants)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    refused = [v for v in variants if v.gate and not v.gate["passed"]]
    for v in refused:
        lines.append(f"\n**{v.name} refused:** " + "; ".join(v.gate.get("reasons", [])))
    return "\n".join(lines) + "\n"


def to_csv(variants: Sequence[Variant]) -> str:
    header, body = rows(variants)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(body)
    return buf.getvalue()


def plot(variants: Sequence[Variant], title: str) -> bytes:
    """mAP50-95 against the fastest 2-thread latency of each variant; refused variants drawn hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [v.name for v in variants]
    maps = [v.map50_95 or 0.0 for v in variants]
    colours = ["#888888" if v.parent is None else ("#2a9d8f" if v.gate and v.gate["passed"] else "#e76f51")
               for v in variants]
    axes[0].bar(names, maps, color=colours)
    axes[0].set_ylabel("mAP50-95 (val)")
    axes[0].set_title("accuracy (grey parent, green passed, red refused)")
    axes[0].tick_params(axis="x", rotation=30)
    for v in variants:
        two = [ms for k, ms in v.latency_ms.items() if k.endswith("@2")]
        if not two or v.map50_95 is None:
            continue
        passed = v.parent is None or (v.gate and v.gate["passed"])
        axes[1].scatter(min(two), v.map50_95, s=60, facecolors="#2a9d8f" if passed else "none",
                        edgecolors="#264653")
        axes[1].annotate(v.name, (min(two), v.map50_95), textcoords="offset points", xytext=(5, 4), fontsize=8)
    axes[1].set_xlabel("fastest backend, 2 threads (ms / image)")
    axes[1].set_ylabel("mAP50-95")
    axes[1].set_title("accuracy vs latency")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_table(run_dir: str | Path, variants: Sequence[Variant], title: str = "") -> TablePaths:
    """Write ``<run>/compress/table.{md,csv,png}`` atomically; return their paths."""
    root = Path(run_dir) / COMPRESS_DIR
    root.mkdir(parents=True, exist_ok=True)
    md = atomic_write_text(root / "table.md", f"# Compression of {title or Path(run_dir).name}\n\n"
                           + to_markdown(variants))
    cs = atomic_write_text(root / "table.csv", to_csv(variants))
    png = atomic_write_bytes(root / "table.png", plot(variants, title or str(run_dir)))
    return TablePaths(Path(md), Path(cs), Path(png))


__all__ = ["TablePaths", "rows", "to_markdown", "to_csv", "plot", "write_table", "latency_columns"]
