"""Callbacks hooked into ppdet's ``Trainer``: training stays ppdet's one loop, everything else hooks in.

ppdet calls ``on_epoch_end`` twice per evaluated epoch: with ``status['mode'] == 'train'`` (the EMA
weights are already swapped into the model) and then with ``'eval'`` after the validation pass
(``trainer._metrics[0].get_results()`` holds the COCO numbers). A callback that must end the loop early
raises :class:`StopTraining`, which :func:`detect.train.train` catches: ppdet's loop has no other exit.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

from detect.heavy import paddle_stack

paddle_stack()
from ppdet.engine.callbacks import Callback  # noqa: E402  (after the safe import order)


class StopTraining(Exception):
    """Raised by a callback to end training cleanly; ``reason`` goes into metrics.json."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def coco_results(trainer) -> dict[str, float]:
    """mAP50-95 and mAP50 of the last evaluation (ppdet's COCOMetric), or {} if it produced none."""
    for metric in trainer._metrics:
        res = metric.get_results()
        if "bbox" in res:
            stats = res["bbox"]
            return {"map50_95": float(stats[0]), "map50": float(stats[1])}
    return {}


class ProgressBar(Callback):
    """A tqdm bar over all training steps with the running loss and learning rate."""

    def __init__(self, trainer, total_epochs: int):
        super().__init__(trainer)
        self.total_epochs = total_epochs
        self.bar = None

    def on_step_end(self, status):
        if status.get("mode") != "train":
            return
        if self.bar is None:
            from tqdm import tqdm

            steps = status["steps_per_epoch"]
            self.bar = tqdm(total=steps * self.total_epochs, initial=steps * status["epoch_id"],
                            desc="train", unit="step", dynamic_ncols=True)
        stats = status["training_staus"].get()
        self.bar.set_postfix(epoch=status["epoch_id"] + 1, loss=stats.get("loss", "?"),
                             lr=f"{status.get('learning_rate', 0):.2e}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_train_end(self, status):
        self.close()


class HistoryLogger(Callback):
    """Appends one JSON line per epoch (losses, learning rate, time, mAP) to ``history.jsonl``.

    The history is the source of metrics.json and of the training-curve plot, and it survives a crash.
    """

    def __init__(self, trainer, path: Path, clock: Callable[[], float] = time.time):
        super().__init__(trainer)
        self.path = path
        self.clock = clock
        self.pending: dict[str, Any] = {}
        self.epoch_start = clock()

    def on_epoch_begin(self, status):
        if status.get("mode") == "train":
            self.epoch_start = self.clock()

    def on_epoch_end(self, status):
        epoch = int(status["epoch_id"]) + 1
        if status["mode"] == "train":
            losses = {k: float(v) for k, v in status["training_staus"].get().items()}
            self.pending = {"epoch": epoch, "lr": float(status.get("learning_rate", 0.0)),
                            "train_seconds": round(self.clock() - self.epoch_start, 2), **losses}
            if not _evaluates(self.model, status):
                self._write()
        else:
            self.pending.update(coco_results(self.model))
            self._write()

    def _write(self) -> None:
        if not self.pending:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(self.pending) + "\n")
        self.pending = {}


def _evaluates(trainer, status) -> bool:
    epoch = int(status["epoch_id"])
    return (epoch + 1) % trainer.cfg.snapshot_epoch == 0 or epoch == trainer.cfg.epoch - 1


class EarlyStopping(Callback):
    """Ends the run when validation mAP50-95 has not improved by ``min_delta`` for ``patience`` evaluations.

    Runs after the checkpoint callback, so the best weights are already on disk when it stops.
    """

    def __init__(self, trainer, patience: int, min_delta: float = 0.0):
        super().__init__(trainer)
        self.patience = patience
        self.min_delta = min_delta
        self.best = -math.inf
        self.best_epoch = 0
        self.bad_evals = 0

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_evals": self.bad_evals}

    def load_state(self, state: dict[str, Any]) -> None:
        self.best = float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_evals = int(state["bad_evals"])

    def on_epoch_end(self, status):
        if status["mode"] != "eval":
            return
        value = coco_results(self.model).get("map50_95")
        if value is None:
            return
        if value > self.best + self.min_delta:
            self.best, self.best_epoch, self.bad_evals = value, int(status["epoch_id"]) + 1, 0
            return
        self.bad_evals += 1
        if self.patience > 0 and self.bad_evals >= self.patience:
            raise StopTraining(
                f"early stop: mAP50-95 did not improve by more than {self.min_delta} for {self.bad_evals} "
                f"evaluations (best {self.best:.4f} at epoch {self.best_epoch})"
            )


class TimeBudget(Callback):
    """Stops after the last evaluation that ends past the budget (the run stays consistent)."""

    def __init__(self, trainer, minutes: float, clock: Callable[[], float] = time.time):
        super().__init__(trainer)
        self.deadline = clock() + minutes * 60.0
        self.minutes = minutes
        self.clock = clock

    def on_epoch_end(self, status):
        if status["mode"] == "eval" and self.clock() >= self.deadline:
            raise StopTraining(f"time budget of {self.minutes:g} minutes reached after epoch "
                               f"{int(status['epoch_id']) + 1}")


class WeightsSaver(Callback):
    """Writes ``best.pdparams`` and ``last.pdparams`` (the evaluated, EMA-applied weights) atomically.

    It replaces ppdet's ``Checkpointer``, which writes non-atomically, never rotates, and keeps the best
    metric only in memory. Full resumable checkpoints are written by :mod:`detect.checkpoints`.
    """

    def __init__(self, trainer, best_path: Path, last_path: Path):
        super().__init__(trainer)
        self.best_path = best_path
        self.last_path = last_path
        self.best = -math.inf

    def on_epoch_end(self, status):
        if status["mode"] != "eval":
            return
        value = coco_results(self.model).get("map50_95", -1.0)
        state = self.model.model.state_dict()
        save_state_atomic(state, self.last_path)
        if value >= self.best:
            self.best = value
            save_state_atomic(state, self.best_path)


def save_state_atomic(state: dict, path: Path) -> None:
    """``paddle.save`` into a temporary file beside ``path``, fsync, then rename over it."""
    import os

    paddle = paddle_stack().paddle
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    paddle.save(state, str(tmp))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
