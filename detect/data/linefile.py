"""Writing the line spec that goes with a data set written by synth, import or fix.

The spec's ``paths.root`` is the data set folder itself ("."), so the folder can be moved as a whole.
Settings of a given base spec (thresholds, training policy) are carried over unchanged.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from dataclasses import replace

from detect.linespec import LineSpec


def sanitize_line_id(name: str) -> str:
    """A valid line id from a folder name: lower case, other characters become '-'."""
    line = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-_")[:64]
    return line or "line"


def write_line_spec(
    out_dir: Path,
    classes: Sequence[str],
    line: str | None = None,
    base: LineSpec | None = None,
    image_size: int | None = None,
    model_size: str | None = None,
) -> LineSpec:
    """Save ``<out_dir>/<line>.yaml`` pointing at ``out_dir``; returns the loaded-equivalent spec."""
    out_dir = Path(out_dir).resolve()
    line = line or (base.line if base else sanitize_line_id(out_dir.name))
    raw = base.to_dict(out_dir) if base else {}
    raw.update({"line": line, "classes": list(classes), "paths": {"root": "."}})
    raw["image_size"] = image_size or raw.get("image_size", 320)
    raw["model_size"] = model_size or raw.get("model_size", "s")
    spec = LineSpec.from_dict(raw, out_dir, where=f"line spec for '{out_dir}'")
    path = spec.save(out_dir / f"{line}.yaml")
    return replace(spec, source=path.resolve())
