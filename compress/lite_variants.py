"""Paddle Lite ``.nb`` files for a variant's export directory, and the proof that the x86 one matches.

:func:`add_lite_models` takes the export's paddle model (host NMS by default: Lite has no kernel for every NMS
op), applies the program rewrite Paddle Lite needs for Paddle 2.6 exports (``compress.lite_convert.rewrite_for_lite``),
converts it with ``paddle_lite_opt`` inside the edge box for each target and appends one deploy.json entry per
``.nb`` (format paddlelite, the target, the source's precision and NMS place, the edge box's Paddle Lite version:
the runtime refuses a ``.nb`` made by another version). :func:`verify_lite_x86` runs the x86 ``.nb`` *inside*
the edge box (Python 3.9, paddlelite 2.13rc0, the kit's edge_runtime) and compares its detections with
paddle.inference on the host. An ARM ``.nb`` is never run here: it segfaults in the x86 runtime.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from compress.lite_convert import MODEL_FILE, PARAMS_FILE, TARGETS, edgebox_run, opt_in_edgebox, rewrite_for_lite
from detect.compare import Agreement, compare_detections
from edge_runtime.errors import ModelError, UserInputError
from edge_runtime.modelspec import ModelEntry, ModelSpec, file_sha256
from edge_runtime.postprocess import Detections

# Runs inside the box: the .nb through the edge runtime's Detector pieces; raw outputs and detections to an npz.
_BOX_SCRIPT = """
import json, sys
import cv2, numpy as np
from edge_runtime.postprocess import decode_outputs
from edge_runtime.predict import Detector
from edge_runtime.preprocess import model_feeds
nb, listing, out = sys.argv[1:4]
det = Detector.from_model(nb, backend="paddlelite", threads=1)
arrays = {}
for i, path in enumerate(json.load(open(listing))):
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise SystemExit("cannot decode " + path)
    raw = det.backend.infer(model_feeds(img, det.spec.input, det.backend.input_names))
    d = decode_outputs(raw, det.entry.nms, det.spec.postprocess, len(det.classes))
    arrays.update({"raw_%d_%d" % (i, j): r for j, r in enumerate(raw)})
    arrays.update({"boxes_%d" % i: d.boxes, "scores_%d" % i: d.scores, "classes_%d" % i: d.class_ids})
np.savez(out, **arrays)
print(json.dumps({"images": i + 1, "backend": det.backend.version()}))
"""


def _stage(export_dir: Path, source: str, work: Path) -> Path:
    """``<source>.pdmodel/.pdiparams`` copied as model.* (what rewrite_for_lite reads), then rewritten."""
    staged = work / "src"
    staged.mkdir()
    for suffix, name in ((".pdmodel", MODEL_FILE), (".pdiparams", PARAMS_FILE)):
        shutil.copyfile(export_dir / f"{source}{suffix}", staged / name)
    rewrite_for_lite(staged, work / "lite")
    return work / "lite"


def add_lite_models(export_dir: Path, targets: Sequence[str] = ("x86", "arm"),
                    source: str = "model_nonms") -> list[ModelEntry]:
    """Convert ``export_dir/<source>.pdmodel`` to ``<source>_<target>.nb`` per target in the edge box and append
    the entries to ``export_dir/deploy.json`` (entries for the same files are replaced). Returns the new entries."""
    export_dir = Path(export_dir).resolve()
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise UserInputError(f"Paddle Lite target(s) {bad or list(targets)} unknown; choose from {', '.join(TARGETS)}")
    deploy = ModelSpec.load(export_dir / "deploy.json")
    src = deploy.find(f"{source}.pdmodel")
    if src.format != "paddle":
        raise UserInputError(f"{export_dir / src.file} is {src.format}, not a paddle inference model: Paddle Lite "
                             "converts .pdmodel/.pdiparams only.")
    deploy.verify(export_dir, src)
    entries: list[ModelEntry] = []
    with tempfile.TemporaryDirectory(prefix=".lite-", dir=export_dir) as tmp:
        fixed = _stage(export_dir, source, Path(tmp))
        for target in dict.fromkeys(targets):
            lite = opt_in_edgebox(fixed, export_dir / f"{source}_{target}", target)
            entries.append(ModelEntry(file=lite.path.name, format="paddlelite", target=target,
                                      precision=src.precision, nms=src.nms, runtime_version=lite.version,
                                      sha256=file_sha256(lite.path)))
    new = {e.file for e in entries}
    current = ModelSpec.load(export_dir / "deploy.json")  # re-read: keep whatever was added meanwhile
    current.models = [m for m in current.models if m.file not in new] + entries
    current.save(export_dir / "deploy.json")
    return entries


def _lite_entry(deploy: ModelSpec, reference: str, where: Path) -> ModelEntry:
    ref_stem = Path(reference).stem
    found = [m for m in deploy.models if m.format == "paddlelite" and m.target == "x86"]
    found.sort(key=lambda m: not m.file.startswith(ref_stem + "_"))
    if not found:
        raise UserInputError(f"{where} lists no x86 Paddle Lite model: run add_lite_models on {where.parent} first.")
    return found[0]


def run_lite_x86(export_dir: Path, images: Sequence[Path], nb_file: str | None = None,
                 timeout: float = 600) -> list[tuple[list[np.ndarray], Detections]]:
    """Run the x86 ``.nb`` in the edge box on ``images``: per image (raw outputs, detections)."""
    export_dir = Path(export_dir).resolve()
    deploy_path = export_dir / "deploy.json"
    deploy = ModelSpec.load(deploy_path)
    entry = deploy.find(nb_file) if nb_file else _lite_entry(deploy, "model_nonms.pdmodel", deploy_path)
    if entry.format != "paddlelite" or entry.target != "x86":
        raise UserInputError(f"{entry.file} is a {entry.format}/{entry.target} model; only an x86 .nb runs here "
                             "(an ARM .nb crashes the x86 runtime).")
    images = [Path(p).resolve() for p in images]
    missing = [str(p) for p in images if not p.is_file()]
    if not images or missing:
        raise UserInputError(f"verify Paddle Lite: images missing: {', '.join(missing[:3]) or 'none given'}")
    with tempfile.TemporaryDirectory(prefix="defectkit-lite-") as tmp:
        work = Path(tmp)
        (work / "images.json").write_text(json.dumps([str(p) for p in images]))
        binds = [export_dir, work, *dict.fromkeys(p.parent for p in images)]
        proc = edgebox_run(["python", "-c", _BOX_SCRIPT, str(export_dir / entry.file), str(work / "images.json"),
                            str(work / "out.npz")], binds, timeout=timeout, check=False)
        if proc.returncode != 0 or not (work / "out.npz").is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
            raise ModelError(f"Paddle Lite x86 run of {export_dir / entry.file} in the edge box failed "
                             f"(exit {proc.returncode}):\n{tail}")
        data = np.load(work / "out.npz")
        out = []
        for i in range(len(images)):
            raw = [data[f"raw_{i}_{j}"] for j in range(len([k for k in data.files if k.startswith(f"raw_{i}_")]))]
            out.append((raw, Detections(data[f"boxes_{i}"], data[f"scores_{i}"], data[f"classes_{i}"])))
    return out


def verify_lite_x86(export_dir: Path, images: list[Path], *, reference: str = "model_nonms.pdmodel",
                    min_score: float = 0.0, timeout: float = 600) -> Agreement:
    """Detections of the x86 ``.nb`` (edge box) vs paddle.inference on ``reference`` (host), image by image."""
    import cv2

    from edge_runtime.predict import Detector

    export_dir = Path(export_dir).resolve()
    deploy = ModelSpec.load(export_dir / "deploy.json")
    entry = _lite_entry(deploy, reference, export_dir / "deploy.json")
    host = Detector.from_model(export_dir / reference, backend="paddle")
    lite = run_lite_x86(export_dir, images, entry.file, timeout)
    acc = Agreement()
    for path, (_, got) in zip(images, lite):
        compare_detections(host(cv2.imread(str(path), cv2.IMREAD_COLOR)), got, Path(path).name, acc, min_score)
    return acc


__all__ = ["add_lite_models", "verify_lite_x86", "run_lite_x86"]
