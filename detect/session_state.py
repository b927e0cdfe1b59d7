"""What a checkpoint holds of a training session, and how it is put back.

ppdet's own ``resume_weights`` restores weights, optimizer, LR position, epoch and EMA step, but not the
best metric, the early-stopping counters, the RNG states or the data order (STACK.md), and it matches
optimizer moments by Paddle's generated parameter names (``conv2d_57.w_0``), which differ as soon as a
process builds another model first. Here every tensor is keyed by its structured name
(``backbone.stem.conv1.conv.weight``), the data order and augmentations are pure functions of
(seed, epoch) (:mod:`detect.seeded_loader`), and the callbacks' counters travel in ``state.json``.
The session (:mod:`detect.session`) writes checkpoints with :func:`checkpoint_writer`; a resume
(:mod:`detect.resume`) puts one back with :func:`restore_session`. Neither module is imported here.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, Callable

from detect.checkpoints import (Checkpoint, Retention, apply_retention, checkpoint_name, file_sha256,
                                write_checkpoint, write_pointer)
from edge_runtime.errors import ConfigError


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

    trainer, run, spec = session.trainer, session.run, session.spec
    policy = Retention.from_settings(spec.settings.train)
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
            "image_size": spec.image_size, "epoch": epoch, "epochs": spec.settings.train.epochs,
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
            "eval_schedule": session.cb.evals.state(),
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
        session.freeze.thaw(session.spec.settings.train.unfreeze_lr_factor, trainer.ema if trainer.use_ema else None)
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
    if "eval_schedule" in state:  # checkpoints written before the schedule existed: it starts afresh
        session.cb.evals.load_state(state["eval_schedule"])
    session.start = float(state.get("train_seconds", 0.0))
    if session.cb.vdl is not None:  # continue VisualDL's step axes instead of restarting them at 0
        session.cb.vdl.vdl_loss_step = int(state["iteration"])
        session.cb.vdl.vdl_mAP_step = session.cb.evals.evaluations
    restore_rng(state["rng"])
