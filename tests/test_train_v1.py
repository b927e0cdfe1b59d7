"""Training v1 end to end on real ppdet: run layout, metrics, curves, evaluation, bad input."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from defectkit.cli import main
from edge_runtime.errors import ConfigError, DataError
from tests.conftest import TINY_TRAIN


def test_run_writes_metrics_weights_settings_and_curves(tiny_run, tiny_spec):
    from detect.infer import evaluate_weights
    from detect.run_settings import load_run_spec, read_record

    run = tiny_run.run
    for path in (run.metrics, run.settings, run.best_weights, run.last_weights, run.curves_png, run.history):
        assert path.is_file(), path
    assert not (run.root / "config.yaml").exists() and not (run.root / "line.yaml").exists()  # one record only
    record = read_record(run.root)
    assert record["device"] == "cpu" and record["ppdet"]["LearningRate"]["base_lr"] == 0.005
    assert record["overrides"]["train"]["lr"] == 0.005 and record["settings"]["train"]["epochs"] == 2
    assert load_run_spec(run.root).settings == tiny_spec.with_cli({"train": TINY_TRAIN}).settings
    metrics = json.loads(run.metrics.read_text())
    assert metrics["epochs_run"] == 2
    assert set(metrics["val"]["per_class"]) == set(metrics["classes"])
    # metrics.json holds what an evaluation of the best weights gives (not any number in [0, 1])
    again = evaluate_weights(tiny_spec, run.best_weights, tiny_spec.paths.val, run.root / "eval" / "again")
    assert metrics["val"]["map50"] == pytest.approx(again.map50, abs=1e-6)
    assert metrics["val"]["map50_95"] == pytest.approx(again.map50_95, abs=1e-6)
    history = [json.loads(x) for x in run.history.read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all("map50" in h and "loss" in h and h["loss"] > 0 for h in history)
    assert metrics["best_epoch"] in (1, 2)
    assert max(h["map50_95"] for h in history) == pytest.approx(
        next(h["map50_95"] for h in history if h["epoch"] == metrics["best_epoch"]))
    assert run.curves_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_then_eval_on_foreign_coco(foreign_spec_path, tmp_path, monkeypatch):
    """Non-square images, mixed PNG/JPG, empty images, category ids from 11: train + eval complete. The command
    line is put on the spec exactly once per command (counted on the real LineSpec.with_cli)."""
    from detect.linespec import LineSpec

    layered = []
    real = LineSpec.with_cli
    monkeypatch.setattr(LineSpec, "with_cli", lambda self, cli: layered.append(cli) or real(self, cli))
    rc = main(["train", str(foreign_spec_path), "--runs", str(tmp_path), "--name", "f", "--epochs", "1",
               "--batch-size", "2", "--set", "multiscale=False", "--set", "warmup_steps=1"])
    assert rc == 0
    run_dir = next(tmp_path.glob("*/f"))
    assert (run_dir / "metrics.json").is_file()
    from detect.run_settings import read_record

    record = read_record(run_dir)  # the command line's values, recorded once, flags and --set alike
    assert record["overrides"] == {"train": {"multiscale": False, "warmup_steps": 1, "epochs": 1, "batch_size": 2}}
    assert record["settings"]["train"]["batch_size"] == 2 and record["settings"]["train"]["lr"] == 0.01
    assert len(layered) == 1
    rc = main(["eval", "--run", str(run_dir)])  # the run's settings.yaml is the spec
    assert rc == 0 and len(layered) == 1  # nothing resolved again
    result = json.loads((run_dir / "eval" / "val" / "eval.json").read_text())
    assert set(result["per_class"]) == {"scratch", "dent", "stain"}


def test_class_order_mismatch_is_refused_before_training(tiny_spec, tmp_path):
    from detect.train import train

    spec = replace(tiny_spec, classes=list(reversed(tiny_spec.classes))).with_cli({"train": {"epochs": 1}})
    with pytest.raises(DataError, match="order is the contract"):
        train(spec, tmp_path / "r")


def test_cli_user_error_is_one_line_and_exit_2(tmp_path, capsys):
    rc = main(["train", str(tmp_path / "missing.yaml")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "does not exist" in err and "Traceback" not in err


def test_cli_augment_preview_writes_png(tiny_spec, tmp_path):
    out = tmp_path / "aug.png"
    assert main(["augment-preview", str(tiny_spec.source), "--out", str(out), "-n", "4", "--set", "mosaic=1.0"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_resume_of_finished_run_says_so(tiny_spec, tiny_run, capsys):
    rc = main(["train", str(tiny_spec.source), "--resume", str(tiny_run.run.root)])
    assert rc == 2
    assert "finished" in capsys.readouterr().err
