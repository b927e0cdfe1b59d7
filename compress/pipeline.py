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
from compress.variants import COMPRESS_DIR, PARENT, Variant, list_variants, model_size_mb, variant_dir
from detect.linespec import LineSpec, resolve_settings
from detect.ppyoloe import RunPaths
from edge_runtime.errors import ConfigError, DataError, UserInputError
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
    """The run and the line spec it trained with; refuse a run whose classes differ from that spec."""
    run = RunPaths(Path(run_dir))
    if not run.root.is_dir():
        raise UserInputError(f"run {run.root} does not exist. Train first: `defectkit train LINE.yaml`.")
    if not run.line_spec.is_file():
        raise UserInputError(f"{run.root} is not a training run (no {run.line_spec.name}); pass runs/<line>/<run>.")
    spec = LineSpec.load(run.line_spec)
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
            raise ConfigError(f"{path}: the run's model has {len(classes)} classes {classes} but the line spec "
                              f"{run.line_spec} has {len(spec.classes)} {spec.classes}. Retrain for this spec "
                              "or compress the run made with it.")


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
        return Variant.load(path)
    if not (run.export_dir / "deploy.json").is_file():
        from detect.export import export

        log.info("exporting the FP32 parent into %s", run.export_dir)
        export(spec, run.best_weights, run.export_dir)
    parent = Variant(name=PARENT, method="fp32", parent=None, export_dir=run.export_dir.resolve(),
                     recipe={"weights": str(run.best_weights)})
    parent.gflops, parent.params_m = model_cost(spec, run.best_weights)
    measure(parent, spec, calibration_images(spec, 8), threads, progress)
    parent.save(run.root)
    return parent


def model_cost(spec: LineSpec, weights: Path) -> tuple[float | None, float | None]:
    """(GFLOPs at the line's input size, parameters in millions) of the trained dygraph model."""
    try:
        from compress.prune import measure_cost
    except ImportError:  # the pruning module measures FLOPs the way PaddleSlim does; without it, unknown
        return None, None
    return measure_cost(spec, weights)


def golden_images(spec: LineSpec, run: RunPaths, parent: Variant, count: int) -> list[Path]:
    """The golden images of this run, chosen once from the parent and kept in ``compress/golden.json``."""
    path = run.root / COMPRESS_DIR / GOLDEN_FILE
    if path.is_file():
        return [Path(p) for p in json.loads(path.read_text())["images"]]
    chosen = choose_golden(parent.export_dir / (parent.eval_model or "model_nonms.onnx"), spec, count)
    atomic_write_json(path, {"from": parent.name, "images": [str(p) for p in chosen]})
    return chosen


# ----------------------------------------------------------------------------------------------- methods


def _ptq(spec: LineSpec, run: RunPaths, s: Mapping[str, Any], parent: Variant, progress: bool) -> list[Variant]:
    from compress.ort_quant import quantize_onnx
    from compress.ptq import ptq_paddle

    calib = calibration_images(spec, int(s["calib_images"]))
    out = [quantize_onnx(spec, parent.export_dir, variant_dir(run.root, "ort-int8"), calib,
                         max_excluded=int(s["ort_max_fp32_convs"]), progress=progress)]
    out.append(ptq_paddle(spec, parent.export_dir, variant_dir(run.root, "ptq-int8"), calib,
                          algo=str(s["ptq_algo"]), max_skipped=int(s["ptq_max_fp32_convs"]), progress=progress))
    return out


def _prune(spec: LineSpec, run: RunPaths, s: Mapping[str, Any], parent: Variant, progress: bool) -> list[Variant]:
    from compress.prune import prune

    target = float(s["prune_flops"])
    name = f"prune-{round(target * 100)}"
    return [prune(spec, run.best_weights, variant_dir(run.root, name), flops_target=target,
                  criterion=str(s["prune_criterion"]), finetune_epochs=int(s["prune_epochs"]), progress=progress)]


def _qat(spec: LineSpec, run: RunPaths, s: Mapping[str, Any], parent: Variant, progress: bool) -> list[Variant]:
    from compress.qat import qat

    return [qat(spec, run.best_weights, variant_dir(run.root, "qat-int8"), epochs=int(s["qat_epochs"]),
                progress=progress)]


METHOD_RUNNERS: dict[str, Callable[..., list[Variant]]] = {"ptq": _ptq, "prune": _prune, "qat": _qat}


def compress_run(run_dir: str | Path, method: str, overrides: Mapping[str, Any] | None = None,
                 lite: bool = True, latency: bool = True, progress: bool = True) -> CompressResult:
    """Make, measure and gate the ``method`` variants of a run; rewrite its comparison table."""
    if method not in METHOD_RUNNERS:
        raise UserInputError(f"unknown compression method {method!r}; choose from {', '.join(METHOD_RUNNERS)}.")
    spec, run = load_run(run_dir)
    spec = spec.with_overrides("compress", overrides or {})
    settings = resolve_settings(spec, "compress")
    threads = [int(t) for t in settings["latency_threads"]] if latency else []
    max_drop, _, _ = gate_settings(spec)
    parent = ensure_parent(spec, run, threads, progress)
    golden = golden_images(spec, run, parent, int(settings["golden_images"]))
    messages = []
    made = METHOD_RUNNERS[method](spec, run, settings, parent, progress)
    for v in made:
        measure(v, spec, golden or calibration_images(spec, 4), threads, progress)
        check = golden_check(parent.export_dir / parent.eval_model, v.export_dir / v.eval_model, golden, spec)
        result = judge(v.name, parent.name, parent.map50_95 or 0.0, v.map50_95 or 0.0, check, max_drop)
        v.gate = result.to_dict()
        if v.gflops is None:
            v.gflops, v.params_m = parent.gflops, parent.params_m  # quantization keeps the graph's FLOPs
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

    entries = add_lite_models(v.export_dir)
    agreement = verify_lite_x86(v.export_dir, images)
    v.recipe["lite"] = {"files": [e.file for e in entries], "x86_vs_paddle": agreement.summary(),
                        "x86_matches": agreement.ok(box_rel_tol=1e-3, score_tol=1e-3)}
    return [f"{v.name}: Paddle Lite {', '.join(e.file for e in entries)}; x86 .nb vs paddle.inference: "
            f"{agreement.summary()}"]


__all__ = ["CompressResult", "compress_run", "load_run", "calibration_images", "ensure_parent", "measure",
           "primary_model", "METHOD_RUNNERS"]
