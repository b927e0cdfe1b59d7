"""The short fine-tunes of compression (pruning recovery, QAT): ppdet's training loop without checkpoints.

Both change the model's shapes or ops after the session was built, so a full-state checkpoint could not be
resumed by ``detect.resume``; they keep the best weights (written every epoch) and drop checkpointing.
"""
from __future__ import annotations

import contextlib
import logging
import time

log = logging.getLogger("defectkit.compress")


def train_without_checkpoints(trainer, session, progress: bool, what: str) -> None:
    """Run ``trainer.train(validate=True)`` with the kit's callbacks minus checkpointing (and the progress bar
    when ``progress`` is off); ppdet's stdout goes to the session's log file."""
    from ppdet.engine.callbacks import ComposeCallback

    from detect import callbacks as cb

    dropped = (cb.Checkpointing,) if progress else (cb.Checkpointing, cb.ProgressBar)
    trainer._callbacks = [c for c in trainer._callbacks if not isinstance(c, dropped)]
    trainer._compose_callback = ComposeCallback(trainer._callbacks)
    session.began = time.time()
    with open(session.log_file, "a") as fh, contextlib.redirect_stdout(fh):
        try:
            trainer.train(validate=True)
        except cb.StopTraining as stop:  # a stopper from the caller's overrides
            log.info("%s stopped early: %s", what, stop.reason)
        finally:
            session.cb.progress.close()
