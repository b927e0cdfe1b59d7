"""Exact resume of an interrupted run: its ``settings.yaml`` is the spec, its newest sound checkpoint the state.

What a checkpoint holds and how it is put into a session is :mod:`detect.session_state`; the session is built
by :mod:`detect.session`. A resume may change only what does not alter what one epoch computes
(:data:`RESUMABLE`: more epochs, a time budget, the device...); such overrides go through
``LineSpec.with_cli`` once and are recorded in the run's settings.yaml and ``resumes.jsonl``.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from detect.checkpoints import Checkpoint, clean_temporary, file_sha256, find_resumable
from detect.linespec import LineSpec
from detect.ppyoloe import RunPaths
from detect.preflight import check_data
from detect.run_settings import load_run_spec, read_record, spec_differences
from detect.session import TrainResult, build_session, finish_run, process_rank, run_session
from detect.session_state import restore_session
from detect.settings import Layer
from edge_runtime.errors import ConfigError
from edge_runtime.fileio import atomic_write_text

# Train settings a resumed run may change: they do not alter what one epoch computes (epochs may only grow).
RESUMABLE = ("epochs", "time_budget_min", "device", "workers", "log_interval", "patience", "min_delta")


def check_same_line(spec: LineSpec, stored: dict[str, Any], where: str) -> None:
    """A run resumes only with its own line, classes, image size and model size."""
    own = {"line": spec.line, "classes": list(spec.classes), "image_size": spec.image_size,
           "model_size": spec.model_size}
    diff = [f"{k}: {stored.get(k)!r} in the run, {v!r} now" for k, v in own.items() if stored.get(k) != v]
    if diff:
        raise ConfigError(f"{where} was trained for another line or model ({'; '.join(diff)}). Resume it with "
                          f"the line spec it started with (recorded in {where}/settings.yaml), or start a new run "
                          f"(--pretrained accepts its weights, also with another class count).")


def resume_spec(recorded: LineSpec, cli: Layer | None, where: str) -> LineSpec:
    """The run's recorded spec with the command line on top, refused if it changes more than a resume may."""
    spec = recorded.with_cli(cli)
    old, new = recorded.settings, spec.settings
    for name in old.to_dict():
        for key, value in old.to_dict()[name].items():
            now = new.to_dict()[name][key]
            if now != value and not (name == "train" and key in RESUMABLE):
                raise ConfigError(f"--resume cannot change {name}.{key} ({value!r} -> {now!r}): the run would not "
                                  f"continue the same training. Allowed: train.{', train.'.join(RESUMABLE)}. Start a "
                                  f"new run instead (--pretrained {where}/weights/best.pdparams).")
    if new.train.epochs < old.train.epochs:
        raise ConfigError(f"--epochs {new.train.epochs} is fewer than the run's {old.train.epochs}: a resume can "
                          f"only extend a run.")
    return spec


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


def resume_run(run_dir: Path, cli: Layer | None = None, spec: LineSpec | None = None,
               quiet: bool = False) -> TrainResult:
    """Continue ``run_dir`` from its newest checkpoint that verifies, with the settings it recorded.

    ``spec`` (a line spec given on the command line as well) must describe the same line; the run's own
    settings.yaml wins for everything else."""
    run = RunPaths(Path(run_dir))
    where = str(run.root)
    record = read_record(run.root)
    recorded = load_run_spec(run.root)
    if spec is not None:
        check_same_line(spec, record, where)
        diffs = spec_differences(recorded, spec.source) if spec.source and spec.source.is_file() else []
        if diffs and not quiet:
            print(f"note: {spec.source} differs from what run {where} used; the run's settings.yaml wins:\n  "
                  + "\n  ".join(diffs))
    writer = process_rank()[0] == 0
    if writer:
        clean_temporary(run.checkpoints)
    ckpt = find_resumable(run.checkpoints)
    state = ckpt.state()
    check_same_line(recorded, state, f"checkpoint {ckpt.path}")
    stop = state.get("stop") or {}
    if stop.get("kind") == "early_stop":
        raise ConfigError(f"run '{where}' stopped early at epoch {state['epoch']} ({stop['reason']}); resuming would "
                          f"stop again. Its best weights are {run.best_weights}: to train further, start a new run "
                          f"with --pretrained {run.best_weights}.")
    spec = resume_spec(recorded, cli, where)
    epochs = spec.settings.train.epochs
    if int(state["epoch"]) >= epochs:
        if run.metrics.exists():
            raise ConfigError(f"run '{where}' already finished all {state['epoch']} epochs. Pass --epochs N with "
                              f"N > {state['epoch']} to continue it, or start a new run.")
        return _finish_only(spec, run, state, quiet)  # killed after the last epoch
    check_data(spec)
    if file_sha256(spec.paths.train) != state["train_data_sha256"]:
        raise ConfigError(f"the training split {spec.paths.train} changed since run '{where}' started, so it "
                          f"cannot continue exactly. Start a new run (--pretrained {run.best_weights}).")
    if writer:
        truncate_history(run, int(state["epoch"]))
    assigner = ((record.get("ppdet") or {}).get("PPYOLOEHead") or {}).get("static_assigner_epoch")
    session = build_session(spec, run, fresh=False, static_assigner_epoch=assigner)
    if len(session.loader) != int(state["steps_per_epoch"]):
        raise ConfigError(f"steps per epoch changed ({state['steps_per_epoch']} -> {len(session.loader)}): "
                          f"the run cannot continue exactly.")
    restore_session(session, ckpt, state)
    if writer:
        _log_resume(run, ckpt, spec)
    if not quiet and writer:
        print(f"resuming {where} after epoch {state['epoch']} of {epochs} from {ckpt.path.name}")
    return run_session(session, quiet)


def _log_resume(run: RunPaths, ckpt: Checkpoint, spec: LineSpec) -> None:
    """Append to ``resumes.jsonl`` by an atomic rewrite (a kill never leaves half a line in it)."""
    path = run.root / "resumes.jsonl"
    lines = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            json.loads(line)
            lines.append(line)
        except ValueError:
            continue
    lines.append(json.dumps({"from_checkpoint": ckpt.name, "epoch": ckpt.epoch, "epochs": spec.settings.train.epochs,
                             "overrides": {k: dict(v) for k, v in spec.cli.items()},
                             "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
    atomic_write_text(path, "".join(f"{line}\n" for line in lines))


def _finish_only(spec: LineSpec, run: RunPaths, state: dict[str, Any], quiet: bool) -> TrainResult:
    truncate_history(run, int(state["epoch"]))
    reason = (state.get("stop") or {}).get("reason", "completed all epochs")
    metrics = finish_run(spec, run, reason, float(state.get("train_seconds", 0.0)), [], quiet)
    return TrainResult(run, metrics)
