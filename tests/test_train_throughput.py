"""Training throughput settings (issue 11 item 5): evaluation on a schedule, and MKL's AVX2 kernels on AMD CPUs.

Real ppdet training on the tiny line. The schedule's decisions depend on measured CPU seconds; the tests pick
shares at the two ends (so small that only the forced evaluations happen) and drive the time budget by a clock
that follows the epochs, so no assertion depends on how fast this machine is. The credit rule itself is checked
with a clock that advances by fixed costs.
"""
from __future__ import annotations

import json
import types

import pytest

FAST = {"batch_size": 4, "warmup_steps": 2, "multiscale": False, "visualdl": False, "eval_interval": 0,
        "eval_share": 1e-9, "patience": 0}


def _evaluated(run) -> list[int]:
    return [h["epoch"] for h in map(json.loads, run.history.read_text().splitlines()) if "map50_95" in h]


@pytest.mark.timeout(120)
def test_auto_schedule_evaluates_the_first_and_last_epoch_and_the_time_budget_stop(tiny_spec, tmp_path):
    from detect.checkpoints import list_checkpoints
    from detect.ppyoloe import RunPaths
    from detect.session import build_session, run_session

    spec = tiny_spec.with_cli({"train": {**FAST, "epochs": 6, "time_budget_min": 1.0}})
    run = RunPaths(tmp_path / "budget")
    run.root.mkdir()
    session = build_session(spec, run)
    budget, trainer = session.cb.budget, session.trainer
    # the budget runs out during epoch 3 (0-based 2): a clock that follows the training, not the wall
    budget.clock = lambda: budget.deadline if trainer.status["epoch_id"] >= 2 else budget.deadline - 1.0
    result = run_session(session, quiet=True)
    assert result.metrics["stop_reason"].startswith("time budget") and result.metrics["epochs_run"] == 3
    assert _evaluated(run) == [1, 3]  # the first (it measures the cost) and the one the run ends with
    assert result.metrics["best_epoch"] in (1, 3)
    states = {c.epoch: c.state() for c in list_checkpoints(run.checkpoints)}
    last = states[3]
    assert last["eval_schedule"]["evaluations"] == 2 and last["metrics"]
    assert last["eval_schedule"]["train_s"] > 0 and last["eval_schedule"]["last_cost"] > 0


@pytest.mark.timeout(120)
def test_without_a_budget_the_last_epoch_is_evaluated(tiny_spec, tmp_path):
    from detect.train import train

    auto = train(tiny_spec.with_cli({"train": {**FAST, "epochs": 3}}), tmp_path / "auto", quiet=True)
    assert _evaluated(auto.run) == [1, 3] and auto.metrics["stop_reason"] == "completed all epochs"


def test_credit_rule_keeps_evaluation_within_its_share():
    from detect.eval_schedule import NEVER, EvalSchedule

    now = [0.0]
    from ppdet.core.workspace import AttrDict

    trainer = types.SimpleNamespace(cfg=AttrDict(epoch=200))
    sched = EvalSchedule(trainer, interval=0, share=0.1, stoppers=[], clock=lambda: now[0])
    assert trainer.cfg["snapshot_epoch"] == NEVER
    evaluated = []
    for epoch in range(200):
        sched.on_epoch_begin({"mode": "train", "epoch_id": epoch})
        now[0] += 10.0  # an epoch of training costs 10 s, an evaluation 4 s
        sched.on_step_end({"mode": "train", "epoch_id": epoch, "step_id": 4, "steps_per_epoch": 5})
        if trainer.cfg["snapshot_epoch"] == 1:
            evaluated.append(epoch + 1)
            now[0] += 4.0
            sched.on_epoch_end({"mode": "eval", "epoch_id": epoch})
    assert evaluated[0] == 1 and evaluated[-1] == 200
    assert sched.eval_s / (sched.train_s + sched.eval_s) <= 0.1 + 4.0 / (200 * 10.0)  # the forced last one
    gaps = {b - a for a, b in zip(evaluated[1:-1], evaluated[2:-1])}
    assert gaps <= {3, 4}  # 4 s per evaluation within 10 % of ~14 s per epoch: one in ~3.6 epochs
    stopper = types.SimpleNamespace(reason="time budget")
    forced = EvalSchedule(trainer, interval=0, share=0.1, stoppers=[stopper], clock=lambda: now[0])
    forced.last_cost, forced.eval_s = 1e9, 1e9  # the rule alone would never evaluate again
    assert forced.due(5)


def test_mkl_avx2_is_asked_for_on_amd_cpus_only_and_an_existing_choice_wins(monkeypatch):
    from pathlib import Path

    from detect.mkl import prefer_mkl_avx2

    info = Path("/proc/cpuinfo").read_text()[:8192]
    amd_avx2 = "AuthenticAMD" in info and " avx2" in info
    monkeypatch.delenv("MKL_DEBUG_CPU_TYPE", raising=False)
    assert prefer_mkl_avx2(False) is False
    import os

    assert "MKL_DEBUG_CPU_TYPE" not in os.environ
    assert prefer_mkl_avx2(True) is amd_avx2
    monkeypatch.setenv("MKL_DEBUG_CPU_TYPE", "4")
    assert prefer_mkl_avx2(True) is False and os.environ["MKL_DEBUG_CPU_TYPE"] == "4"


@pytest.mark.parametrize("overrides, message", [
    ({"eval_share": 0.0}, r"eval_share is a share of the training time in \(0, 1\]"),
    ({"eval_interval": -1}, r"eval_interval must be >= 0 \(0 = auto"),
])
def test_bad_schedule_settings_are_refused(tiny_spec, overrides, message):
    from edge_runtime.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        tiny_spec.with_cli({"train": overrides})
