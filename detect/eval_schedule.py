"""When the training loop evaluates: every N epochs, or as often as a share of the CPU time allows.

ppdet evaluates after an epoch when ``(epoch + 1) % cfg.snapshot_epoch == 0`` or at the last epoch, and reads
``snapshot_epoch`` right after the epoch's last step. :class:`EvalSchedule` decides at that last step and sets
``snapshot_epoch`` to 1 (evaluate now) or to a number no epoch reaches (skip), so ppdet's loop, its EMA swap and
the kit's callbacks (:func:`detect.callbacks.evaluates`) keep working unchanged.

With ``interval`` 0 (auto) an evaluation happens when the evaluations' CPU seconds, this one included (its cost
is the last one measured), stay within ``share`` of all training and evaluation CPU seconds so far; the first one
follows the first epoch (it measures the cost). A stopper that has already decided to end the run after this
epoch (:class:`detect.callbacks.TimeBudget` at the last step) forces an evaluation, as does the last epoch (ppdet),
so early stopping and the best weights always see the weights the run ends with. The training weights do not
depend on the schedule (evaluation reseeds nothing and restores the raw weights); which epochs are evaluated
depends on measured CPU time, so it may differ between two runs.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from detect.heavy import paddle_stack

paddle_stack()
from ppdet.engine.callbacks import Callback  # noqa: E402  (after the safe import order)

NEVER = 1 << 30  # a snapshot_epoch no epoch number reaches


class EvalSchedule(Callback):
    """Sets ppdet's ``snapshot_epoch`` at the last step of each epoch: evaluate this epoch or not."""

    def __init__(self, trainer, interval: int, share: float, stoppers: list,
                 clock: Callable[[], float] = time.process_time):
        super().__init__(trainer)
        self.interval = interval
        self.share = share
        self.stoppers = stoppers
        self.clock = clock
        self.train_s = 0.0  # CPU seconds of training epochs (earlier sessions of a resumed run included)
        self.eval_s = 0.0  # CPU seconds of evaluations
        self.last_cost: float | None = None  # CPU seconds of the last evaluation
        self.evaluations = 0
        self._begun = -1
        self._epoch_start = 0.0
        self._eval_start: float | None = None
        trainer.cfg["snapshot_epoch"] = interval if interval > 0 else NEVER

    def state(self) -> dict[str, Any]:
        return {"train_s": round(self.train_s, 3), "eval_s": round(self.eval_s, 3), "last_cost": self.last_cost,
                "evaluations": self.evaluations}

    def load_state(self, state: dict[str, Any]) -> None:
        self.train_s, self.eval_s = float(state["train_s"]), float(state["eval_s"])
        self.last_cost = None if state["last_cost"] is None else float(state["last_cost"])
        self.evaluations = int(state["evaluations"])

    def due(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based, just trained) is evaluated; ppdet adds the last epoch itself."""
        if any(s.reason for s in self.stoppers):
            return True
        if self.interval > 0:
            return (epoch + 1) % self.interval == 0
        if self.last_cost is None:
            return True
        cost = self.last_cost
        return self.eval_s + cost <= self.share * (self.train_s + self.eval_s + cost)

    def on_epoch_begin(self, status):
        epoch = int(status["epoch_id"])
        if status.get("mode") == "train" and epoch != self._begun:  # ppdet calls it again before evaluating
            self._begun = epoch
            self._epoch_start = self.clock()

    def on_step_end(self, status):
        if status.get("mode") != "train" or int(status["step_id"]) + 1 != int(status["steps_per_epoch"]):
            return
        now = self.clock()
        self.train_s += now - self._epoch_start
        epoch = int(status["epoch_id"])
        evaluate = self.due(epoch) or epoch == self.model.cfg.epoch - 1
        self.model.cfg["snapshot_epoch"] = 1 if evaluate else NEVER
        self._eval_start = now if evaluate else None

    def on_epoch_end(self, status):
        if status["mode"] == "eval" and self._eval_start is not None:
            self.last_cost = self.clock() - self._eval_start
            self.eval_s += self.last_cost
            self.evaluations += 1
            self._eval_start = None
