"""Lineage of a retrained model: the data version it trained on and the chain of models it came from.

Every retrain records in ``retrain.json`` under ``lineage``:

- ``data_version``: sha256 over the merged ``train.json`` and ``val.json`` and the content hash of every merged
  image (``<run>/data/lineage.json`` lists each image's sha256 and the source it came from);
- ``sources``: per source (the parent's replayed data, each ``--add`` folder, train and val), its annotation file
  and sha256, a digest of its images' hashes, the images it shared with an earlier source (``duplicates``), and
  what the labelling export says about review (``info.reviewed``, ``reviewed_by``, ``reviewed_at`` ...);
- ``parents``: the parent model (run, weights sha256, classes, its data version) and the parent's own parents,
  back to the first fine-tune of the line (whose data is identified by its annotation files' hashes).

``defectkit lineage RUN`` prints it; ``defectkit bundle`` carries it in the manifest's ``recipe``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from detect.checkpoints import file_sha256

REVIEW_KEYS = ("reviewed", "reviewed_by", "reviewed_at", "reviewer", "review_date", "description", "line", "exported")
LINEAGE_FILE = "lineage.json"


def _record(run_dir: Path | str) -> dict[str, Any] | None:
    path = Path(run_dir) / "retrain.json"
    return json.loads(path.read_text()) if path.is_file() else None


def review_of(coco: dict[str, Any]) -> dict[str, Any]:
    """What a COCO file's ``info`` says about who made and reviewed its labels (only the keys it has)."""
    info = coco.get("info") or {}
    return {k: info[k] for k in REVIEW_KEYS if k in info}


def data_version(train: Path, val: Path, hashes: dict[str, str]) -> str:
    h = hashlib.sha256()
    h.update(file_sha256(train).encode())
    h.update(file_sha256(val).encode())
    for name, digest in sorted(hashes.items()):
        h.update(f"{name}\t{digest}\n".encode())
    return h.hexdigest()


def _parent_entry(parent) -> dict[str, Any]:
    record = _record(parent.run.root)
    entry = {"run": str(parent.run.root.resolve()), "weights_sha256": file_sha256(parent.weights),
             "classes": list(parent.spec.classes)}
    if record and record.get("lineage"):
        lin = record["lineage"]
        return {**entry, "kind": "retrain", "data_version": lin["data_version"], "status": record.get("status"),
                "new_classes": record.get("new_classes", [])}, list(lin.get("parents", []))
    p = parent.spec.paths
    data = {role: {"annotations": str(path), "annotations_sha256": file_sha256(path) if Path(path).is_file() else None}
            for role, path in (("train", p.train), ("val", p.val))}
    return {**entry, "kind": "train", "data": data, "pretrained": parent.spec.settings.train.pretrained}, []


def build_lineage(parent, merged, run_root: Path) -> dict[str, Any]:
    """The ``lineage`` entry of retrain.json; writes ``<run>/data/lineage.json`` (every image's hash and source)."""
    from edge_runtime.fileio import atomic_write_json

    version = data_version(merged.train, merged.val, merged.hashes)
    atomic_write_json(Path(run_root) / "data" / LINEAGE_FILE,
                      {"data_version": version, "train_sha256": file_sha256(merged.train),
                       "val_sha256": file_sha256(merged.val),
                       "images": [{"file": n, "source": n.split("-", 1)[0], "sha256": d}
                                  for n, d in sorted(merged.hashes.items())]})
    head, chain = _parent_entry(parent)
    sources = [{k: s.get(k) for k in ("split", "tag", "annotations", "annotations_sha256", "images", "images_sha256",
                                      "duplicates", "duplicates_of", "review") if s.get(k) is not None}
               for s in merged.sources]
    return {"data_version": version, "images": len(merged.hashes), "sources": sources, "parents": [head] + chain}


def summary(lineage: dict[str, Any]) -> dict[str, Any]:
    """The part a bundle manifest carries: data version, sources without per-image detail, the parent chain."""
    return {"data_version": lineage["data_version"], "images": lineage.get("images"),
            "sources": lineage.get("sources", []),
            "parents": [{k: v for k, v in p.items() if k in ("run", "kind", "weights_sha256", "data_version",
                                                              "new_classes", "data")} for p in lineage["parents"]]}


def describe(run_dir: Path | str) -> str:
    """``defectkit lineage RUN``: the text."""
    from detect.run_settings import load_run_spec

    run_dir = Path(run_dir)
    record = _record(run_dir)
    lines = [f"run {run_dir.resolve()}"]
    if not record or not record.get("lineage"):
        spec = load_run_spec(run_dir)
        lines.append(f"  first fine-tune of line '{spec.line}' (not a retrain): classes {spec.classes}")
        for role, path in (("train", spec.paths.train), ("val", spec.paths.val)):
            sha = file_sha256(path) if Path(path).is_file() else "missing"
            lines.append(f"  {role}: {path} sha256 {sha[:16]}")
        lines.append(f"  started from: {spec.settings.train.pretrained or 'random initialisation'}")
        return "\n".join(lines)
    lin = record["lineage"]
    lines.append(f"  retrain ({record.get('status')}), classes {record.get('classes')}, new {record.get('new_classes')}")
    lines.append(f"  data version {lin['data_version'][:16]} ({lin.get('images')} images)")
    for s in lin["sources"]:
        review = s.get("review") or {}
        who = ""
        if review:
            who = " review: " + ", ".join(f"{k}={review[k]}" for k in ("reviewed", "reviewed_by", "reviewed_at",
                                                                        "reviewer", "review_date") if k in review)
        dup = f", {s['duplicates']} already merged" if s.get("duplicates") else ""
        lines.append(f"    {s.get('split')}/{s.get('tag')}: {s.get('images')} images{dup}, {s.get('annotations')} "
                     f"(sha256 {str(s.get('annotations_sha256'))[:16]}){who}")
    pol = record.get("policy") or {}
    if pol:
        lines.append(f"  epochs {pol.get('epochs')} ({pol.get('why')}); lr {pol.get('lr')}")
    done = record.get("training") or {}
    if done:
        resumed = done.get("resumed_after_epochs") or []
        lines.append(f"  trained {done.get('epochs_run')} of {done.get('epochs')} epochs (best {done.get('best_epoch')}, "
                     f"{done.get('stop_reason')})" + (f"; resumed after epoch {', '.join(map(str, resumed))}"
                                                      if resumed else ""))
    lines.append("  parents (newest first):")
    for i, p in enumerate(lin["parents"], 1):
        what = (f"retrain, data version {p['data_version'][:16]}" if p.get("kind") == "retrain"
                else "first fine-tune, data " + ", ".join(f"{r} {d['annotations_sha256'][:16] if d.get('annotations_sha256') else 'missing'}"
                                                          for r, d in (p.get("data") or {}).items()))
        lines.append(f"    {i}. {p['run']} weights {p['weights_sha256'][:16]} — {what}")
    return "\n".join(lines)


def lineage_json(run_dir: Path | str) -> str:
    record = _record(run_dir) or {}
    return json.dumps(record.get("lineage"), indent=1)
