"""Callbacks hooked into ppdet's ``Trainer``: training stays ppdet's one loop, everything else hooks in.

ppdet calls ``on_epoch_end`` twice per evaluated epoch: with ``status['mode'] == 'train'`` (the EMA
weights are already swapped into the model, the raw ones are in ``status['weight']``) and then with
``'eval'`` after the validation pass (``trainer._metrics[0].get_results()`` holds the COCO numbers); it
also calls ``on_epoch_begin`` a second time, still in 'train' mode, before evaluating. A run ends early
only by an exception: stoppers (:class:`EarlyStopping`, :class:`TimeBudget`) record a reason, and
:class:`Checkpointing`, registered last, writes the epoch's checkpoint and then raises
:class:`StopTraining`, which :func:`detect.session.run_session` catches. So the reason is in the checkpoint and a
stopped run is never mistaken for an interrupted one.
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

    def __init__(self, reason: str, kind: str = "stopped"):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


def coco_results(trainer) -> dict[str, float]:
    """mAP50-95 and mAP50 of the last evaluation (ppdet's COCOMetric), or {} if there was none.

    A model that detects nothing scores 0 (ppdet then reports no 'bbox' result at all, which would
    otherwise hide a plateau at zero from early stopping).
    """
    from ppdet.metrics import COCOMetric

    for metric in trainer._metrics:
        res = metric.get_results()
        if "bbox" in res:
            stats = res["bbox"]
            return {"map50_95": float(stats[0]), "map50": float(stats[1])}
        if isinstance(metric, COCOMetric):
            return {"map50_95": 0.0, "map50": 0.0}
    return {}


def is_writer(trainer) -> bool:
    """Only the first of several training processes (multi-GPU) evaluates and writes files."""
    return trainer._nranks < 2 or trainer._local_rank == 0


def evaluates(trainer, status) -> bool:
    """Whether ppdet evaluates after this epoch (then the epoch's last callback call is in 'eval' mode)."""
    epoch = int(status["epoch_id"])
    return is_writer(trainer) and ((epoch + 1) % trainer.cfg.snapshot_epoch == 0 or epoch == trainer.cfg.epoch - 1)


def epoch_complete(trainer, status) -> bool:
    """True at the last ``on_epoch_end`` call of an epoch (the one after evaluation, if any)."""
    return status["mode"] == "eval" or not evaluates(trainer, status)


class ScalarLossStats(Callback):
    """Makes ppdet's loss statistics scalar: without positive samples PP-YOLOE returns ``loss_iou`` and
    ``loss_dfl`` as shape-[1] zeros next to 0-d losses, and ppdet's LogPrinter then fails to format the
    median of the mixed window (TypeError in ``stats.py``)."""

    def on_train_begin(self, status):
        from ppdet.utils.stats import TrainingStats

        class _Scalar(TrainingStats):
            def update(self, stats):
                super().update({k: _Flat(v) for k, v in stats.items()})

        status["training_staus"] = _Scalar(status["training_staus"].window_size)


class _Flat:
    def __init__(self, tensor):
        self.tensor = tensor

    def numpy(self):
        import numpy as np

        return np.asarray(self.tensor.numpy(), dtype=np.float64).reshape(-1)[0]


class ProgressBar(Callback):
    """A tqdm bar over all training steps with the running loss and learning rate."""

    def __init__(self, trainer, total_epochs: int):
        super().__init__(trainer)
        self.total_epochs = total_epochs
        self.bar = None

    def on_step_end(self, status):
        if status.get("mode") != "train" or not is_writer(self.model):
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


class EpochSeeder(Callback):
    """Re-seeds Python, numpy and paddle from (seed, epoch) at the start of every training epoch."""

    def __init__(self, trainer, seed: int):
        super().__init__(trainer)
        self.seed = seed
        self.seen = -1

    def on_epoch_begin(self, status):
        epoch = int(status["epoch_id"])
        if status.get("mode") == "train" and epoch != self.seen:  # ppdet calls it again before evaluating
            from detect.seeded_loader import seed_epoch

            seed_epoch(self.seed, epoch)
            self.seen = epoch


class Unfreezer(Callback):
    """Thaws the frozen layers at the start of epoch ``at`` (1-based), at ``lr * lr_factor``."""

    def __init__(self, trainer, freeze_state, at: int, lr_factor: float):
        super().__init__(trainer)
        self.freeze_state = freeze_state
        self.at = at
        self.lr_factor = lr_factor

    def on_epoch_begin(self, status):
        if self.at > 0 and status.get("mode") == "train" and int(status["epoch_id"]) + 1 >= self.at:
            self.freeze_state.thaw(self.lr_factor, self.model.ema if self.model.use_ema else None)


class HistoryLogger(Callback):
    """Appends one JSON line per epoch (mean losses of the epoch, learning rate, time, mAP) to ``history.jsonl``.

    The history is the source of metrics.json and of the training-curve plot, and it survives a crash
    (a resumed run first cuts it back to its checkpoint's epoch, so it stays continuous).
    """

    def __init__(self, trainer, path: Path, clock: Callable[[], float] = time.time):
        super().__init__(trainer)
        self.path = path
        self.clock = clock
        self.pending: dict[str, Any] = {}
        self.epoch_start = clock()
        self.seen = -1
        self.sums: dict[str, float] = {}
        self.steps = 0

    def on_epoch_begin(self, status):
        if status.get("mode") == "train" and int(status["epoch_id"]) != self.seen:
            self.epoch_start = self.clock()
            self.seen = int(status["epoch_id"])
            self.sums, self.steps = {}, 0

    def on_step_end(self, status):
        # ppdet's own figures are medians over a window that spans epochs (and restarts on resume)
        if status.get("mode") == "train" and status["training_staus"].meters:  # rank 0 only
            for key, meter in status["training_staus"].meters.items():
                self.sums[key] = self.sums.get(key, 0.0) + float(meter.value)
            self.steps += 1

    def on_epoch_end(self, status):
        epoch = int(status["epoch_id"]) + 1
        if status["mode"] == "train":
            losses = {k: round(v / max(1, self.steps), 6) for k, v in self.sums.items()}
            self.pending = {"epoch": epoch, "lr": float(status.get("learning_rate", 0.0)),
                            "train_seconds": round(self.clock() - self.epoch_start, 2), **losses}
        else:
            self.pending.update(coco_results(self.model))
        if epoch_complete(self.model, status):
            self._write()

    def _write(self) -> None:
        if not self.pending or not is_writer(self.model):
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(self.pending) + "\n")
        self.pending = {}


class EarlyStopping(Callback):
    """Requests a stop when validation mAP50-95 has not improved by more than ``min_delta`` for
    ``patience`` evaluations (0 = never). :class:`Checkpointing` carries the request out."""

    def __init__(self, trainer, patience: int, min_delta: float = 0.0):
        super().__init__(trainer)
        self.patience = patience
        self.min_delta = min_delta
        self.best = -math.inf
        self.best_epoch = 0
        self.bad_evals = 0
        self.reason: str | None = None

    def state(self) -> dict[str, Any]:
        return {"best": self.best if math.isfinite(self.best) else None, "best_epoch": self.best_epoch,
                "bad_evals": self.bad_evals}

    def load_state(self, state: dict[str, Any]) -> None:
        self.best = -math.inf if state["best"] is None else float(state["best"])
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
            self.reason = (f"early stop: mAP50-95 did not improve by more than {self.min_delta} for "
                           f"{self.bad_evals} evaluations (best {self.best:.4f} at epoch {self.best_epoch})")


class TimeBudget(Callback):
    """Requests a stop after the first epoch that ends past the budget (the run stays resumable).

    It looks at the clock at the epoch's last training step (so :class:`detect.eval_schedule.EvalSchedule`,
    registered after it, evaluates the epoch the run ends with) and again when the epoch is complete."""

    def __init__(self, trainer, minutes: float, clock: Callable[[], float] = time.time):
        super().__init__(trainer)
        self.deadline = clock() + minutes * 60.0
        self.minutes = minutes
        self.clock = clock
        self.reason: str | None = None

    def _check(self, status) -> None:
        if self.reason is None and self.clock() >= self.deadline:
            self.reason = f"time budget of {self.minutes:g} minutes reached after epoch {int(status['epoch_id']) + 1}"

    def on_step_end(self, status):
        if status.get("mode") == "train" and int(status["step_id"]) + 1 == int(status["steps_per_epoch"]):
            self._check(status)

    def on_epoch_end(self, status):
        if epoch_complete(self.model, status):
            self._check(status)


class CloseMosaic(Callback):
    """Close-mosaic under a time budget: the last ``close_epochs`` epochs that fit in the budget train on plain
    samples (the reader's ``mosaic_epoch`` only knows ``train.epochs``, which a budget usually cuts short).

    At the start of each epoch it estimates the seconds per epoch from the epochs done so far (evaluation
    included; earlier sessions of a resumed run count) and, when at most ``close_epochs`` epochs are left in the
    budget, sets the dataset's ``mosaic_epoch`` to this epoch: ppdet groups samples for Mosaic only while
    ``epoch < mosaic_epoch``. The decision depends on the clock, so a resumed run may close it one epoch apart.
    """

    def __init__(self, trainer, close_epochs: int, budget_minutes: float, elapsed: Callable[[], float]):
        super().__init__(trainer)
        self.close_epochs = close_epochs
        self.budget = budget_minutes * 60.0
        self.elapsed = elapsed
        self.closed_at: int | None = None

    def on_epoch_begin(self, status):
        epoch = int(status["epoch_id"])
        dataset = self.model.loader.dataset
        if self.closed_at is not None or epoch == 0 or not 0 <= dataset.mosaic_epoch:
            return
        spent = self.elapsed()
        per_epoch = spent / epoch
        if self.budget - spent <= self.close_epochs * per_epoch:
            dataset.mosaic_epoch = epoch if epoch > 0 else -1
            self.closed_at = epoch
            print(f"close-mosaic: epochs {epoch + 1}.. train without Mosaic ({per_epoch:.0f} s per epoch, "
                  f"{max(0.0, self.budget - spent):.0f} s of the time budget left)")


class WeightsSaver(Callback):
    """Writes ``best.pdparams`` and ``last.pdparams`` (the evaluated, EMA-applied weights) atomically.

    Best means the first evaluation with the highest mAP50-95 (strictly better replaces it), the same
    rule as metrics.json's ``best_epoch``. The best value is part of every checkpoint, so a resumed run
    does not overwrite the best weights with its first evaluation (ppdet's Checkpointer would).
    """

    def __init__(self, trainer, best_path: Path, last_path: Path):
        super().__init__(trainer)
        self.best_path = best_path
        self.last_path = last_path
        self.best = -math.inf
        self.best_epoch = 0
        self.improved = False

    def state(self) -> dict[str, Any]:
        return {"best": self.best if math.isfinite(self.best) else None, "best_epoch": self.best_epoch}

    def load_state(self, state: dict[str, Any]) -> None:
        self.best = -math.inf if state["best"] is None else float(state["best"])
        self.best_epoch = int(state["best_epoch"])

    def on_epoch_end(self, status):
        self.improved = False
        if status["mode"] != "eval":
            return
        value = coco_results(self.model).get("map50_95", -1.0)
        state = self.model.model.state_dict()
        save_state_atomic(state, self.last_path)
        if value > self.best:
            self.best, self.best_epoch, self.improved = value, int(status["epoch_id"]) + 1, True
            save_state_atomic(state, self.best_path)


class Checkpointing(Callback):
    """Writes the epoch's full checkpoint (``write(status)``), then ends the run if a stopper asked to.

    Registered last, so the history line, the stoppers' counters and the best weights are up to date.
    """

    def __init__(self, trainer, write: Callable[[dict, dict | None], Any], stoppers: list):
        super().__init__(trainer)
        self.write = write
        self.stoppers = stoppers

    def pending_stop(self, status) -> dict[str, str] | None:
        for stopper in self.stoppers:
            if stopper.reason:
                kind = "early_stop" if isinstance(stopper, EarlyStopping) else "time_budget"
                return {"kind": kind, "reason": stopper.reason}
        if int(status["epoch_id"]) + 1 >= self.model.cfg.epoch:
            return {"kind": "completed", "reason": "completed all epochs"}
        return None

    def on_epoch_end(self, status):
        if not epoch_complete(self.model, status):
            return
        stop = self.pending_stop(status) if is_writer(self.model) else None
        if is_writer(self.model):
            self.write(status, stop)
        if self.model._nranks > 1:  # the other processes learn rank 0's decision (it alone evaluates)
            stop = _broadcast_stop(stop)
        if stop is not None and stop["kind"] != "completed":
            raise StopTraining(stop["reason"], stop["kind"])


def _broadcast_stop(stop: dict[str, str] | None) -> dict[str, str] | None:
    paddle = paddle_stack().paddle
    flag = paddle.to_tensor([1 if stop is not None and stop["kind"] != "completed" else 0], dtype="int64")
    paddle.distributed.broadcast(flag, src=0)
    if stop is None and int(flag.numpy()[0]):
        return {"kind": "stopped", "reason": "stopped by rank 0 (see its metrics.json)"}
    return stop


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
