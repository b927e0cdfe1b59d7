"""Fine-tune PP-YOLOE+ on a line with ppdet's own ``Trainer``; write ``runs/<line>/<run>/``.

The run directory holds ``settings.yaml`` (the line and every setting as used, command-line overrides
included, plus the device and the ppdet configuration: :mod:`detect.run_settings`), ``history.jsonl`` (one
line per epoch), best and last weights, resumable ``checkpoints/`` (:mod:`detect.checkpoints`),
``metrics.json`` (best epoch, per-class AP, stop reason) and ``training_curves.png``.
The session itself (trainer, loader, callbacks) is built in :mod:`detect.session`; an interrupted run
continues with :func:`resume` (:mod:`detect.resume`).
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

from detect.linespec import LineSpec
from detect.ppyoloe import RunPaths
from detect.preflight import check_data, check_pretrained, check_settings
from detect.session import TrainResult, build_session, process_rank, run_session
from detect.settings import Layer
from edge_runtime.errors import ConfigError


def default_run_dir(spec: LineSpec, runs_root: Path | str = "runs", name: str | None = None) -> Path:
    name = name or datetime.now().strftime("train-%Y%m%d-%H%M%S")
    return Path(runs_root) / spec.line / name


def train(spec: LineSpec, run_dir: Path | None = None, quiet: bool = False) -> TrainResult:
    """Train on ``spec``'s train split with ``spec.settings`` (final: the command put its overrides on with
    ``spec.with_cli`` before), validating on its val split; returns the run and its metrics."""
    from detect.checkpoints import list_checkpoints

    check_settings(spec)
    check_pretrained(spec)  # weights of another model size: refused with the fix, before anything is built
    check_data(spec)
    run = RunPaths(Path(run_dir) if run_dir else default_run_dir(spec))
    if run.metrics.exists():
        raise ConfigError(f"run '{run.root}' already finished (metrics.json exists). Choose another --name.")
    if list_checkpoints(run.checkpoints):
        raise ConfigError(f"run '{run.root}' already has checkpoints: continue it with "
                          f"`defectkit train {spec.source or 'LINE.yaml'} --resume {run.root}` or choose another --name.")
    run.root.mkdir(parents=True, exist_ok=True)
    if run.history.exists() and process_rank()[0] == 0:  # a run that died before its first checkpoint
        run.history.unlink()
    return run_session(build_session(spec, run), quiet)


def resume(run_dir: Path | str, cli: Layer | None = None, spec: LineSpec | None = None,
           quiet: bool = False) -> TrainResult:
    """Continue an interrupted run exactly from its newest sound checkpoint (see :mod:`detect.resume`).

    The run's settings.yaml is the spec; ``cli`` (e.g. ``{"train": {"epochs": 12}}``) may change what a resume
    may change; ``spec`` (the line spec named on the command line) must be the run's line."""
    from detect.resume import resume_run

    return resume_run(Path(run_dir), cli, spec, quiet)
