"""Structured filter pruning (PaddleSlim FPGM / L1-norm) of the backbone and neck, a fine-tune to recover, export.

PaddleDetection has no pruning recipe for PP-YOLOE; this is one (the model surgery is in
:mod:`compress.prune_filters`). The order of work:

1. the kit's training session (:func:`detect.train.build_session`: the line's config, seeded loader, callbacks)
   is built with the fine-tuned ``weights`` loaded;
2. ``trainer.model`` is pruned *in place*: one uniform filter ratio over every prunable conv of the backbone and
   the neck, either given (``ratio``) or searched by bisection so that the FLOPs drop by ``flops_target``
   (PaddleSlim's ``dygraph_flops``, measured before and after);
3. what captured the old shapes is rebuilt: the EMA (``ModelEMA`` copies the state dict at construction) and the
   optimizer (its accumulators are created lazily, on the old parameters otherwise);
4. ``finetune_epochs`` epochs of training with the run's train settings under :data:`PRUNE_FINETUNE_RECIPE`
   (never a frozen backbone: the pruned convs must recover), evaluated on the val set after every epoch; the best
   epoch's (EMA) weights are kept;
5. those weights go into a fresh detector with the pruned shapes, its RepVgg blocks are fused once and it is
   exported like ``defectkit export`` does (paddle with/without NMS, ONNX; deploy.json) through
   :func:`detect.export.export_model`.

GFLOPs and parameters are counted on the deploy form (RepVgg fused), i.e. the graph that ships; the FP32 parent's
figures come from :func:`measure_cost`, the same count.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from compress.prune_filters import (CRITERIA, MAX_RATIO, apply_ratio, build_detector, build_parts, drop_backups,
                                 eval_mode, gflops_of, params_m_of, pruned_layers, search_ratio, to_deploy)
from compress.finetune import train_without_checkpoints
from compress.variants import PARENT, Variant, settings_record
from detect.linespec import LineSpec
from detect.ppyoloe import RunPaths
from detect.settings import Settings
from edge_runtime.errors import ModelError, UserInputError

log = logging.getLogger("defectkit.prune")

TRAIN_DIR = "prune_train"  # the fine-tune session's run folder inside the variant directory
# The pruning fine-tune's recipe: the fixed train values that make it a recovery fine-tune of pruned weights. They
# are the method, not defaults a line tunes (the tunable ones are compress.prune_epochs and
# compress.prune_warmup_steps in detect/defaults.yaml); applied over the run's train section.
PRUNE_FINETUNE_RECIPE: dict[str, Any] = {
    "freeze": "none",  # the pruned backbone must recover: nothing frozen
    "unfreeze_at_epoch": 0,
    "eval_interval": 1,  # val mAP after every epoch (the recipe keeps them)
    "patience": 0,
    "time_budget_min": 0.0,
    "mosaic": 0.0,  # a short fine-tune on the evaluation distribution (close-mosaic); no Mosaic, no MixUp
    "mixup": 0.0,
}


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_args(spec: LineSpec, weights: Path, ratio: Any, flops_target: Any, criterion: Any,
               finetune_epochs: Any) -> None:
    """Refuse bad pruning arguments before anything is built, naming the setting and the fix."""
    where = spec.source or f"line '{spec.line}'"
    if (ratio is None) == (flops_target is None):
        raise UserInputError("prune: give exactly one of ratio (uniform share of filters to remove, e.g. 0.3) or "
                             f"flops_target (share of FLOPs to remove, e.g. 0.3); got ratio={ratio!r}, "
                             f"flops_target={flops_target!r}.")
    if ratio is not None and not (_number(ratio) and 0.0 < ratio <= MAX_RATIO):
        raise UserInputError(f"prune: ratio is the share of filters removed from each prunable conv, a number in "
                             f"(0, {MAX_RATIO}]; got {ratio!r}.")
    if flops_target is not None and not (_number(flops_target) and 0.0 < flops_target < 1.0):
        raise UserInputError(f"prune: flops_target is the share of FLOPs to remove, a number in (0, 1) such as 0.3 "
                             f"for -30 %; got {flops_target!r} (compress.prune_flops in {where}).")
    if criterion not in CRITERIA:
        raise UserInputError(f"prune: unknown criterion {criterion!r}; choose {' or '.join(CRITERIA)} "
                             f"(compress.prune_criterion in {where}).")
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise UserInputError(f"prune: finetune_epochs must be a whole number >= 0, got {finetune_epochs!r} "
                             f"(compress.prune_epochs in {where}).")
    weights = Path(weights)
    if not weights.is_file() or weights.suffix != ".pdparams":
        raise UserInputError(f"prune starts from fine-tuned weights: '{weights}' is not a .pdparams file. Train "
                             "first (`defectkit train LINE.yaml`) and pass runs/<line>/<run>/weights/best.pdparams.")


def prune_settings(spec: LineSpec, weights: Path, epochs: int, overrides: dict | None) -> Settings:
    """Settings of the fine-tune: the run's < :data:`PRUNE_FINETUNE_RECIPE` and the compress section's epochs and
    warmup < ``overrides`` (train keys, type-checked)."""
    settings = spec.settings.with_values("train", **PRUNE_FINETUNE_RECIPE, epochs=max(1, epochs),
                                         warmup_steps=spec.settings.compress.prune_warmup_steps,
                                         pretrained=str(weights))
    return settings.with_values("train", **overrides) if overrides else settings


def measure_cost(spec: LineSpec, weights: Path) -> tuple[float, float]:
    """(GFLOPs at the line's input size, parameters in millions) of ``weights`` (pruned or not), deploy form."""
    model = build_detector(spec, weights)
    to_deploy(model)
    return round(gflops_of(model, spec.image_size), 4), round(params_m_of(model), 4)


def variant_name(ratio: float | None, flops_target: float | None) -> str:
    """``prune-30`` for a 30 % FLOPs target (or a 30 % filter ratio)."""
    return f"prune-{round(100 * (flops_target if flops_target is not None else ratio))}"


# ------------------------------------------------------------------------------------------------ pruning


def prune_in_place(model, size: int, ratio: float | None, flops_target: float | None, criterion: str,
                   progress: bool = False) -> dict[str, Any]:
    """Prune ``model`` (backbone + neck) in place by ``ratio`` or to ``flops_target``; what was done, measured."""
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    with eval_mode(model):
        before = gflops_of(model, size)
        params_before = params_m_of(model)
        parts = build_parts(model, size, criterion)
        reached = None
        if ratio is None:
            ratio, reached = search_ratio(model, parts, size, float(flops_target), before, progress)
        apply_ratio(parts, float(ratio))
        drop_backups(model)
        after = gflops_of(model, size)
    layers = pruned_layers(model, shapes)
    if not layers:
        raise ModelError(f"pruning by {ratio} removed no filter (every prunable conv is too small); "
                         "raise the ratio or the FLOPs target.")
    return {"ratio": float(ratio), "train_form_gflops": [round(before, 4), round(after, 4)],
            "train_form_params_m": [round(params_before, 4), round(params_m_of(model), 4)],
            "flops_reduction_searched": None if reached is None else round(reached, 4),
            "pruned_layers": len(layers), "pruned_layer_names": layers,
            "collections": {p.name: len(p.masters) for p in parts},
            "collections_kept_whole": {p.name: len(p.excluded) for p in parts}}


def rebuild_after_pruning(trainer) -> None:
    """The EMA and the optimizer hold tensors of the unpruned shapes: build them again on the pruned model."""
    from ppdet.core.workspace import create
    from ppdet.optimizer import ModelEMA

    if getattr(trainer, "use_ema", False):
        old = trainer.ema
        trainer.ema = ModelEMA(trainer.model, decay=old.decay, ema_decay_type=old.ema_decay_type,
                               cycle_epoch=old.cycle_epoch, ema_black_list=trainer.cfg.get("ema_black_list"))
    trainer.optimizer = create("OptimizerBuilder")(trainer.lr, trainer.model)


def _finetune(spec: LineSpec, run: RunPaths, ratio: float | None, flops_target: float | None, criterion: str,
              epochs: int, progress: bool) -> tuple[dict, list[dict]]:
    """Session with the weights loaded, pruned in place, EMA/optimizer rebuilt, trained; (pruning record, history).

    ``spec`` carries the fine-tune's settings (:func:`prune_settings`)."""
    from detect.plots import read_history
    from detect.preflight import check_data, check_settings
    from detect.session import build_session

    check_settings(spec)
    check_data(spec)
    run.root.mkdir(parents=True, exist_ok=True)
    if run.history.exists():
        run.history.unlink()
    session = build_session(spec, run)
    trainer = session.trainer
    record = prune_in_place(trainer.model, spec.image_size, ratio, flops_target, criterion, progress)
    rebuild_after_pruning(trainer)
    if epochs == 0:  # pruning only: the pruned weights as they are
        from detect.callbacks import save_state_atomic

        run.best_weights.parent.mkdir(parents=True, exist_ok=True)
        save_state_atomic(trainer.model.state_dict(), run.best_weights)
        return record, []
    # the fine-tune is short and not resumable (a checkpoint of pruned shapes cannot be resumed by detect.resume)
    train_without_checkpoints(trainer, session, progress, "prune fine-tune")
    return record, read_history(run.history)


# ------------------------------------------------------------------------------------------------ public API


def prune(spec: LineSpec, weights: Path, out_dir: Path, *, ratio: float | None = None,
          flops_target: float | None = None, criterion: str = "fpgm", finetune_epochs: int = 3,
          overrides: dict | None = None, progress: bool = True, run_root: Path | None = None) -> Variant:
    """Prune ``weights`` (exactly one of ``ratio`` / ``flops_target``), fine-tune, export into ``out_dir``.

    ``spec`` is the run's (``load_run_spec``): the fine-tune trains with its train section under
    :data:`PRUNE_FINETUNE_RECIPE`. ``flops_target=0.3`` removes 30 % of the FLOPs; ``ratio=0.3`` removes 30 % of
    the filters of every prunable conv. ``finetune_epochs=0`` exports the pruned weights untrained. ``overrides``
    are train settings (``detect/defaults.yaml`` train section) applied last. ``run_root``: the run the weights
    come from (its settings.yaml is named in the variant's settings record). The session lives in
    ``out_dir/prune_train``.
    """
    from detect.export import export_model
    from detect.heavy import paddle_stack

    weights, out_dir = Path(weights), Path(out_dir)
    check_args(spec, weights, ratio, flops_target, criterion, finetune_epochs)
    ft_spec = spec.with_settings(prune_settings(spec, weights, finetune_epochs, overrides))
    train = ft_spec.settings.train
    paddle_stack()
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("model*.pd*"), *out_dir.glob("model*.onnx"), out_dir / "deploy.json"]:
        old.unlink(missing_ok=True)  # a previous attempt's files must not be mistaken for this one's
    gflops_before, params_before = measure_cost(spec, weights)
    run = RunPaths(out_dir / TRAIN_DIR)
    start = time.time()
    record, history = _finetune(ft_spec, run, ratio, flops_target, criterion, finetune_epochs, progress)
    seconds = time.time() - start
    evaluated = [h for h in history if "map50_95" in h]
    if finetune_epochs and (not evaluated or not run.best_weights.is_file()):
        raise ModelError(f"the pruned model's fine-tune in {run.root} evaluated no epoch (see {run.log}); "
                         "nothing to export.")
    model = build_detector(spec, run.best_weights)
    to_deploy(model)
    gflops_after, params_after = round(gflops_of(model, spec.image_size), 4), round(params_m_of(model), 4)
    name = variant_name(ratio, flops_target)
    export_model(spec, model, out_dir, meta={"source_weights": str(weights), "method": "prune",
                                             "pruned_weights": str(run.best_weights)})
    if run.checkpoints.is_dir():
        shutil.rmtree(run.checkpoints, ignore_errors=True)
    best = max(evaluated, key=lambda h: h["map50_95"]) if evaluated else None
    recipe = {
        "tool": "paddleslim.dygraph." + ("FPGMFilterPruner" if criterion == "fpgm" else "L1NormFilterPruner"),
        "criterion": criterion, "ratio": record["ratio"], "flops_target": flops_target,
        "scope": "backbone + neck convs (collections whose pruning changes a part's outputs kept whole)",
        "gflops_before": gflops_before, "gflops_after": gflops_after,
        "flops_reduction": round(1.0 - gflops_after / gflops_before, 4),
        "params_m_before": params_before, "params_m_after": params_after,
        "pruned_layers": record["pruned_layers"], "collections": record["collections"],
        "collections_kept_whole": record["collections_kept_whole"],
        "train_form_gflops": record["train_form_gflops"], "train_form_params_m": record["train_form_params_m"],
        "finetune_epochs": finetune_epochs, "lr": train.lr, "batch_size": train.batch_size,
        "ema": train.ema, "from_weights": str(weights),
        "finetune_val": [{"epoch": h["epoch"], "map50_95": round(h["map50_95"], 4), "map50": round(h["map50"], 4)}
                         for h in evaluated],
        "best_epoch": None if best is None else best["epoch"],
        "seconds_per_epoch": [h["train_seconds"] for h in history if "train_seconds" in h],
        "total_seconds": round(seconds, 1),
    }
    return Variant(name=name, method="prune", parent=PARENT, export_dir=out_dir.resolve(), recipe=recipe,
                   gflops=gflops_after, params_m=params_after,
                   settings=settings_record(run_root, spec, ft_spec.settings.to_dict()["train"]))


__all__ = ["prune", "measure_cost", "prune_in_place", "rebuild_after_pruning", "check_args", "prune_settings",
           "variant_name", "PRUNE_FINETUNE_RECIPE", "TRAIN_DIR"]
