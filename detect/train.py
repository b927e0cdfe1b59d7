"""Fine-tune PP-YOLOE+ on a line with ppdet's own ``Trainer``; write ``runs/<line>/<run>/``.

The run directory holds the resolved config and a copy of the line spec, ``history.jsonl`` (one line per
epoch), best and last weights, resumable ``checkpoints/`` (see :mod:`detect.checkpoints`),
``metrics.json`` (best epoch, per-class AP, stop reason) and ``training_curves.png``.
A training session is ppdet's ``Trainer`` plus the kit's pieces: frozen layers (:mod:`detect.freeze`),
a data loader whose order and augmentations are pure functions of (seed, epoch) (:mod:`detect.seeded_loader`),
and callbacks for progress, history, early stopping, time budget, best weights and checkpoints.
"""
from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from detect.linespec import LineSpec, resolve_settings
from detect.ppyoloe import RunPaths, activate, build_config
from edge_runtime.errors import ConfigError, DataError
from edge_runtime.fileio import atomic_write_json, atomic_write_text


@dataclass
class TrainResult:
    run: RunPaths
    metrics: dict[str, Any]

    @property
    def best_weights(self) -> Path:
        return self.run.best_weights


def default_run_dir(spec: LineSpec, runs_root: Path | str = "runs", name: str | None = None) -> Path:
    name = name or datetime.now().strftime("train-%Y%m%d-%H%M%S")
    return Path(runs_root) / spec.line / name


def check_class_contract(spec: LineSpec, ann_file: Path) -> int:
    """The data set's category names, in id order, must be the line's classes; returns the image count.

    ppdet maps sorted category ids to class indices 0..K-1, so the id order *is* the class order.
    """
    if not ann_file.is_file():
        raise DataError(f"annotation file '{ann_file}' does not exist (line '{spec.line}'). "
                        f"Check paths in {spec.source or 'the line spec'} or run `defectkit data split`.")
    try:
        coco = json.loads(ann_file.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"'{ann_file}' is not valid JSON: {exc}") from exc
    cats = sorted(coco.get("categories", []), key=lambda c: c["id"])
    names = [c["name"] for c in cats]
    if names != spec.classes:
        raise DataError(
            f"'{ann_file}': categories in id order are {names}, but line '{spec.line}' has classes "
            f"{spec.classes} (the order is the contract). Fix: `defectkit data import --format coco` "
            f"renumbers categories in the line's order."
        )
    images = coco.get("images", [])
    if not images:
        raise DataError(f"'{ann_file}' lists no images: nothing to train or evaluate on.")
    return len(images)


def refuse_faulty_data(spec: LineSpec) -> None:
    """Run `defectkit data check` on the train and val splits; any fault stops training before it starts."""
    from detect.data.check import check_dataset

    for ann in (spec.paths.train, spec.paths.val):
        check_dataset(ann, spec.paths.images, spec.classes).raise_if_faulty()


def seed_everything(seed: int) -> None:
    from detect.heavy import paddle_stack

    random.seed(seed)
    np.random.seed(seed)
    paddle_stack().paddle.seed(seed)


def process_rank() -> tuple[int, int]:
    """(rank, number of processes) under ``paddle.distributed.launch``; (0, 1) otherwise."""
    import os

    return int(os.environ.get("PADDLE_TRAINER_ID", "0")), int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))


def set_device(device: str) -> str:
    paddle = __import__("detect.heavy", fromlist=["paddle_stack"]).paddle_stack().paddle
    if device == "auto":
        device = "gpu" if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() else "cpu"
    if device == "gpu" and not paddle.device.is_compiled_with_cuda():
        raise ConfigError("train.device is 'gpu' but this paddle build has no CUDA. Use device: cpu or "
                          "the GPU container (scripts/train_line.sh).")
    paddle.set_device(device)
    if process_rank()[1] > 1 and not paddle.distributed.is_initialized():
        paddle.distributed.init_parallel_env()  # NCCL on GPUs, gloo on CPU
    return device


def route_ppdet_logs(log_file: Path) -> None:
    """ppdet logs every step at INFO to stdout; send that to the run's log file, keep warnings visible."""
    import logging

    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s"))
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not name.startswith("ppdet") or not isinstance(logger, logging.Logger):
            continue
        for h in list(logger.handlers):
            if isinstance(h, logging.FileHandler):
                logger.removeHandler(h)
            elif isinstance(h, logging.StreamHandler):
                h.setLevel(logging.WARNING)
        logger.addHandler(handler)


def load_pretrained(model, path_or_url: str) -> list[str]:
    """Load weights, skipping tensors whose shape differs (e.g. a head for another class count).

    Returns the names of the skipped tensors; ppdet's ``load_pretrain_weight`` does the loading.
    """
    from detect.heavy import paddle_stack

    paddle = paddle_stack().paddle
    from ppdet.utils.checkpoint import load_pretrain_weight
    from ppdet.utils.download import get_weights_path

    path = path_or_url
    if path_or_url.startswith(("http://", "https://")):
        path = get_weights_path(path_or_url)  # downloads into ~/.cache/paddle/weights
    file = Path(path if str(path).endswith(".pdparams") else f"{path}.pdparams")
    if Path(path).is_dir():  # a checkpoint directory: its evaluated (EMA) weights, else the raw ones
        file = Path(path) / "ema.pdparams"
        file = file if file.is_file() else Path(path) / "model.pdparams"
    if not file.is_file():
        raise ConfigError(f"pretrained weights '{file}' do not exist. Give a .pdparams path, a checkpoint "
                          f"directory or a URL.")
    stored = paddle.load(str(file))
    own = model.state_dict()
    skipped = [k for k, v in own.items() if k in stored and list(stored[k].shape) != list(v.shape)]
    missing = [k for k in own if k not in stored]
    if len(missing) == len(own):
        raise ConfigError(f"pretrained weights '{file}' share no tensor with this model: not a PP-YOLOE+ file?")
    load_pretrain_weight(model, str(file)[: -len(".pdparams")])
    return skipped + missing


def preflight_reader(loader) -> None:
    """Run the first batch of epoch 0 through the sample and batch transforms in this process.

    A transform that raises inside paddle's DataLoader with ``worker_num: 0`` hangs forever with no
    traceback (STACK.md); called directly, the same error surfaces with its cause.
    """
    from detect.seeded_loader import SeededCollate

    samples = loader.samples()
    keys = loader.batches(0)[0] if len(loader) else []
    batch = []
    for key in keys:
        try:
            batch.append(samples[key])
        except Exception as exc:  # any transform failure: report it instead of hanging later
            raise DataError(f"training sample {key[2]} ({loader.dataset.roidbs[key[2]].get('im_file')}) fails "
                            f"the augmentation pipeline: {type(exc).__name__}: {exc}") from exc
    try:
        SeededCollate(loader.batch_transforms, loader.seed)(batch)
    except Exception as exc:
        raise DataError(f"the first training batch fails the batch transforms (multi-scale resize, padding): "
                        f"{type(exc).__name__}: {exc}") from exc


def check_settings(spec: LineSpec, settings: dict[str, Any]) -> None:
    """Training-policy values that are wrong together, refused before anything is built."""
    from detect.checkpoints import Retention
    from detect.freeze import check_unfreeze, parse_freeze

    where = spec.source or f"line '{spec.line}'"
    parse_freeze(settings["freeze"], f"{where}: train.freeze")
    check_unfreeze(settings)
    Retention.from_settings(settings)
    for key in ("epochs", "batch_size", "eval_interval"):
        if int(settings[key]) < 1:
            raise ConfigError(f"{where}: train.{key} must be at least 1, got {settings[key]}.")
    for key in ("flip", "mosaic", "mixup"):
        if not 0.0 <= float(settings[key]) <= 1.0:
            raise ConfigError(f"{where}: train.{key} is a probability in [0, 1], got {settings[key]}.")
    if float(settings["mixup"]) > 0 and float(settings["mosaic"]) == 0:
        raise ConfigError(f"{where}: train.mixup needs train.mosaic > 0 (PP-YOLOE mixes inside Mosaic samples).")
    if float(settings["mosaic"]) > 0 and int(settings["close_mosaic"]) >= int(settings["epochs"]):
        raise ConfigError(f"{where}: train.close_mosaic ({settings['close_mosaic']}) leaves no epoch of "
                          f"{settings['epochs']} with Mosaic; lower it or set mosaic: 0.")
    hsv = settings["hsv"]
    if len(hsv) != 3 or any(float(g) < 0 for g in hsv):
        raise ConfigError(f"{where}: train.hsv must be three non-negative gains [hue, saturation, value], got {hsv}.")


def check_data(spec: LineSpec, settings: dict[str, Any]) -> int:
    """Data check, class contract and image count; returns the number of training images."""
    refuse_faulty_data(spec)
    n_train = check_class_contract(spec, spec.paths.train)
    check_class_contract(spec, spec.paths.val)
    if n_train < settings["batch_size"]:
        raise DataError(f"{n_train} training images but batch_size {settings['batch_size']}: lower "
                        f"train.batch_size in {spec.source or 'the line spec'} or add images.")
    return n_train


def write_run_files(spec: LineSpec, run: RunPaths, settings: dict[str, Any], device: str, cfg: dict) -> None:
    atomic_write_text(run.config, yaml.safe_dump({"line": spec.line, "classes": spec.classes,
                                                  "image_size": spec.image_size, "model_size": spec.model_size,
                                                  "device": device, "train": settings, "ppdet": cfg},
                                                 sort_keys=False))
    atomic_write_text(run.line_spec, yaml.safe_dump(spec.to_dict(run.root.resolve()), sort_keys=False))


def min_box_side(settings: dict[str, Any]) -> float:
    """Boxes thinner than this (px) are dropped after augmentation: Mosaic leaves slivers at the border."""
    return 2.0 if float(settings["mosaic"]) > 0 else 0.0


@dataclass
class Session:
    """One ppdet Trainer with the kit's loader, frozen layers and callbacks, ready to train."""

    spec: LineSpec
    run: RunPaths
    settings: dict[str, Any]
    trainer: Any
    loader: Any
    freeze: Any
    cb: Any  # SimpleNamespace of the kit's callbacks
    skipped: list[str]
    log_file: Path
    start: float = 0.0  # training seconds of earlier sessions of this run (resume)
    began: float = 0.0  # wall clock when this session's loop started


def build_session(spec: LineSpec, run: RunPaths, settings: dict[str, Any], fresh: bool = True,
                  static_assigner_epoch: int | None = None) -> Session:
    """Build the trainer for ``settings``; ``fresh`` runs load ``train.pretrained`` (a resume restores instead)."""
    import types
    import warnings

    from detect.freeze import apply_freeze, parse_freeze
    from detect.resume import checkpoint_writer
    from detect.seeded_loader import install_seeded_loader

    seed = int(settings["seed"])
    seed_everything(seed)
    device = set_device(settings["device"])
    cfg = build_config(spec, settings, resolve_settings(spec, "export"), run,
                       static_assigner_epoch=static_assigner_epoch)
    if process_rank()[0] == 0:
        write_run_files(spec, run, settings, device, cfg)
    live = activate(cfg)
    from ppdet.engine import Trainer
    from ppdet.engine.callbacks import Checkpointer, VisualDLWriter

    from detect import callbacks as cb

    log_file = run.log if process_rank()[0] == 0 else run.root / f"train.rank{process_rank()[0]}.log"
    route_ppdet_logs(log_file)
    warnings.filterwarnings("ignore", message="When training, we now always track global mean")
    with open(log_file, "a") as log, contextlib.redirect_stdout(log):
        trainer = Trainer(live, mode="train")
    loader = install_seeded_loader(trainer, seed, int(settings["workers"]), min_box_side(settings))
    preflight_reader(loader)
    skipped = load_pretrained(trainer.model, settings["pretrained"]) if fresh and settings["pretrained"] else []
    freeze = apply_freeze(trainer.model, parse_freeze(settings["freeze"]))
    ns = types.SimpleNamespace(
        progress=cb.ProgressBar(trainer, int(settings["epochs"])),
        seeder=cb.EpochSeeder(trainer, seed),
        unfreezer=cb.Unfreezer(trainer, freeze, int(settings["unfreeze_at_epoch"]),
                               float(settings["unfreeze_lr_factor"])),
        history=cb.HistoryLogger(trainer, run.history),
        early=cb.EarlyStopping(trainer, int(settings["patience"]), float(settings["min_delta"])),
        budget=cb.TimeBudget(trainer, float(settings["time_budget_min"]) or 1e12),
        saver=cb.WeightsSaver(trainer, run.best_weights, run.last_weights),
        vdl=next((c for c in trainer._callbacks if isinstance(c, VisualDLWriter)), None),
    )
    session = Session(spec, run, settings, trainer, loader, freeze, ns, skipped, log_file)
    ns.checkpointing = cb.Checkpointing(trainer, checkpoint_writer(session), [ns.early, ns.budget])
    trainer._callbacks = [c for c in trainer._callbacks if not isinstance(c, Checkpointer)]
    trainer.register_callbacks([cb.ScalarLossStats(trainer), ns.seeder, ns.unfreezer, ns.progress, ns.history,
                                ns.early, ns.budget, ns.saver, ns.checkpointing])  # Checkpointing last
    return session


def run_session(session: Session, quiet: bool = False) -> TrainResult:
    """ppdet's loop until the last epoch or a stop; then evaluate the best weights and write metrics."""
    from detect import callbacks as cb

    stop_reason = "completed all epochs"
    session.began = time.time()
    with open(session.log_file, "a") as log, contextlib.redirect_stdout(log):
        try:
            session.trainer.train(validate=True)
        except cb.StopTraining as stop:
            stop_reason = stop.reason
        finally:
            session.cb.progress.close()
    seconds = time.time() - session.began + session.start
    rank, nranks = process_rank()
    if rank != 0:  # rank 0 evaluates and writes metrics.json; the others only trained
        nan = float("nan")
        return TrainResult(session.run, {"rank": rank, "processes": nranks, "stop_reason": stop_reason,
                                         "val": {"map50_95": nan, "map50": nan}, "best_epoch": None})
    metrics = finish_run(session.spec, session.run, session.settings, stop_reason, seconds, session.skipped, quiet)
    return TrainResult(session.run, metrics)


def train(spec: LineSpec, run_dir: Path | None = None, overrides: dict[str, Any] | None = None,
          quiet: bool = False) -> TrainResult:
    """Train on ``spec``'s train split, validating on its val split; returns the run and its metrics."""
    from detect.checkpoints import list_checkpoints

    settings = resolve_settings(spec, "train", overrides)
    check_settings(spec, settings)
    check_data(spec, settings)
    run = RunPaths(Path(run_dir) if run_dir else default_run_dir(spec))
    if run.metrics.exists():
        raise ConfigError(f"run '{run.root}' already finished (metrics.json exists). Choose another --name.")
    if list_checkpoints(run.checkpoints):
        raise ConfigError(f"run '{run.root}' already has checkpoints: continue it with "
                          f"`defectkit train {spec.source or 'LINE.yaml'} --resume {run.root}` or choose another --name.")
    run.root.mkdir(parents=True, exist_ok=True)
    if run.history.exists() and process_rank()[0] == 0:  # a run that died before its first checkpoint
        run.history.unlink()
    return run_session(build_session(spec, run, settings), quiet)


def resume(run_dir: Path | str, overrides: dict[str, Any] | None = None, spec: LineSpec | None = None,
           quiet: bool = False) -> TrainResult:
    """Continue an interrupted run exactly from its newest sound checkpoint (see :mod:`detect.resume`)."""
    from detect.resume import resume_run

    return resume_run(Path(run_dir), overrides, spec, quiet)


@contextlib.contextmanager
def _alone():
    """Rank 0 evaluates the best weights on its own after a multi-process run: ppdet's eval Trainer would
    otherwise wrap the model in DataParallel (it reads ``paddle.distributed.get_world_size()``) and wait
    forever for ranks that already finished."""
    if process_rank()[1] < 2:
        yield
        return
    from unittest import mock

    from detect.heavy import paddle_stack

    with mock.patch.object(paddle_stack().paddle.distributed, "get_world_size", lambda *a, **k: 1):
        yield


def finish_run(spec: LineSpec, run: RunPaths, settings: dict[str, Any], stop_reason: str,
               seconds: float, skipped: list[str], quiet: bool) -> dict[str, Any]:
    """Evaluate the best weights per class, write metrics.json and the curve plot."""
    from detect.evaluate import format_table
    from detect.infer import evaluate_weights
    from detect.plots import plot_training_curves, read_history

    history = read_history(run.history)
    evaluated = [h for h in history if "map50_95" in h]
    best = max(evaluated, key=lambda h: h["map50_95"]) if evaluated else {}
    with _alone():
        result = evaluate_weights(spec, run.best_weights, spec.paths.val, run.eval_dir / "best")
    if not quiet:
        print(format_table(result))
    plot_training_curves(history, run.curves_png, title=f"{spec.line} — {run.root.name}")
    metrics = {
        "line": spec.line,
        "run": run.root.name,
        "model_size": spec.model_size,
        "image_size": spec.image_size,
        "classes": spec.classes,
        "epochs_run": history[-1]["epoch"] if history else 0,
        "epochs": int(settings["epochs"]),
        "best_epoch": best.get("epoch"),
        "stop_reason": stop_reason,
        "freeze": settings["freeze"],
        "processes": process_rank()[1],
        "train_minutes": round(seconds / 60.0, 2),
        "val": result.to_dict(),
        "skipped_pretrained_tensors": skipped,
        "resumes": read_history(run.root / "resumes.jsonl"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "weights": {"best": str(run.best_weights), "last": str(run.last_weights)},
    }
    atomic_write_json(run.metrics, metrics)
    return metrics
