"""``defectkit compress --method prune|ptq|qat RUN``: make variants, measure them, gate them, tabulate.

The order is always the same, whatever the method:
1. the FP32 parent: the run's export (made if missing), evaluated once and cached in
   ``compress/fp32/variant.json``, golden images chosen from it once (``compress/golden.json``);
2. the method writes its variant(s) (compress/ptq.py, ort_quant.py, prune.py, qat.py);
3. each variant is evaluated with the same COCO evaluation as the parent, timed per backend and thread
   count, and judged by the gate (compress/gate.py) — the verdict and its figures go into variant.json;
4. the table of every variant of the run is rewritten (compress/table.py).
A refused variant stays on disk with its figures (so it can be studied) but ``defectkit bundle`` will not
ship it.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from compress.gate import choose_golden, gate_settings, golden_check, judge
from compress.measure import evaluate_model, median_latency_ms
from compress.table import TablePaths, write_table
from compress.variants import (COMPRESS_DIR, PARENT, Variant, list_variants, model_size_mb, settings_record,
                               variant_dir)
from detect.linespec import LineSpec
from detect.ppyoloe import RunPaths
from detect.run_settings import load_run_spec, settings_path
from edge_runtime.errors import ConfigError, DataError, ModelError, UserInputError
from edge_runtime.fileio import atomic_write_json
from edge_runtime.modelspec import ModelSpec

log = logging.getLogger("defectkit.compress")
GOLDEN_FILE = "golden.json"
BACKEND_OF = {"onnx": "onnxruntime", "paddle": "paddle"}


@dataclass
class CompressResult:
    parent: Variant
    variants: list[Variant]
    table: TablePaths
    messages: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ inputs


def load_run(run_dir: str | Path) -> tuple[LineSpec, RunPaths]:
    """The run and the spec it trained with (its ``settings.yaml``: settings exactly as used, command-line
    overrides included); refuse a run whose model's classes differ from that record."""
    run = RunPaths(Path(run_dir))
    if not run.root.is_dir():
        raise UserInputError(f"run {run.root} does not exist. Train first: `defectkit train LINE.yaml`.")
    spec = load_run_spec(run.root)
    if not run.best_weights.is_file():
        raise UserInputError(f"run {run.root} has no best weights ({run.best_weights}); let it finish or resume it.")
    check_classes(spec, run)
    return spec, run


def check_classes(spec: LineSpec, run: RunPaths) -> None:
    """The run's model must predict the line's classes, in the line's order (the bundle contract)."""
    sources = []
    if run.metrics.is_file():
        m = json.loads(run.metrics.read_text())
        if isinstance(m.get("classes"), list):
            sources.append((run.metrics, m["classes"]))
    deploy = run.export_dir / "deploy.json"
    if deploy.is_file():
        sources.append((deploy, ModelSpec.load(deploy).classes))
    for path, classes in sources:
        if list(classes) != list(spec.classes):
            raise ConfigError(f"{path}: the run's model has {len(classes)} classes {classes} but the run's "
                              f"{settings_path(run.root)} records {len(spec.classes)} {spec.classes}. Retrain "
                              "for this line or compress the run made with it.")


def compress_layer(layer: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The command-line layer of ``defectkit compress`` (``--set KEY=VALUE`` names ``compress.KEY``). Other
    sections are the run's (train, runtime ...): refused, because the bundle reads them back from the run's
    settings.yaml and must see what the gate judged with."""
    for section, values in layer.items():
        if section != "compress" and values:
            keys = ", ".join(f"{section}.{k}" for k in values)
            raise UserInputError(f"--set {keys}: compress only overrides compress.* settings; '{section}' settings "
                                 "are the run's (give them to `defectkit train` and train again).")
    return {"compress": dict(layer["compress"])} if layer.get("compress") else {}


def calibration_images(spec: LineSpec, count: int) -> list[Path]:
    """``count`` training images spread evenly over the training set (deterministic)."""
    from detect.data.coco import load_coco

    if count < 1:
        raise UserInputError(f"compress.calib_images must be at least 1, got {count}.")
    coco = load_coco(spec.paths.train)
    images = [spec.paths.images / im["file_name"] for im in coco["images"]]
    if not images:
        raise DataError(f"{spec.paths.train} lists no images: calibration needs the line's training images.")
    step = max(1, len(images) // count)
    chosen = images[::step][:count]
    missing = [str(p) for p in chosen if not p.is_file()]
    if missing:
        raise DataError(f"calibration images missing under {spec.paths.images}: {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}. Restore them or fix {spec.paths.train} "
                        "(`defectkit data check`).")
    return chosen


# ----------------------------------------------------------------------------------------------- measure


def primary_model(v: Variant) -> tuple[str, str]:
    """(model file, backend) the variant is evaluated with: host-NMS ONNX first, then host-NMS paddle."""
    spec = ModelSpec.load(v.deploy_json)
    ranked = sorted((m for m in spec.models if m.format in BACKEND_OF),
                    key=lambda m: (m.nms != "host", m.format != "onnx"))
    if not ranked:
        raise ConfigError(f"{v.deploy_json} lists no ONNX or paddle model to evaluate variant {v.name} with.")
    return ranked[0].file, BACKEND_OF[ranked[0].format]


def latency_of(v: Variant, images: list[Path], threads: list[int]) -> dict[str, float]:
    """Median inference latency of every host-runnable host-NMS model of the variant, per thread count."""
    spec = ModelSpec.load(v.deploy_json)
    out: dict[str, float] = {}
    for m in spec.models:
        if m.format not in BACKEND_OF or m.nms != "host":
            continue
        backend = BACKEND_OF[m.format]
        for t in threads:
            out[f"{backend}@{t}"] = median_latency_ms(v.export_dir / m.file, images, backend, t)
    return out


def measure(v: Variant, spec: LineSpec, images: list[Path], threads: list[int], progress: bool) -> Variant:
    model, backend = primary_model(v)
    v.eval_model = model
    v.eval = evaluate_model(v.export_dir / model, spec, backend=backend, progress=progress).to_dict()
    v.size_mb = model_size_mb(v.export_dir, model)
    if threads:
        v.latency_ms = latency_of(v, images, threads)
    return v


# ------------------------------------------------------------------------------------------------ parent


def ensure_parent(spec: LineSpec, run: RunPaths, threads: list[int], progress: bool = True) -> Variant:
    """The run's FP32 export as a measured variant (exported and measured once, then read from disk)."""
    path = variant_dir(run.root, PARENT) / "variant.json"
    if path.is_file():
        parent = Variant.load(path)
        check_same_settings(parent, run)
        return parent
    if not (run.export_dir / "deploy.json").is_file():
        from detect.export import export

        log.info("exporting the FP32 parent into %s", run.export_dir)
        export(spec, run.best_weights, run.export_dir)
    parent = Variant(name=PARENT, method="fp32", parent=None, export_dir=run.export_dir.resolve(),
                     recipe={"weights": str(run.best_weights)}, settings=settings_record(run.root, spec))
    parent.gflops, parent.params_m = model_cost(spec, run.best_weights)
    measure(parent, spec, calibration_images(spec, 8), threads, progress)
    parent.save(run.root)
    return parent


def check_same_settings(v: Variant, run: RunPaths) -> None:
    """A cached variant measured under another settings.yaml of the run is stale: say so instead of mixing."""
    recorded = (v.settings or {}).get("run_settings", {}).get("sha256")
    now = settings_record(run.root, None)["run_settings"]["sha256"]
    if recorded is not None and recorded != now:
        raise ConfigError(f"{variant_dir(run.root, v.name)}: measured under another {settings_path(run.root).name} "
                          f"of the run (sha256 {recorded[:12]} vs {now[:12]}); delete {run.root / COMPRESS_DIR} "
                          "and compress again.")


def model_cost(spec: LineSpec, weights: Path) -> tuple[float | None, float | None]:
    """(GFLOPs at the line's input size, parameters in millions) of the trained dygraph model."""
    try:
        from compress.prune import measure_cost
    except ImportError:  # the pruning module measures FLOPs the way PaddleSlim does; without it, unknown
        return None, None
    return measure_cost(spec, weights)


def golden_images(spec: LineSpec, run: RunPaths, parent: Variant, count: int) -> list[Path]:
    """The golden images of this run, chosen once from the parent with the run's runtime settings and kept in
    ``compress/golden.json`` (with those settings: the bundle checks it ships the same)."""
    path = run.root / COMPRESS_DIR / GOLDEN_FILE
    if path.is_file():
        return read_golden(path, spec)
    chosen = choose_golden(parent.export_dir / (parent.eval_model or "model_nonms.onnx"), spec, count)
    atomic_write_json(path, {"from": parent.name, "images": [str(p) for p in chosen],
                             "runtime": spec.settings.runtime.to_dict()})
    return chosen


def read_golden(path: Path, spec: LineSpec) -> list[Path]:
    """The golden image list; refused when it was chosen with other runtime settings than the run's."""
    record = json.loads(path.read_text())
    chosen_with = record.get("runtime")
    if chosen_with is not None and chosen_with != spec.settings.runtime.to_dict():
        raise ConfigError(f"{path} was chosen with runtime settings {chosen_with}, the run now records "
                          f"{spec.settings.runtime.to_dict()}; delete it and compress again.")
    return [Path(p) for p in record["images"]]


# ----------------------------------------------------------------------------------------------- methods


def _ptq(spec: LineSpec, run: RunPaths, parent: Variant, progress: bool) -> list[Variant]:
    from compress.ort_quant import ORT_RECIPES, quantize_onnx
    from compress.ptq import ptq_paddle

    c = spec.settings.compress
    calib = calibration_images(spec, c.calib_images)
    out = []
    for recipe in dict.fromkeys(c.ort_recipes):
        r = ORT_RECIPES[recipe]
        out.append(quantize_onnx(spec, parent.export_dir, variant_dir(run.root, r["variant"]), calib,
                                 max_excluded=c.ort_max_fp32_convs, progress=progress, ops=r["ops"], stem=r["stem"],
                                 name=r["variant"]))
    out.append(ptq_paddle(spec, parent.export_dir, variant_dir(run.root, "ptq-int8"), calib,
                          algo=c.ptq_algo, max_skipped=c.ptq_max_fp32_convs, progress=progress))
    for v in out:
        v.settings = settings_record(run.root, spec)
    return out


def _prune(spec: LineSpec, run: RunPaths, parent: Variant, progress: bool) -> list[Variant]:
    from compress.prune import prune

    c = spec.settings.compress
    name = f"prune-{round(c.prune_flops * 100)}"
    return [prune(spec, run.best_weights, variant_dir(run.root, name), flops_target=c.prune_flops,
                  criterion=c.prune_criterion, finetune_epochs=c.prune_epochs, progress=progress,
                  run_root=run.root)]


def _qat(spec: LineSpec, run: RunPaths, parent: Variant, progress: bool) -> list[Variant]:
    from compress.qat import qat

    return [qat(spec, run.best_weights, variant_dir(run.root, "qat-int8"), epochs=spec.settings.compress.qat_epochs,
                progress=progress, run_root=run.root)]


METHOD_RUNNERS: dict[str, Callable[..., list[Variant]]] = {"ptq": _ptq, "prune": _prune, "qat": _qat}


def check_run_spec(spec: LineSpec, recorded: LineSpec, run: RunPaths) -> None:
    """``spec`` must be the run's own with at most its compress section changed (the bundle reads everything
    else back from the run's settings.yaml and must see what the gate judged with)."""
    same_line = (spec.line, list(spec.classes), spec.image_size, spec.model_size) == (
        recorded.line, list(recorded.classes), recorded.image_size, recorded.model_size)
    others = [d for d in recorded.settings.differences(spec.settings) if not d.startswith("compress.")]
    if not same_line or others:
        raise ConfigError(f"compress {run.root}: the spec given is not the run's {settings_path(run.root)} "
                          f"(only compress.* may change){': ' + '; '.join(others[:5]) if others else ''}.")


def compress_run(run_dir: str | Path, method: str, spec: LineSpec | None = None, lite: bool = True,
                 latency: bool = True, progress: bool = True) -> CompressResult:
    """Make, measure and gate the ``method`` variants of a run; rewrite its comparison table.

    ``spec`` is the run's spec with the command line on top (``load_run(run)[0].with_cli(compress_layer(...))``,
    what ``defectkit compress`` does once); default: the run's settings.yaml as it is."""
    if method not in METHOD_RUNNERS:
        raise UserInputError(f"unknown compression method {method!r}; choose from {', '.join(METHOD_RUNNERS)}.")
    recorded, run = load_run(run_dir)
    spec = spec or recorded
    check_run_spec(spec, recorded, run)
    c = spec.settings.compress
    threads = list(c.latency_threads) if latency else []
    max_drop, _, _ = gate_settings(spec)
    parent = ensure_parent(spec, run, threads, progress)
    golden = golden_images(spec, run, parent, c.golden_images)
    messages = []
    if lite:
        from compress.lite_convert import edgebox_unavailable

        why = edgebox_unavailable()
        if why:
            messages.append(f"warning: Paddle Lite step skipped ({why}); every other result is kept")
            lite = False
    made = METHOD_RUNNERS[method](spec, run, parent, progress)
    for v in made:
        measure(v, spec, golden or calibration_images(spec, 4), threads, progress)
        check = golden_check(parent.export_dir / parent.eval_model, v.export_dir / v.eval_model, golden, spec)
        result = judge(v.name, parent.name, parent.map50_95 or 0.0, v.map50_95 or 0.0, check, max_drop)
        v.gate = result.to_dict()
        if v.gflops is None:
            v.gflops, v.params_m = parent.gflops, parent.params_m  # quantization keeps the graph's FLOPs
        v.save(run.root)  # saved before the Lite step: a Lite failure cannot lose the variant
        if lite:
            messages += add_lite(v, golden)
            v.save(run.root)
        messages.append(result.line())
    if lite and not any(e.format == "paddlelite" for e in ModelSpec.load(parent.deploy_json).models):
        messages += add_lite(parent, golden)
        parent.save(run.root)
    table = write_table(run.root, list_variants(run.root), f"{spec.line} / {run.root.name}")
    return CompressResult(parent, made, table, messages)


def add_lite(v: Variant, images: list[Path]) -> list[str]:
    """Paddle Lite .nb (x86 and ARM) from the variant's host-NMS paddle model, when it has one."""
    spec = ModelSpec.load(v.deploy_json)
    if not any(m.format == "paddle" and m.nms == "host" for m in spec.models):
        return []
    from compress.lite_variants import add_lite_models, verify_lite_x86

    try:
        entries = add_lite_models(v.export_dir)
        agreement = verify_lite_x86(v.export_dir, images)
    except (ModelError, UserInputError) as exc:  # the variant stands without .nb files; say why, keep going
        first = str(exc).splitlines()[0]
        v.recipe["lite"] = {"error": first}
        return [f"warning: {v.name}: Paddle Lite step failed ({first}); the variant is kept without .nb files"]
    v.recipe["lite"] = {"files": [e.file for e in entries], "x86_vs_paddle": agreement.summary(),
                        "x86_matches": agreement.ok(box_rel_tol=1e-3, score_tol=1e-3)}
    return [f"{v.name}: Paddle Lite {', '.join(e.file for e in entries)}; x86 .nb vs paddle.inference: "
            f"{agreement.summary()}"]


__all__ = ["CompressResult", "compress_run", "load_run", "compress_layer", "calibration_images", "ensure_parent", "measure",
           "primary_model", "METHOD_RUNNERS"]
