"""The data of an incremental retrain: the parent run's images replayed beside the new ones, in one COCO set.

A retrain starts from a finished run of the line (the *parent*). Its training and validation sets are the
parent's (as recorded in the parent's ``settings.yaml``, so a retrain of a retrain carries everything forward)
plus every data folder given with ``--add`` (new images, labelled hard examples, images of a new defect
class). The merged set is written into the new run (``<run>/data``: images hard-linked, or copied across
file systems, under unique names), so the run stays resumable and reproducible when the sources move.

Class order is the contract with the edge box: the new class list must start with the parent's classes in
the same order; new classes are appended. Added data maps its categories to the line's classes by name.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from detect.data.coco import Layout, class_names, load_coco, make_coco, write_coco
from detect.data.split import stratified_split
from detect.linespec import DataPaths, LineSpec
from detect.ppyoloe import RunPaths
from detect.run_settings import load_run_spec
from edge_runtime.errors import ConfigError, DataError
from edge_runtime.hard_examples import unreviewed_prelabels


@dataclass(frozen=True)
class Parent:
    """A finished run a retrain starts from: its recorded spec (classes, data, settings), best weights, metrics."""

    run: RunPaths
    spec: LineSpec
    metrics: dict[str, Any]

    @property
    def weights(self) -> Path:
        return self.run.best_weights


def load_parent(run_dir: Path | str) -> Parent:
    """The parent run, refused with the fix when it is not a finished run of the kit."""
    import json

    run = RunPaths(Path(run_dir))
    where = f"parent run '{run.root}'"
    spec = load_run_spec(run.root)  # a clear error for a folder that is not a run, or a run from before settings.yaml
    if not run.metrics.is_file():
        raise ConfigError(f"{where} has not finished (no metrics.json): finish it first with "
                          f"`defectkit train --resume {run.root}`.")
    if not run.best_weights.is_file():
        raise ConfigError(f"{where} has no best weights ({run.best_weights}).")
    return Parent(run, spec, json.loads(run.metrics.read_text()))


def new_classes(parent: Sequence[str], classes: Sequence[str], where: str) -> list[str]:
    """The classes appended after the parent's; refuses a list that reorders, renames or drops one."""
    if list(classes[: len(parent)]) != list(parent):
        raise ConfigError(
            f"{where}: classes {list(classes)} must start with the parent model's classes {list(parent)} in the same "
            f"order (the order is the contract with the edge box). Append new defect classes at the end.")
    return list(classes[len(parent):])


def check_lineage(parent: Parent, spec: LineSpec) -> list[str]:
    """``spec`` may retrain ``parent``: same line, parent's classes first; returns the appended classes."""
    if spec.line != parent.spec.line:
        raise ConfigError(f"line spec {spec.source}: line '{spec.line}' is not the parent run's line "
                          f"'{parent.spec.line}'. Retrain a line from one of its own runs.")
    return new_classes(parent.spec.classes, spec.classes, f"line spec {spec.source or parent.run.settings}")


@dataclass(frozen=True)
class Part:
    """One source of images for the merged set: a COCO file, the folder its file names are relative to, a tag."""

    ann: Path
    images: Path
    tag: str


def added_parts(root: Path | str, tag: str) -> tuple[Part, Part | None]:
    """(train part, val part or None) of an ``--add`` folder in the kit's layout (``defectkit data import``)."""
    layout = Layout(Path(root))
    if not layout.root.is_dir():
        raise ConfigError(f"--add {root}: no such folder. Give a data folder with images/ and annotations/ "
                          f"(made by `defectkit data import`).")
    train = layout.train if layout.train.is_file() else layout.all
    if not train.is_file():
        raise DataError(f"--add {root}: neither {layout.train} nor {layout.all} exists. Import the images with "
                        f"`defectkit data import` (or split them with `defectkit data split`).")
    val = Part(layout.val, layout.images, f"{tag}v") if layout.val.is_file() and train == layout.train else None
    return Part(train, layout.images, tag), val


@dataclass
class Merged:
    """The merged set written into the run, with what came from where (for retrain.json)."""

    train: Path
    val: Path
    val_old: Path  # the parent's val set, categories renumbered to the new class list: the forgetting gate's set
    images: Path
    sources: list[dict[str, Any]] = field(default_factory=list)
    hashes: dict[str, str] = field(default_factory=dict)  # merged image file name -> sha256 of its content

    @property
    def train_images(self) -> int:
        """Images in the merged training set (what one epoch trains on)."""
        import json

        return len(json.loads(self.train.read_text())["images"])

    @property
    def new_share(self) -> tuple[int, int]:
        """(new training images, the line's training images: all of the parent's, replayed or not, plus the new).

        Added images already merged (duplicates) do not count. The share measures how much the line's data
        changed, so replaying a sample of the parent's images does not inflate it (nor the epochs)."""
        added = sum(s["images"] - s["duplicates"] for s in self.sources if s["split"] == "train" and s["tag"] != "parent")
        parent = next(s for s in self.sources if s["split"] == "train" and s["tag"] == "parent")
        return added, added + parent.get("parent_images", parent["images"])


def _link(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed: a copy
        shutil.copyfile(src, dst)


def _remap(part: Part, classes: Sequence[str], images_out: Path, coco: dict[str, Any], out_images: list,
           out_anns: list, seen: dict[str, tuple[int, str]], hashes: dict[str, str],
           known: dict[str, str] | None = None) -> dict[str, Any]:
    """Append ``coco``'s images (linked into ``images_out``) and boxes to the merged lists, categories by name.

    Images are recognised by content (sha256): an image already merged (the same file given twice, or a copy of a
    parent image among the new data) is not added again; its later labels replace the earlier ones and it is
    counted under ``duplicates``. ``known`` names parent images that are not in this merge (digest -> where):
    a copy of a parent training image that was not replayed is merged but counted as a duplicate, not as new
    data; a copy of a parent *validation* image (``parent-val``) is left out of training, or the forgetting
    gate would score the model on an image it trained on."""
    from detect.retrain_lineage import file_sha256, review_of

    if unreviewed_prelabels(coco):
        raise DataError(f"'{part.ann}' holds model pre-labels nobody has reviewed (info.reviewed is false): "
                        f"correct them in a labelling tool and re-export, or set info.reviewed to true.")
    names = {c["id"]: c["name"] for c in coco["categories"]}
    unknown = sorted(set(names.values()) - set(classes))
    if unknown:
        raise DataError(f"'{part.ann}': categories {unknown} are not classes of the line {list(classes)}. Add them at "
                        f"the end of 'classes' in the line spec (new defect classes), or fix their names.")
    cat_id = {cid: classes.index(name) + 1 for cid, name in names.items()}
    new_id: dict[int, int] = {}
    own: list[str] = []
    duplicates: dict[str, int] = {}
    for im in coco["images"]:
        src = (part.images / im["file_name"]).resolve()
        if not src.is_file():
            raise DataError(f"'{part.ann}': image id={im['id']} file_name={im['file_name']!r} not found at {src}. "
                            f"Run `defectkit data check {part.ann.parent.parent}`.")
        digest = file_sha256(src)
        own.append(digest)
        where = (known or {}).get(digest)
        if where is not None and digest not in seen:
            duplicates[where] = duplicates.get(where, 0) + 1
            if where == VAL_TAG:
                new_id[im["id"]] = None
                continue
        if digest in seen:  # the same image given twice (e.g. a relabelled hard example): the later labels win
            drop, where = seen[digest]
            duplicates[where] = duplicates.get(where, 0) + 1
            out_anns[:] = [a for a in out_anns if a["image_id"] != drop]
            new_id[im["id"]] = drop
            continue
        name = f"{part.tag}-{im['file_name'].replace('/', '_').replace(os.sep, '_')}"
        _link(src, images_out / name)
        hashes[name] = digest
        new_id[im["id"]] = len(out_images) + 1
        seen[digest] = (new_id[im["id"]], part.tag)
        out_images.append({"id": new_id[im["id"]], "file_name": name, "width": im["width"], "height": im["height"]})
    for a in coco["annotations"]:
        if new_id[a["image_id"]] is None:  # a parent val image: not trained on
            continue
        out_anns.append({**a, "id": len(out_anns) + 1, "image_id": new_id[a["image_id"]],
                         "category_id": cat_id[a["category_id"]]})
    import hashlib

    source = {"annotations": str(part.ann), "tag": part.tag, "images": len(coco["images"]),
              "boxes": len(coco["annotations"]), "classes": sorted(set(names.values())),
              "annotations_sha256": file_sha256(part.ann) if part.ann.is_file() else None,
              "images_sha256": hashlib.sha256("\n".join(sorted(own)).encode()).hexdigest(),
              "duplicates": sum(duplicates.values()), "duplicates_of": duplicates}
    review = review_of(coco)
    if review:
        source["review"] = review
    return source


def _merge(parts: list[tuple[Part, dict[str, Any]]], classes: Sequence[str], images_out: Path, dst: Path,
           description: str, hashes: dict[str, str] | None = None,
           known: dict[str, str] | None = None) -> tuple[Path, list[dict[str, Any]]]:
    images: list = []
    anns: list = []
    seen: dict[str, tuple[int, str]] = {}
    hashes = {} if hashes is None else hashes
    sources = [_remap(p, classes, images_out, coco, images, anns, seen, hashes, known) for p, coco in parts]
    for i, a in enumerate(anns, 1):
        a["id"] = i
    return write_coco(dst, make_coco(images, anns, classes, description)), sources


VAL_TAG = "parent-val"


def _parent_digests(images: Path, train: dict[str, Any], replay_set: dict[str, Any],
                    val: dict[str, Any]) -> dict[str, str]:
    """Content hash -> where, of the parent's images a training merge does not hold: its training images left out
    of the replay ("parent") and its validation images (``VAL_TAG``)."""
    from detect.retrain_lineage import file_sha256

    kept = {im["id"] for im in replay_set["images"]}
    out = {}
    for coco, tag in ((train, "parent"), (val, VAL_TAG)):
        for im in coco["images"]:
            if tag == VAL_TAG or im["id"] not in kept:
                path = images / im["file_name"]
                if path.is_file():
                    out[file_sha256(path)] = tag
    return out


def replay_count(n_parent: int, replay: float, n_new: int, batch_size: int) -> int:
    """How many parent images to replay: the share ``replay``, raised (when replay > 0) so that the merged set
    fills at least two batches — a few new images (k-shot) must not leave an epoch of one batch or none."""
    if not 0.0 <= replay <= 1.0:
        raise ConfigError(f"retrain.replay is a share of the parent's training images in [0, 1], got {replay}.")
    if replay <= 0.0:
        return 0
    return min(n_parent, max(round(replay * n_parent), 2 * batch_size - n_new, 1))


def replayed(parent_train: dict[str, Any], count: int, seed: int) -> dict[str, Any]:
    """``count`` of the parent's training images, stratified by rarest class (so a rare old class keeps its share),
    plus one image of any class the stratified draw left out (every old class is replayed); all of them when
    ``count`` covers the set."""
    from detect.data.coco import subset

    n = len(parent_train["images"])
    if count <= 0:
        return {**parent_train, "images": [], "annotations": []}
    if count >= n or n < 2:
        return parent_train
    kept, _ = stratified_split(parent_train, 1.0 - count / n, seed)
    ids = [im["id"] for im in kept["images"]]
    have = {a["category_id"] for a in kept["annotations"]}
    for a in sorted(parent_train["annotations"], key=lambda a: (a["category_id"], a["image_id"])):
        if a["category_id"] not in have:  # a class all of whose images fell on the dropped side
            ids.append(a["image_id"])
            have |= {b["category_id"] for b in parent_train["annotations"] if b["image_id"] == a["image_id"]}
    return subset(parent_train, ids)


def merge_data(parent: Parent, adds: Sequence[Path | str], classes: Sequence[str], out: Path, replay: float,
               seed: int, batch_size: int = 1) -> Merged:
    """Write ``out/{train,val,val_old}.json`` and ``out/images`` for a retrain of ``parent`` with ``adds``."""
    if not adds:
        raise ConfigError("a retrain needs new data: give at least one --add DATA_FOLDER (new images, labelled "
                          "hard examples or a new defect class).")
    images_out = out / "images"
    images_out.mkdir(parents=True, exist_ok=True)
    p = parent.spec.paths
    old_train, old_val = load_coco(p.train), load_coco(p.val)
    for ann, coco in ((p.train, old_train), (p.val, old_val)):
        if class_names(coco) != parent.spec.classes:
            raise DataError(f"'{ann}': categories {class_names(coco)} are not the parent's classes "
                            f"{parent.spec.classes}; the parent run's data changed since it trained.")
    val_parts = [(Part(p.val, p.images, "parent"), old_val)]
    added: list[tuple[Part, dict[str, Any]]] = []
    for i, root in enumerate(adds, 1):
        tr, va = added_parts(Path(root).resolve(), f"add{i}")  # absolute: lineage is read from anywhere
        added.append((tr, load_coco(tr.ann)))
        if va is not None:
            val_parts.append((va, load_coco(va.ann)))
    n_new = sum(len(coco["images"]) for _, coco in added)
    count = replay_count(len(old_train["images"]), replay, n_new, batch_size)
    replay_set = replayed(old_train, count, seed)
    train_parts = [(Part(p.train, p.images, "parent"), replay_set)] + added
    desc = f"defectkit retrain of {parent.run.root.name}"
    hashes: dict[str, str] = {}
    train, sources = _merge(train_parts, classes, images_out, out / "train.json", desc, hashes,
                            known=_parent_digests(p.images, old_train, replay_set, old_val))
    val, val_sources = _merge(val_parts, classes, images_out, out / "val.json", desc + " (val)", hashes)
    val_old, _ = _merge(val_parts[:1], classes, images_out, out / "val_old.json", desc + " (parent's val)")
    for s, role in zip(sources + val_sources, ["train"] * len(sources) + ["val"] * len(val_sources)):
        s["split"] = role
    sources[0].update(replay=replay, parent_images=len(old_train["images"]))
    if sum(s["images"] - s["duplicates_of"].get(VAL_TAG, 0) for s in sources[1:]) == 0:
        raise DataError(f"the new data ({', '.join(str(a) for a in adds)}) holds no training image (none, or only "
                        f"copies of the parent's validation images): an empty increment. Give data folders with new "
                        f"images or labelled hard examples (--add).")
    return Merged(train, val, val_old, images_out, sources + val_sources, hashes)


def retrain_spec(spec: LineSpec, merged: Merged) -> LineSpec:
    """The line spec the retrain trains with: ``spec`` (checked against the parent already), its data the
    merged set."""
    from dataclasses import replace

    return replace(spec, paths=DataPaths(root=merged.train.parent.resolve(), images=merged.images.resolve(),
                                         train=merged.train.resolve(), val=merged.val.resolve()))
