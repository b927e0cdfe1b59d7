"""Exact resume: what a checkpoint holds of a training session, and how it is put back.

ppdet's own ``resume_weights`` restores weights, optimizer, LR position, epoch and EMA step, but not the
best metric, the early-stopping counters, the RNG states or the data order (STACK.md), and it matches
optimizer moments by Paddle's generated parameter names (``conv2d_57.w_0``), which differ as soon as a
process builds another model first. Here every tensor is keyed by its structured name
(``backbone.stem.conv1.conv.weight``), the data order and augmentations are pure functions of
(seed, epoch) (:mod:`detect.seeded_loader`), and the callbacks' counters travel in ``state.json``.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import yaml

from detect.checkpoints import (Checkpoint, Retention, apply_retention, checkpoint_name, clean_temporary,
                                file_sha256, find_resumable, write_checkpoint, write_pointer)
from detect.linespec import LineSpec
from detect.ppyoloe import RunPaths
from edge_runtime.errors import ConfigError
from edge_runtime.fileio import atomic_write_text

# Settings a resumed run may change: they do not alter what one epoch computes (epochs may only grow).
RESUMABLE_OVERRIDES = ("epochs", "time_budget_min", "device", "workers", "log_interval", "patience", "min_delta")


def optimizer_state(optimizer, model) -> dict[str, Any]:
    """Accumulators keyed ``<kind>@<structured param name>`` plus the LR scheduler position."""
    if optimizer._name is not None:
        raise ConfigError("named optimizers are not supported by the checkpoint format")
    names = {p.name: n for n, p in model.named_parameters()}
    acc = {f"{kind}@{names[pname]}": var for kind, per_param in optimizer._accumulators.items()
           for pname, var in per_param.items()}
    return {"accumulators": acc, "lr_scheduler": optimizer._learning_rate.state_dict()}


def restore_optimizer(optimizer, model, saved: dict[str, Any]) -> None:
    """Create exactly the saved accumulators (frozen parameters have none) and fill them."""
    from detect.heavy import paddle_stack

    paddle = paddle_stack().paddle
    if optimizer.helper is None:  # set by the first step; _add_accumulator needs it earlier
        from paddle.base.layer_helper import LayerHelper

        optimizer.helper = LayerHelper(optimizer.__class__.__name__)
    params = dict(model.named_parameters())
    for key, value in saved["accumulators"].items():
        kind, name = key.split("@", 1)
        if name not in params:
            raise ConfigError(f"the checkpoint's optimizer holds state for '{name}', which this model lacks.")
        value = value if isinstance(value, paddle.Tensor) else paddle.to_tensor(value)
        var = optimizer._add_accumulator(kind, params[name], dtype=value.dtype, shape=list(value.shape))
        var.set_value(value)
    optimizer._learning_rate.set_state_dict(saved["lr_scheduler"])


def checkpoint_writer(session) -> Callable[[dict, dict | None], Checkpoint]:
    """The function :class:`detect.callbacks.Checkpointing` calls at the end of every epoch."""
    from detect.callbacks import coco_results, evaluates
    from detect.seeded_loader import capture_rng

    trainer, run, settings, spec = session.trainer, session.run, session.settings, session.spec
    policy = Retention.from_settings(settings)
    data_sha = file_sha256(spec.paths.train)

    def write(status: dict, stop: dict | None) -> Checkpoint:
        epoch = int(status["epoch_id"]) + 1
        steps = len(trainer.loader)
        # ppdet swaps the EMA weights in to evaluate and keeps the raw ones in status['weight']
        raw = status["weight"] if "weight" in status else trainer.model.state_dict()
        tensors = {"model.pdparams": raw, "optimizer.pdopt": optimizer_state(trainer.optimizer, trainer.model)}
        if trainer.use_ema:
            tensors["ema.pdparams"] = dict(trainer.ema.state_dict)
        state = {
            "line": spec.line, "run": run.root.name, "classes": spec.classes, "model_size": spec.model_size,
            "image_size": spec.image_size, "epoch": epoch, "epochs": int(settings["epochs"]),
            "iteration": epoch * steps, "steps_per_epoch": steps,
            "lr_step": int(trainer.optimizer._learning_rate.last_epoch),
            "ema_step": int(trainer.ema.step) if trainer.use_ema else 0,
            "train_data_sha256": data_sha,
            "data_order": {"seed": session.loader.seed, "rule": "permutation(sha256(seed:order:epoch))",
                           "next_epoch": epoch},
            "rng": capture_rng(),
            "thawed": bool(session.freeze.thawed),
            "best": session.cb.saver.state(),
            "early_stopping": session.cb.early.state(),
            "metrics": coco_results(trainer) if evaluates(trainer, status) else {},
            "stop": stop,
            "train_seconds": round(session.start + time.time() - session.began, 1),
            "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        root = run.checkpoints
        ckpt = write_checkpoint(root, checkpoint_name(spec.line, run.root.name, epoch), tensors, state)
        write_pointer(root, "latest", ckpt)
        if session.cb.saver.improved or not (root / "best.json").exists():
            write_pointer(root, "best", ckpt, map50_95=session.cb.saver.state()["best"])
        apply_retention(root, policy)
        return ckpt

    return write


def check_same_line(spec: LineSpec, stored: dict[str, Any], where: str) -> None:
    """A run resumes only with its own line, classes, image size and model size."""
    own = {"line": spec.line, "classes": spec.classes, "image_size": spec.image_size, "model_size": spec.model_size}
    diff = [f"{k}: {stored.get(k)!r} in the run, {v!r} now" for k, v in own.items() if stored.get(k) != v]
    if diff:
        raise ConfigError(f"{where} was trained for another line or model ({'; '.join(diff)}). Resume it with "
                          f"the line spec it started with ({where}/line.yaml), or start a new run "
                          f"(--pretrained accepts its weights, also with another class count).")


def resume_settings(stored: dict[str, Any], overrides: dict[str, Any] | None, done: int, where: str) -> dict[str, Any]:
    """The run's own settings plus the overrides a resume may change."""
    settings = dict(stored)
    for key, value in (overrides or {}).items():
        if key not in settings:
            raise ConfigError(f"unknown train setting '{key}'.")
        if key not in RESUMABLE_OVERRIDES and value != settings[key]:
            raise ConfigError(f"--resume cannot change train.{key} ({settings[key]!r} -> {value!r}): the run would "
                              f"not continue the same training. Allowed: {', '.join(RESUMABLE_OVERRIDES)}. Start a "
                              f"new run instead (--pretrained {where}/weights/best.pdparams).")
        settings[key] = value
    if int(settings["epochs"]) < int(stored["epochs"]):
        raise ConfigError(f"--epochs {settings['epochs']} is fewer than the run's {stored['epochs']}: a resume can "
                          f"only extend a run.")
    return settings


def truncate_history(run: RunPaths, epoch: int) -> None:
    """Keep history lines up to ``epoch`` (later ones belong to epochs that will run again)."""
    if not run.history.exists():
        return
    keep = []
    for line in run.history.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] <= epoch:
                keep.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut by a kill
            continue
    atomic_write_text(run.history, "".join(f"{line}\n" for line in keep))


def restore_session(session, ckpt: Checkpoint, state: dict[str, Any]) -> None:
    """Put a checkpoint back into a freshly built session, before ``trainer.train``."""
    from detect.seeded_loader import restore_rng

    trainer = session.trainer
    weights = ckpt.tensors("model.pdparams")
    own = trainer.model.state_dict()
    bad = [k for k, v in own.items() if k not in weights or list(weights[k].shape) != list(v.shape)]
    if bad:
        raise ConfigError(f"checkpoint {ckpt.path} does not fit this model ({len(bad)} tensors missing or of "
                          f"another shape, e.g. {bad[0]}): another class count or model size?")
    trainer.model.set_state_dict(weights)
    if state["thawed"]:
        session.freeze.thaw(float(session.settings["unfreeze_lr_factor"]), trainer.ema if trainer.use_ema else None)
    if trainer.use_ema:
        ema = ckpt.tensors("ema.pdparams")
        for key in list(trainer.ema.state_dict):
            if key not in trainer.ema.ema_black_list:  # black-listed entries are the live parameters
                trainer.ema.state_dict[key] = ema[key]
        trainer.ema.step = int(state["ema_step"])
    restore_optimizer(trainer.optimizer, trainer.model, ckpt.tensors("optimizer.pdopt"))
    trainer.start_epoch = int(state["epoch"])
    session.cb.saver.load_state(state["best"])
    session.cb.early.load_state(state["early_stopping"])
    session.start = float(state.get("train_seconds", 0.0))
    if session.cb.vdl is not None:  # continue VisualDL's step axes instead of restarting them at 0
        session.cb.vdl.vdl_loss_step = int(state["iteration"])
        session.cb.vdl.vdl_mAP_step = sum(1 for e in range(state["epoch"])
                                          if (e + 1) % int(session.settings["eval_interval"]) == 0)
    restore_rng(state["rng"])


def resume_run(run_dir: Path, overrides: dict[str, Any] | None = None, spec: LineSpec | None = None,
               quiet: bool = False):
    """Continue ``run_dir`` from its newest checkpoint that verifies; see :func:`detect.train.resume`."""
    from detect.train import build_session, check_data, process_rank, run_session

    run = RunPaths(Path(run_dir))
    where = str(run.root)
    if not run.config.is_file():
        raise ConfigError(f"'{where}' is not a training run (no config.yaml): give the folder runs/<line>/<run>.")
    stored = yaml.safe_load(run.config.read_text())
    if spec is None:
        if not run.line_spec.is_file():
            raise ConfigError(f"'{where}' has no line.yaml: give the run's line spec as well.")
        spec = LineSpec.load(run.line_spec)
    check_same_line(spec, stored, where)
    writer = process_rank()[0] == 0
    if writer:
        clean_temporary(run.checkpoints)
    ckpt = find_resumable(run.checkpoints)
    state = ckpt.state()
    check_same_line(spec, state, f"checkpoint {ckpt.path}")
    stop = state.get("stop") or {}
    if stop.get("kind") == "early_stop":
        raise ConfigError(f"run '{where}' stopped early at epoch {state['epoch']} ({stop['reason']}); resuming would "
                          f"stop again. Its best weights are {run.best_weights}: to train further, start a new run "
                          f"with --pretrained {run.best_weights}.")
    settings = resume_settings(stored["train"], overrides, int(state["epoch"]), where)
    if int(state["epoch"]) >= int(settings["epochs"]):
        if run.metrics.exists():
            raise ConfigError(f"run '{where}' already finished all {state['epoch']} epochs. Pass --epochs N with "
                              f"N > {state['epoch']} to continue it, or start a new run.")
        return _finish_only(spec, run, settings, state, quiet)  # killed after the last epoch
    check_data(spec, settings)
    if file_sha256(spec.paths.train) != state["train_data_sha256"]:
        raise ConfigError(f"the training split {spec.paths.train} changed since run '{where}' started, so it "
                          f"cannot continue exactly. Start a new run (--pretrained {run.best_weights}).")
    if writer:
        truncate_history(run, int(state["epoch"]))
    assigner = stored.get("ppdet", {}).get("PPYOLOEHead", {}).get("static_assigner_epoch")
    session = build_session(spec, run, settings, fresh=False, static_assigner_epoch=assigner)
    if len(session.loader) != int(state["steps_per_epoch"]):
        raise ConfigError(f"steps per epoch changed ({state['steps_per_epoch']} -> {len(session.loader)}): "
                          f"the run cannot continue exactly.")
    restore_session(session, ckpt, state)
    if writer:
        _log_resume(run, ckpt, settings)
    if not quiet and writer:
        print(f"resuming {where} after epoch {state['epoch']} of {settings['epochs']} from {ckpt.path.name}")
    return run_session(session, quiet)


def _log_resume(run: RunPaths, ckpt: Checkpoint, settings: dict[str, Any]) -> None:
    """Append to ``resumes.jsonl`` by an atomic rewrite (a kill never leaves half a line in it)."""
    path = run.root / "resumes.jsonl"
    lines = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            json.loads(line)
            lines.append(line)
        except ValueError:
            continue
    lines.append(json.dumps({"from_checkpoint": ckpt.name, "epoch": ckpt.epoch, "epochs": int(settings["epochs"]),
                             "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
    atomic_write_text(path, "".join(f"{line}\n" for line in lines))


def _finish_only(spec: LineSpec, run: RunPaths, settings: dict[str, Any], state: dict[str, Any], quiet: bool):
    from detect.train import TrainResult, finish_run

    truncate_history(run, int(state["epoch"]))
    reason = (state.get("stop") or {}).get("reason", "completed all epochs")
    metrics = finish_run(spec, run, settings, reason, float(state.get("train_seconds", 0.0)), [], quiet)
    return TrainResult(run, metrics)
