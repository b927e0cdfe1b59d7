"""Fine-tune PP-YOLOE+ on a line with ppdet's own ``Trainer``; write ``runs/<line>/<run>/``.

The run directory holds the resolved config, ``history.jsonl`` (one line per epoch), best and last
weights, ``metrics.json`` (best epoch, per-class AP, stop reason) and ``training_curves.png``.
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


def set_device(device: str) -> str:
    paddle = __import__("detect.heavy", fromlist=["paddle_stack"]).paddle_stack().paddle
    if device == "auto":
        device = "gpu" if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() else "cpu"
    if device == "gpu" and not paddle.device.is_compiled_with_cuda():
        raise ConfigError("train.device is 'gpu' but this paddle build has no CUDA. Use device: cpu or "
                          "the GPU container (scripts/train_line.sh).")
    paddle.set_device(device)
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
    if not file.is_file():
        raise ConfigError(f"pretrained weights '{file}' do not exist. Give a .pdparams path or URL.")
    stored = paddle.load(str(file))
    own = model.state_dict()
    skipped = [k for k, v in own.items() if k in stored and list(stored[k].shape) != list(v.shape)]
    missing = [k for k in own if k not in stored]
    if len(missing) == len(own):
        raise ConfigError(f"pretrained weights '{file}' share no tensor with this model: not a PP-YOLOE+ file?")
    load_pretrain_weight(model, str(file)[: -len(".pdparams")])
    return skipped + missing


def preflight_reader(trainer, samples: int = 2) -> None:
    """Run a few samples through the training transforms in this process before the loop starts.

    A transform that raises inside ppdet's DataLoader with ``worker_num: 0`` hangs forever with no
    traceback (STACK.md); called directly, the same error surfaces with its cause.
    """
    dataset = trainer.loader.dataset
    for idx in range(min(samples, len(dataset))):
        try:
            dataset[idx]
        except Exception as exc:  # any transform failure: report it instead of hanging later
            raise DataError(f"training sample {idx} ({dataset.roidbs[idx].get('im_file')}) fails the "
                            f"augmentation pipeline: {type(exc).__name__}: {exc}") from exc


def train(spec: LineSpec, run_dir: Path | None = None, overrides: dict[str, Any] | None = None,
          quiet: bool = False) -> TrainResult:
    """Train on ``spec``'s train split, validating on its val split; returns the run and its metrics."""
    settings = resolve_settings(spec, "train", overrides)
    export_cfg = resolve_settings(spec, "export")
    refuse_faulty_data(spec)
    n_train = check_class_contract(spec, spec.paths.train)
    check_class_contract(spec, spec.paths.val)
    if n_train < settings["batch_size"]:
        raise DataError(f"{n_train} training images but batch_size {settings['batch_size']}: lower "
                        f"train.batch_size in {spec.source or 'the line spec'} or add images.")
    run = RunPaths(Path(run_dir) if run_dir else default_run_dir(spec))
    if run.metrics.exists():
        raise ConfigError(f"run '{run.root}' already finished (metrics.json exists). Choose another --name.")
    run.root.mkdir(parents=True, exist_ok=True)
    seed_everything(int(settings["seed"]))
    device = set_device(settings["device"])
    cfg = build_config(spec, settings, export_cfg, run)
    atomic_write_text(run.config, yaml.safe_dump({"line": spec.line, "classes": spec.classes,
                                                  "image_size": spec.image_size, "model_size": spec.model_size,
                                                  "device": device, "train": settings, "ppdet": cfg},
                                                 sort_keys=False))
    live = activate(cfg)
    from ppdet.engine import Trainer
    from ppdet.engine.callbacks import Checkpointer

    from detect import callbacks as cb

    route_ppdet_logs(run.root / "train.log")
    trainer = Trainer(live, mode="train")
    preflight_reader(trainer)
    skipped: list[str] = []
    if settings["pretrained"]:
        skipped = load_pretrained(trainer.model, settings["pretrained"])
    progress = cb.ProgressBar(trainer, int(settings["epochs"]))
    saver = cb.WeightsSaver(trainer, run.best_weights, run.last_weights)
    early = cb.EarlyStopping(trainer, int(settings["patience"]), float(settings["min_delta"]))
    extra = [progress, cb.HistoryLogger(trainer, run.history), saver, early]
    if settings["time_budget_min"] > 0:
        extra.append(cb.TimeBudget(trainer, float(settings["time_budget_min"])))
    trainer._callbacks = [c for c in trainer._callbacks if not isinstance(c, Checkpointer)]
    trainer.register_callbacks(extra)

    stop_reason = "completed all epochs"
    start = time.time()
    with open(run.root / "train.log", "a") as log, contextlib.redirect_stdout(log):
        try:
            trainer.train(validate=True)
        except cb.StopTraining as stop:
            stop_reason = stop.reason
        finally:
            progress.close()
    metrics = finish_run(spec, run, settings, stop_reason, time.time() - start, skipped, quiet)
    return TrainResult(run, metrics)


def finish_run(spec: LineSpec, run: RunPaths, settings: dict[str, Any], stop_reason: str,
               seconds: float, skipped: list[str], quiet: bool) -> dict[str, Any]:
    """Evaluate the best weights per class, write metrics.json and the curve plot."""
    from detect.evaluate import format_table
    from detect.infer import evaluate_weights
    from detect.plots import plot_training_curves, read_history

    history = read_history(run.history)
    evaluated = [h for h in history if "map50_95" in h]
    best = max(evaluated, key=lambda h: h["map50_95"]) if evaluated else {}
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
        "best_epoch": best.get("epoch"),
        "stop_reason": stop_reason,
        "train_minutes": round(seconds / 60.0, 2),
        "val": result.to_dict(),
        "skipped_pretrained_tensors": skipped,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "weights": {"best": str(run.best_weights), "last": str(run.last_weights)},
    }
    atomic_write_json(run.metrics, metrics)
    return metrics
