"""A training session: ppdet's ``Trainer`` plus the kit's pieces, built from a line spec, run, finished.

A session is built from a :class:`~detect.linespec.LineSpec` whose ``settings`` are final (defaults < spec <
command line, resolved once by the command): frozen layers (:mod:`detect.freeze`), a data loader whose order
and augmentations are pure functions of (seed, epoch) (:mod:`detect.seeded_loader`), and callbacks for
progress, history, early stopping, time budget, best weights and checkpoints (:mod:`detect.session_state`
writes them). Building it records the run's one ``settings.yaml`` (:mod:`detect.run_settings`).

Training (:mod:`detect.train`), resume (:mod:`detect.resume`), pruning and QAT build sessions here; this
module imports none of them, and evaluation (:mod:`detect.infer`) does not import it.
"""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from detect.infer import evaluate_weights
from detect.mkl import prefer_mkl_avx2
from detect.linespec import LineSpec
from detect.ppyoloe import RunPaths, activate, build_config
from detect.run_settings import write_run_settings
from detect.settings import TrainSettings
from edge_runtime.errors import ConfigError, DataError
from edge_runtime.fileio import atomic_write_json


@dataclass
class TrainResult:
    run: RunPaths
    metrics: dict[str, Any]

    @property
    def best_weights(self) -> Path:
        return self.run.best_weights


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


def load_pretrained(model, path_or_url: str, spec: LineSpec | None = None) -> list[str]:
    """Load weights, skipping the class head's tensors when their shape differs (another class count).

    Returns the names of the skipped tensors; ppdet's ``load_pretrain_weight`` does the loading. Weights of
    which more than the class head would be skipped (another model size) are refused before anything is
    loaded: ppdet would skip them silently and the run would train from random initialisation.
    """
    from detect.heavy import paddle_stack

    paddle = paddle_stack().paddle
    from ppdet.utils.checkpoint import load_pretrain_weight
    from ppdet.utils.download import get_weights_path

    from detect.preflight import CLASS_HEAD, pretrained_mismatch, weights_file

    path = path_or_url
    if path_or_url.startswith(("http://", "https://")):
        path = get_weights_path(path_or_url)  # downloads into ~/.cache/paddle/weights
    file = weights_file(str(path))
    if not file.is_file():
        raise ConfigError(f"pretrained weights '{file}' do not exist. Give a .pdparams path, a checkpoint "
                          f"directory or a URL.")
    stored = paddle.load(str(file))
    own = model.state_dict()
    skipped = [k for k, v in own.items() if k in stored and list(stored[k].shape) != list(v.shape)]
    missing = [k for k in own if k not in stored]
    if len(missing) == len(own):
        raise ConfigError(f"pretrained weights '{file}' share no tensor with this model: not a PP-YOLOE+ file?")
    bad = [k for k in skipped + missing if not k.startswith(CLASS_HEAD)]
    if bad:
        if spec is not None:
            raise ConfigError(pretrained_mismatch(spec, file, stored, bad, len(own)))
        raise ConfigError(f"pretrained weights '{file}' do not fit this model beyond the class head: {len(bad)} of "
                          f"{len(own)} tensors would be skipped (e.g. {', '.join(bad[:3])}): another model size?")
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


def min_box_side(train: TrainSettings) -> float:
    """Boxes thinner than this (px) are dropped after augmentation: Mosaic leaves slivers at the border."""
    return 2.0 if train.mosaic > 0 else 0.0


@dataclass
class Session:
    """One ppdet Trainer with the kit's loader, frozen layers and callbacks, ready to train ``spec``."""

    spec: LineSpec  # settings final: what the run records and every part reads
    run: RunPaths
    trainer: Any
    loader: Any
    freeze: Any
    cb: Any  # SimpleNamespace of the kit's callbacks
    skipped: list[str]
    log_file: Path
    start: float = 0.0  # training seconds of earlier sessions of this run (resume)
    began: float = 0.0  # wall clock when this session's loop started

    @property
    def train(self) -> TrainSettings:
        return self.spec.settings.train


def build_session(spec: LineSpec, run: RunPaths, fresh: bool = True,
                  static_assigner_epoch: int | None = None) -> Session:
    """Build the trainer for ``spec.settings`` and record them as the run's settings.yaml (with the device and
    the ppdet configuration); ``fresh`` runs load ``train.pretrained`` (a resume restores instead)."""
    import types
    import warnings

    from detect.freeze import apply_freeze, parse_freeze
    from detect.seeded_loader import install_seeded_loader
    from detect.session_state import checkpoint_writer

    train = spec.settings.train
    prefer_mkl_avx2(train.mkl_avx2_on_amd)
    seed_everything(train.seed)
    device = set_device(train.device)
    cfg = build_config(spec, run, static_assigner_epoch=static_assigner_epoch)
    if process_rank()[0] == 0:
        write_run_settings(run.root, spec, device=device, ppdet=cfg)
    live = activate(cfg)
    from ppdet.engine import Trainer
    from ppdet.engine.callbacks import Checkpointer, VisualDLWriter

    from detect import callbacks as cb
    from detect.eval_schedule import EvalSchedule

    log_file = run.log if process_rank()[0] == 0 else run.root / f"train.rank{process_rank()[0]}.log"
    route_ppdet_logs(log_file)
    warnings.filterwarnings("ignore", message="When training, we now always track global mean")
    with open(log_file, "a") as log, contextlib.redirect_stdout(log):
        trainer = Trainer(live, mode="train")
    loader = install_seeded_loader(trainer, train.seed, train.workers, min_box_side(train))
    preflight_reader(loader)
    skipped = load_pretrained(trainer.model, train.pretrained, spec) if fresh and train.pretrained else []
    freeze = apply_freeze(trainer.model, parse_freeze(train.freeze))
    ns = types.SimpleNamespace(
        progress=cb.ProgressBar(trainer, train.epochs),
        seeder=cb.EpochSeeder(trainer, train.seed),
        unfreezer=cb.Unfreezer(trainer, freeze, train.unfreeze_at_epoch, train.unfreeze_lr_factor),
        history=cb.HistoryLogger(trainer, run.history),
        early=cb.EarlyStopping(trainer, train.patience, train.min_delta),
        budget=cb.TimeBudget(trainer, train.time_budget_min or 1e12),
        saver=cb.WeightsSaver(trainer, run.best_weights, run.last_weights),
        vdl=next((c for c in trainer._callbacks if isinstance(c, VisualDLWriter)), None),
    )
    session = Session(spec, run, trainer, loader, freeze, ns, skipped, log_file)
    ns.checkpointing = cb.Checkpointing(trainer, checkpoint_writer(session), [ns.early, ns.budget])
    ns.evals = EvalSchedule(trainer, train.eval_interval, train.eval_share, [ns.budget])  # after the budget
    ns.close_mosaic = (cb.CloseMosaic(trainer, train.close_mosaic, train.time_budget_min,
                                      lambda: time.time() - session.began + session.start)
                       if train.mosaic > 0 and train.close_mosaic > 0 and train.time_budget_min > 0 else None)
    trainer._callbacks = [c for c in trainer._callbacks if not isinstance(c, Checkpointer)]
    trainer.register_callbacks([cb.ScalarLossStats(trainer), ns.seeder, ns.unfreezer, ns.progress, ns.history]
                               + ([ns.close_mosaic] if ns.close_mosaic else [])
                               + [ns.early, ns.budget, ns.evals, ns.saver, ns.checkpointing])  # Checkpointing last
    from detect.distill import install_retrain_terms

    install_retrain_terms(session)  # a retrain's run (retrain.json): the parent as teacher, EWC, inside the loss
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
    metrics = finish_run(session.spec, session.run, stop_reason, seconds, session.skipped, quiet)
    return TrainResult(session.run, metrics)


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


def finish_run(spec: LineSpec, run: RunPaths, stop_reason: str, seconds: float, skipped: list[str],
               quiet: bool) -> dict[str, Any]:
    """Evaluate the best weights per class, write metrics.json and the curve plot."""
    from detect.evaluate import format_table
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
        "epochs": spec.settings.train.epochs,
        "best_epoch": best.get("epoch"),
        "stop_reason": stop_reason,
        "freeze": spec.settings.train.freeze,
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
