"""``defectkit bundle RUN [--variant NAME ...]``: a signed bundle from gated variants of a training run.

Without ``--variant``: FP32 and every variant the gate passed that has a host-NMS ONNX model (:func:`default_variants`);
each model entry names its variant, FP32 first, and the box times the ONNX Runtime variants on its own CPU and runs
the fastest that passes its self-test, never one slower than FP32 (:mod:`edge_runtime.variant_choice`). Variants left
out (refused by the gate, never gated, no ONNX model) are listed with the reason in the recipe's
``variants_not_packed``.

What goes in (ARCHITECTURE.md, Bundle):
- the model files of each variant (a variant refused by the gate is never shipped; a Paddle Lite x86 ``.nb``
  only when it matched paddle.inference on the golden images; the ARM ``.nb`` is shipped as converted: no
  ARM CPU here to run it — the manifest recipe says so);
- the run's golden images with the FP32 parent's detections *on paddle.inference* as the expected output: the gate
  compared every variant with the parent on these images within the self-test's tolerance, and the box's
  self-test compares each backend it runs (ONNX Runtime, Paddle Lite) with them, so it checks another runtime
  than the one that made the expectations, never a model against itself;
- ``drift_reference.json`` built on the line's training images with the edge runtime's own statistics code
  (``edge_runtime.run.drift_features_of``: the same function the box calls on every frame);
- gate metrics and the compression recipe; the manifest signed with the line's Ed25519 key;
- the manifest's ``settings``: the run's runtime, drift and report sections (its settings.yaml, read with
  ``load_run_spec``). The drift reference and the golden images' choice are made with exactly that runtime
  section, so the box decides and monitors with the thresholds the reference was built with.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Sequence

from compress.bundle import ModelFile, build_bundle, models_from_deploy
from compress.gate import golden_tolerance, runtime_config
from compress.measure import read_image
from compress.pipeline import GOLDEN_FILE, load_run, primary_model, read_golden
from compress.variants import COMPRESS_DIR, PARENT, Variant, list_variants, load_variant, settings_record
from detect.linespec import LineSpec
from detect.run_settings import settings_path
from edge_runtime.errors import ConfigError, UserInputError
from edge_runtime.settings import BoxSettings, RuntimeSettings

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

log = logging.getLogger("defectkit.bundle")

FORMAT_PREFERENCE = ("onnx", "paddlelite", "paddle")
_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


def shippable(v: Variant, allow_refused: bool = False) -> None:
    """Refuse a variant the gate refused (or never judged), with the gate's own figures."""
    if v.name == PARENT:
        return
    if v.gate is None:
        raise UserInputError(f"variant {v.name} was never gated; run `defectkit compress` on the run again.")
    if not v.gate["passed"] and not allow_refused:
        raise UserInputError(f"variant {v.name} was refused by the gate: {'; '.join(v.gate['reasons'])}. "
                             "Ship its parent (--variant fp32) or another variant.")


def next_version(store: Path, line: str) -> tuple[str, str | None]:
    """(new version, newest existing version): semantic versions, the major bumped per new bundle."""
    existing = [p.name for p in (store / line).glob("*") if p.is_dir() and _SEMVER.match(p.name)]
    if not existing:
        return "1.0.0", None
    newest = max(existing, key=lambda n: tuple(int(x) for x in _SEMVER.match(n).groups()))
    return f"{int(_SEMVER.match(newest).group(1)) + 1}.0.0", newest


def variant_models(v: Variant, prefix: bool, formats: Sequence[str] = FORMAT_PREFERENCE) -> list[ModelFile]:
    """The variant's host-NMS model files of ``formats``, and Lite x86 ``.nb`` files only when they matched
    paddle.inference; each tagged with the variant's name (the box chooses between variants by it)."""
    _, files = models_from_deploy(v.deploy_json)
    lite = v.recipe.get("lite", {})
    out = []
    for m in files:
        if m.format not in formats:
            continue
        if m.format == "paddlelite" and m.target == "x86" and not lite.get("x86_matches", False):
            continue
        if m.nms == "in_model":  # every edge backend runs the host-NMS form (Paddle Lite needs it): ship one form
            continue
        name = f"{v.name}-{m.path.name}" if prefix else None
        out.append(ModelFile(m.path, m.format, m.target, m.precision, m.nms, m.runtime_version, m.params, name,
                             variant=v.name))
    # the runtime takes the first runnable model: ONNX Runtime, then Paddle Lite, then Paddle Inference
    return sorted(out, key=lambda m: FORMAT_PREFERENCE.index(m.format))


def default_variants(run_dir: Path) -> tuple[list[str], dict[str, str]]:
    """What ``defectkit bundle RUN`` packs without ``--variant``: FP32 always, then every variant the gate passed
    that has a host-NMS ONNX model (the box times these on its own CPU and runs the fastest). Returns (names,
    {variant left out: why}): a refused or never-gated variant is never packed, and the reason travels in the
    manifest's recipe."""
    from edge_runtime.modelspec import ModelSpec

    names, left_out = [PARENT], {}
    for v in list_variants(run_dir):
        if v.name == PARENT:
            continue
        if v.gate is None:
            left_out[v.name] = "never gated"
        elif not v.gate["passed"]:
            left_out[v.name] = "refused by the gate: " + "; ".join(v.gate["reasons"])
        elif not any(m.format == "onnx" and m.nms == "host" for m in ModelSpec.load(v.deploy_json).models):
            left_out[v.name] = "no host-NMS ONNX model (not an ONNX Runtime variant; name it with --variant)"
        else:
            names.append(v.name)
    return names, left_out


def _images(spec: LineSpec, ann: Path, limit: int) -> list[Path]:
    coco = json.loads(Path(ann).read_text())
    images = [spec.paths.images / im["file_name"] for im in coco["images"]]
    step = max(1, len(images) // limit) if limit else 1
    return images[::step][:limit] if limit else images


def box_settings(spec: LineSpec, where: str) -> BoxSettings:
    """The box's sections of the run's settings, as the manifest carries them (every key, checked)."""
    return BoxSettings.from_sections(spec.settings.box_sections(), where, require_all=True)


def parent_train_images(run_root: Path) -> list[Path]:
    """A retrain's parent's training images (none for a first run): a retrain replays only a share of them, but
    they are frames of the same line, so a drift reference may use them when the retrain's own data is small."""
    record = Path(run_root) / "retrain.json"
    if not record.is_file():
        return []
    from detect.run_settings import load_run_spec

    parent = load_run_spec(Path(json.loads(record.read_text())["parent"]["run"]))
    return _images(parent, parent.paths.train, 0)


def drift_reference(spec: LineSpec, model: Path, out: Path, max_images: int = 400, progress: bool = True,
                    runtime: RuntimeSettings | None = None, more_images: Sequence[Path] = ()) -> Path:
    """``drift_reference.json`` from the training images, through the model that is shipped, decided with
    ``runtime`` (default: the spec's runtime section; recorded in the reference's ``meta.runtime``); a small line
    adds its validation images, then ``more_images`` (a retrain's parent's training images)."""
    from edge_runtime.decision import decide
    from edge_runtime.drift import build_reference
    from edge_runtime.drift.reference import MIN_REFERENCE_FRAMES
    from edge_runtime.predict import Detector
    from edge_runtime.run import drift_features_of

    det = Detector.from_model(model)
    cfg = runtime if runtime is not None else runtime_config(spec)
    images = _images(spec, spec.paths.train, max_images)
    if len(images) < MIN_REFERENCE_FRAMES:  # a small line: its validation images are in-distribution too
        images += _images(spec, spec.paths.val, max_images - len(images))
    if len(images) < MIN_REFERENCE_FRAMES:
        known = set(images)
        images += [p for p in more_images if p not in known][: max_images - len(images)]
    it = tqdm(images, desc="drift reference", unit="img", leave=False) if (progress and tqdm) else images
    feats = []
    for path in it:
        img = read_image(path, "training image")
        feats.append(drift_features_of(img, decide(det(img), det.classes, cfg), len(det.classes)))
    ref = build_reference(feats, class_names=det.classes, meta={"line": spec.line, "model": model.name,
                                                              "images": len(feats), "runtime": cfg.to_dict()})
    return ref.save(out)


def golden_model(run_dir: Path) -> Path:
    """The FP32 parent's host-NMS paddle model: what the golden expectations are computed with (paddle.inference)."""
    from edge_runtime.modelspec import ModelSpec

    parent = load_variant(run_dir, PARENT)
    entries = [m for m in ModelSpec.load(parent.deploy_json).models if m.format == "paddle" and m.nms == "host"]
    if not entries:
        raise UserInputError(f"{parent.deploy_json} lists no host-NMS paddle model: the golden expectations are made "
                             "with it on paddle.inference. Re-export the run (`defectkit export --run RUN`).")
    return parent.export_dir / entries[0].file


def golden_expected(run_dir: Path, spec: LineSpec, model: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(image, expected record) for the run's golden images (chosen with the run's runtime settings), from
    ``model`` on paddle.inference (:func:`golden_model`)."""
    from edge_runtime.predict import Detector
    from edge_runtime.selftest import expected_record

    path = run_dir / COMPRESS_DIR / GOLDEN_FILE
    if not path.is_file():
        raise UserInputError(f"{path} is missing: run `defectkit compress --method ... {run_dir}` first "
                             "(it chooses the golden images from the parent).")
    det = Detector.from_model(model, backend="paddle")
    out = []
    for p in read_golden(path, spec):
        img = read_image(p, f"golden image (listed in {path})")
        out.append((Path(p), expected_record(det(img), det.classes)))
    return out


def retrain_record(run_dir: Path, allow_refused: bool) -> dict | None:
    """A retrained run ships only when its forgetting gate passed (``defectkit retrain`` wrote the verdict)."""
    from detect.retrain import read_record

    record = read_record(run_dir)
    if record is None or record.get("status") == "passed" or (allow_refused and record.get("status") == "refused"):
        return record
    if record.get("status") == "refused":
        reasons = "; ".join(record.get("forgetting", {}).get("reasons", [])) or "see retrain.md"
        raise ConfigError(f"run '{run_dir}' is a retrain that forgot old classes ({reasons}); it is not shipped. "
                          f"Retrain with more replay or epochs (figures: {Path(run_dir) / 'retrain.md'}).")
    raise ConfigError(f"run '{run_dir}' is a retrain that has not been judged yet (status "
                      f"{record.get('status')!r}): finish it with `defectkit retrain --resume {run_dir}`.")


def retrain_recipe(retrained: dict) -> dict:
    """The manifest recipe's ``retrain`` entry: parent, new classes, verdict, and the lineage (data version,
    sources and reviews, parent chain: :mod:`detect.retrain_lineage`) with the epochs/lr policy."""
    out = {"parent_run": retrained["parent"]["run"], "new_classes": retrained["new_classes"],
           "status": retrained["status"], "replay": retrained["retrain"]["replay"]}
    if retrained.get("lineage"):
        from detect.retrain_lineage import summary

        out["lineage"] = summary(retrained["lineage"])
        out["policy"] = retrained.get("policy")
        out["teacher"] = {k: v for k, v in (retrained.get("teacher") or {}).items() if k != "weights"}
    return out


def bundle_from_run(run_dir: str | Path, variants: Sequence[str] | None, store: str | Path, key_path: str | Path,
                    version: str | None = None, parent_version: str | None = None,
                    allow_refused: bool = False, progress: bool = True) -> Path:
    """Build ``<store>/<line>/<version>/`` (+ ``.tar.gz``) from gated variants; return the directory.

    ``variants`` None: FP32 and every gate-passed ONNX Runtime variant (:func:`default_variants`); the box picks
    among them by timing them on its own CPU. Named variants are packed with all their shippable files."""
    from compress.keys import load_private_key

    if variants is not None and not variants:
        raise UserInputError("name at least one --variant (see `<run>/compress/table.md`), or none to pack FP32 and "
                             "every gate-passed ONNX Runtime variant.")
    key = load_private_key(key_path)
    spec, run = load_run(run_dir)
    settings = box_settings(spec, str(settings_path(run.root)))
    retrained = retrain_record(run.root, allow_refused)
    left_out: dict[str, str] = {}
    auto_pick = variants is None
    if variants is None:
        variants, left_out = default_variants(run.root)
        for name, why in left_out.items():
            log.warning("variant %s is not packed: %s", name, why)
    chosen = [load_variant(run.root, n) for n in dict.fromkeys(variants)]
    for v in chosen:
        shippable(v, allow_refused)
    store = Path(store)
    auto, newest = next_version(store, spec.line)
    version = version or auto
    parent_version = parent_version if parent_version is not None else newest
    # picked automatically, a compressed variant ships its ONNX model only (the box chooses among ONNX Runtime
    # variants); the FP32 parent ships every form, first, so a box that predates variant choice runs FP32
    models = [m for v in chosen for m in variant_models(
        v, prefix=len(chosen) > 1, formats=("onnx",) if auto_pick and v.name != PARENT else FORMAT_PREFERENCE)]
    first = chosen[0]
    model_file, _ = primary_model(first)
    lead = first.export_dir / model_file
    deploy, _ = models_from_deploy(first.deploy_json)
    reference = golden_model(run.root)
    golden = golden_expected(run.root, spec, reference)
    staging = run.root / COMPRESS_DIR / ".bundle-work"
    staging.mkdir(parents=True, exist_ok=True)
    drift = drift_reference(spec, lead, staging / "drift_reference.json", progress=progress,
                            runtime=settings.runtime, more_images=parent_train_images(run.root))
    metrics: dict[str, float] = {}
    for v in chosen:
        tag = "" if v is first else f"{v.name}."
        if v.eval:
            metrics[f"{tag}map50_95"] = float(v.eval["map50_95"])
            metrics[f"{tag}map50"] = float(v.eval["map50"])
        if v.gate:
            metrics[f"{tag}parent_map50_95"] = float(v.gate["parent_map50_95"])
            metrics[f"{tag}map_drop_pts"] = float(v.gate["map_drop_pts"])
            metrics[f"{tag}gate_passed"] = 1.0 if v.gate["passed"] else 0.0
    recipe = {v.name: {"method": v.method, "parent": v.parent, **v.recipe} for v in chosen}
    recipe["run"] = str(run.root)
    if left_out:
        recipe["variants_not_packed"] = left_out
    recipe["golden_from"] = f"{PARENT}/{reference.name} on paddle.inference"
    recipe["settings"] = settings_record(run.root, spec)  # the run's settings.yaml (sha256) and its overrides
    if retrained:
        f = retrained.get("forgetting", {})
        metrics["old_classes_map_drop_pts"] = float(f.get("drop_points", 0.0))
        recipe["retrain"] = retrain_recipe(retrained)
    if any(m.format == "paddlelite" and m.target == "arm" for m in models):
        recipe["arm_note"] = "ARM .nb converted by paddle_lite_opt but not run: no ARM CPU on the build machine"
    return build_bundle(store, spec.line, version, parent_version, models, deploy.input, deploy.postprocess,
                        spec.classes, metrics, recipe, golden, drift, key, settings=settings,
                        golden_tolerance=golden_tolerance(spec))


__all__ = ["bundle_from_run", "default_variants", "box_settings", "next_version", "drift_reference", "variant_models", "shippable"]
