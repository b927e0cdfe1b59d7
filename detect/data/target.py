"""What a data verb was pointed at: a line spec, a data set folder or one COCO JSON file.

Resolving it once here keeps ``check``, ``stats`` and ``split`` agreeing on where the images and
annotation files of a line are.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_runtime.errors import UserInputError
from detect.linespec import LineSpec

from .coco import Layout, class_names, load_coco


@dataclass
class Target:
    """Annotation files to read, their image folder, and the classes they must use."""

    ann_files: list[Path]
    images_dir: Path
    classes: list[str]
    spec: LineSpec | None = None
    root: Path | None = None

    @property
    def main_ann(self) -> Path:
        """The file that holds every image (all.json when there is one)."""
        return self.ann_files[0]


def resolve_target(target: str | Path) -> Target:
    """Find annotation files, images and classes for a line spec, a layout folder or a COCO file."""
    target = Path(target)
    if target.suffix in (".yaml", ".yml"):
        spec = LineSpec.load(target)
        layout = Layout(spec.paths.root)
        files = [p for p in (layout.all, spec.paths.train, spec.paths.val) if p.is_file()]
        if not files:
            raise UserInputError(
                f"line spec '{target}': no annotation file found ({layout.all}, {spec.paths.train}, "
                f"{spec.paths.val}). Create one with `defectkit data import` or `defectkit synth`."
            )
        return Target(_dedupe(files), spec.paths.images, list(spec.classes), spec, spec.paths.root)
    if target.is_dir():
        layout = Layout(target)
        files = [p for p in (layout.all, layout.train, layout.val) if p.is_file()]
        if not files:
            raise UserInputError(
                f"'{target}' has no annotations/all.json, train.json or val.json: not a data set in the kit's "
                "layout. Convert it with `defectkit data import`."
            )
        return Target(files, layout.images, class_names(load_coco(files[0])), None, target)
    if target.suffix == ".json":
        if not target.is_file():
            raise UserInputError(f"annotation file '{target}' does not exist.")
        images = target.parent.parent / "images" if target.parent.name == "annotations" else target.parent / "images"
        if not images.is_dir():
            images = target.parent
        return Target([target], images, class_names(load_coco(target)), None, None)
    raise UserInputError(
        f"'{target}' is not a line spec (.yaml), a data set folder or a COCO .json file."
    )


def _dedupe(paths: list[Path]) -> list[Path]:
    seen, out = set(), []
    for p in paths:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            out.append(p)
    return out
