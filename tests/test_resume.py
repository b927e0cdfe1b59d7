"""Exact resume on real ppdet training: a run interrupted after epoch k and resumed ends with the same
weights as an uninterrupted run (every augmentation on, backbone thawed in between), plus the refusals and
the fallback to the previous checkpoint when the latest one is corrupt.

Tolerance: weights must agree to 1e-6 absolute; on CPU they come out bit-identical (max difference 0.0).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edge_runtime.errors import ConfigError

RECIPE = {"epochs": 4, "batch_size": 4, "warmup_steps": 2, "lr": 0.01, "eval_interval": 2, "visualdl": False,
          "multiscale": True, "mosaic": 0.5, "mixup": 0.5, "close_mosaic": 1, "flip": 0.5,
          "hsv": [0.015, 0.5, 0.3], "freeze": "2", "unfreeze_at_epoch": 3, "seed": 7,
          "pretrained": ""}  # from random init: the ATSS phase (a quarter of the epochs) is what a resume must keep


class Crash(Exception):
    """Stands in for a process that dies right after a checkpoint was written."""


def _interrupted_run(spec, run_dir, after_epoch):
    from ppdet.engine.callbacks import Callback

    from detect.callbacks import epoch_complete
    from detect.ppyoloe import RunPaths
    from detect.preflight import check_settings
    from detect.session import build_session, run_session

    check_settings(spec)
    run = RunPaths(run_dir)
    run.root.mkdir(parents=True)
    session = build_session(spec, run)

    class Interrupt(Callback):
        def on_epoch_end(self, status):
            if epoch_complete(self.model, status) and status["epoch_id"] + 1 == after_epoch:
                raise Crash()

    session.trainer.register_callbacks([Interrupt(session.trainer)])  # after Checkpointing
    with pytest.raises(Crash):
        run_session(session, quiet=True)
    session.cb.progress.close()
    return run


def _tensors(path):
    from detect.heavy import paddle_stack

    return {k: v.numpy() for k, v in paddle_stack().paddle.load(str(path)).items()}


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) if a[k].size else 0.0 for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tiny_spec, tmp_path_factory):
    from detect.train import train

    return train(tiny_spec.with_cli({"train": RECIPE}), tmp_path_factory.mktemp("resume") / "straight", quiet=True)


@pytest.mark.timeout(180)
def test_interrupted_and_resumed_run_equals_uninterrupted_run(tiny_spec, uninterrupted, tmp_path):
    from detect.checkpoints import find_resumable
    from detect.train import resume

    run = _interrupted_run(tiny_spec.with_cli({"train": RECIPE}), tmp_path / "broken", after_epoch=2)
    assert find_resumable(run.checkpoints).epoch == 2 and not run.metrics.exists()
    resumed = resume(run.root, quiet=True)  # the run's settings.yaml is the spec
    a_ck, b_ck = find_resumable(uninterrupted.run.checkpoints), find_resumable(resumed.run.checkpoints)
    assert a_ck.epoch == b_ck.epoch == 4
    for name in ("model.pdparams", "ema.pdparams"):
        assert _max_diff(_tensors(a_ck.path / name), _tensors(b_ck.path / name)) <= 1e-6, name
    assert _max_diff(_tensors(uninterrupted.best_weights), _tensors(resumed.best_weights)) <= 1e-6
    a_opt, b_opt = (c.tensors("optimizer.pdopt") for c in (a_ck, b_ck))
    assert a_opt["lr_scheduler"] == b_opt["lr_scheduler"]
    assert _max_diff({k: v.numpy() for k, v in a_opt["accumulators"].items()},
                     {k: v.numpy() for k, v in b_opt["accumulators"].items()}) <= 1e-6
    a_state, b_state = a_ck.state(), b_ck.state()
    for key in ("iteration", "ema_step", "best", "early_stopping", "rng", "thawed", "lr_step"):
        assert a_state[key] == b_state[key], key
    history = [json.loads(line) for line in resumed.run.history.read_text().splitlines()]
    straight = [json.loads(line) for line in uninterrupted.run.history.read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    for h, s in zip(history, straight):  # same data, same losses, same mAP
        assert {k: v for k, v in h.items() if k != "train_seconds"} == {k: v for k, v in s.items() if k != "train_seconds"}
    metrics = json.loads(resumed.run.metrics.read_text())
    assert metrics["epochs_run"] == 4 and [r["epoch"] for r in metrics["resumes"]] == [2]


@pytest.mark.timeout(120)
def test_resume_refusals_are_clear_and_happen_before_training(tiny_spec, uninterrupted, tmp_path):
    from dataclasses import replace

    from detect.train import resume

    done = uninterrupted.run.root
    with pytest.raises(ConfigError, match=r"already finished all 4 epochs.*--epochs N with N > 4"):
        resume(done, {}, tiny_spec)
    with pytest.raises(ConfigError, match=r"cannot change train.lr \(0.01 -> 0.5\)"):
        resume(done, {"train": {"lr": 0.5, "epochs": 6}}, tiny_spec)
    with pytest.raises(ConfigError, match=r"cannot change export.nms_iou"):
        resume(done, {"train": {"epochs": 6}, "export": {"nms_iou": 0.5}})
    with pytest.raises(ConfigError, match="only extend"):
        resume(done, {"train": {"epochs": 3}}, tiny_spec)
    with pytest.raises(ConfigError, match="Did you mean 'epochs'"):
        resume(done, {"train": {"epoch": 6}})
    other = replace(tiny_spec, model_size="s")
    with pytest.raises(ConfigError, match=r"another line or model \(model_size: 'tiny' in the run, 's' now\)"):
        resume(done, {}, other)
    fewer = replace(tiny_spec, classes=tiny_spec.classes[:3])
    with pytest.raises(ConfigError, match="classes"):
        resume(done, {}, fewer)
    with pytest.raises(ConfigError, match="not a training run"):
        resume(tmp_path, {}, tiny_spec)
    with pytest.raises(ConfigError, match="already has checkpoints.*--resume"):
        from detect.train import train

        shutil.copytree(done, tmp_path / "copy")
        (tmp_path / "copy" / "metrics.json").unlink()
        train(tiny_spec.with_cli({"train": RECIPE}), tmp_path / "copy")


@pytest.mark.timeout(150)
def test_corrupt_latest_falls_back_and_extending_epochs_continues_the_history(tiny_spec, uninterrupted, tmp_path):
    from detect.checkpoints import CheckpointWarning, list_checkpoints
    from detect.train import resume

    run_dir = tmp_path / "copy"
    shutil.copytree(uninterrupted.run.root, run_dir)
    latest = list_checkpoints(run_dir / "checkpoints")[-1]
    weights = latest.path / "model.pdparams"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated on disk
    with pytest.warns(CheckpointWarning, match="e0004.*falling back"):
        result = resume(run_dir, {"train": {"epochs": 8}}, tiny_spec, quiet=True)
    history = [json.loads(line)["epoch"] for line in result.run.history.read_text().splitlines()]
    assert history == list(range(1, 9))  # epoch 4 redone from epoch 3's checkpoint, then extended
    assert json.loads(result.run.metrics.read_text())["epochs"] == 8
    from detect.run_settings import read_record

    record = read_record(run_dir)  # the resume's override went through with_cli and is recorded
    assert record["settings"]["train"]["epochs"] == 8 and record["overrides"]["train"]["epochs"] == 8
    assert record["overrides"]["train"]["lr"] == RECIPE["lr"]  # the first command's overrides are kept
    # the ATSS->TaskAligned switch stays where the 4-epoch run put it (4 // 4), not where 8 epochs would (8 // 4)
    assert record["ppdet"]["PPYOLOEHead"]["static_assigner_epoch"] == 1 and record["ppdet"]["epoch"] == 8
    resumes = [json.loads(x) for x in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert resumes[-1]["epochs"] == 8 and resumes[-1]["overrides"]["train"]["epochs"] == 8
    assert [c.epoch for c in list_checkpoints(run_dir / "checkpoints")][-1] == 8


@pytest.mark.timeout(120)
def test_early_stopped_run_is_not_resumed(tiny_spec, tmp_path):
    from detect.train import resume, train

    spec = tiny_spec.with_cli({"train": {"epochs": 6, "batch_size": 4, "warmup_steps": 2, "lr": 0.0,
                                         "multiscale": False, "patience": 1, "visualdl": False,
                                         "eval_interval": 1}})  # patience counts evaluations: one per epoch
    result = train(spec, tmp_path / "es", quiet=True)
    assert result.metrics["stop_reason"].startswith("early stop")
    with pytest.raises(ConfigError, match=r"stopped early at epoch 2.*--pretrained .*best.pdparams"):
        resume(result.run.root, {"train": {"epochs": 9}}, tiny_spec)


def _newest_epoch(root) -> int:
    from detect.checkpoints import list_checkpoints

    found = list_checkpoints(root)
    return found[-1].epoch if found else 0


def _logged_step(log, epoch_id: int):
    """(step, steps per epoch) of the newest ppdet step line of 0-based ``epoch_id`` in train.log, or None."""
    import re

    found = None
    if log.is_file():
        for m in re.finditer(r"Epoch: \[(\d+)\] \[\s*(\d+)/(\d+)\]", log.read_text(errors="replace")):
            if int(m[1]) == epoch_id:
                found = (int(m[2]), int(m[3]))
    return found


@pytest.mark.timeout(300)
def test_sigkill_at_three_random_moments_then_the_run_finishes_intact(tiny_spec, tmp_path):
    """Real processes, real ``kill -9``: the kit's CLI trains, is killed after a checkpoint exists (right after a
    randomly chosen step of the next epoch has been logged: mid-step, mid-evaluation or mid-checkpoint-write),
    resumes. No wall-clock windows: every wait is for an event of the run (a checkpoint, a logged step, the
    process ending); the test's timeout only guards against a hang."""
    import random
    import subprocess
    import sys
    import time

    from detect.checkpoints import list_checkpoints, verify

    rng = random.Random(20261122)
    epochs = 6
    run_dir = tmp_path / tiny_spec.line / "killed"
    base = [sys.executable, "-m", "defectkit", "train", str(tiny_spec.source), "--runs", str(tmp_path)]
    start = base + ["--name", "killed", "--epochs", str(epochs), "--batch-size", "4", "--set", "warmup_steps=2",
                    "--set", "multiscale=False", "--set", "visualdl=False", "--set", "mosaic=0.5",
                    "--set", "close_mosaic=2", "--set", "lr=0.01", "--set", "log_interval=1",
                    "--set", "eval_interval=1"]  # every epoch evaluated (checked below)
    again = [sys.executable, "-m", "defectkit", "train", "--resume", str(run_dir)]  # the run is the spec
    kills, seen, command = [], 0, start
    log = open(tmp_path / "stderr.log", "w")
    while len(kills) < 3:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, cwd=tmp_path)
        while proc.poll() is None and _newest_epoch(run_dir / "checkpoints") <= seen:  # a new checkpoint
            time.sleep(0.02)
        seen = _newest_epoch(run_dir / "checkpoints")
        target = None
        while proc.poll() is None:  # then a random step of the next epoch (ppdet's 0-based epoch id == seen)
            logged = _logged_step(run_dir / "train.log", seen)
            if logged is not None:
                target = rng.randrange(logged[1]) if target is None else target
                if logged[0] >= target:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, f"training ended before it could be killed (see {tmp_path / 'stderr.log'})"
        proc.kill()
        proc.wait()
        seen = _newest_epoch(run_dir / "checkpoints")
        kills.append(seen)
        for ckpt in list_checkpoints(run_dir / "checkpoints"):  # whatever the moment, no broken checkpoint
            assert verify(ckpt) == [], ckpt
        command = again
    done = subprocess.run(again, stdout=subprocess.PIPE, stderr=log, cwd=tmp_path, text=True)
    assert done.returncode == 0, (tmp_path / "stderr.log").read_text()[-2000:]
    assert kills == sorted(kills) and kills[-1] < epochs, kills
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs_run"] == epochs and metrics["stop_reason"] == "completed all epochs"
    assert len(metrics["resumes"]) == 3  # one per kill
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert all("map50_95" in h and "loss" in h for h in history)
    remaining = list_checkpoints(run_dir / "checkpoints")
    assert remaining and remaining[-1].epoch == epochs
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    for ckpt in remaining:  # every checkpoint on disk verifies and loads
        assert verify(ckpt) == []
        for name in ("model.pdparams", "ema.pdparams", "optimizer.pdopt"):
            assert ckpt.tensors(name)
