"""Training v1 end to end on real ppdet: run layout, metrics, curves, evaluation, bad input."""
from __future__ import annotations

import json

import pytest

from defectkit.cli import main
from edge_runtime.errors import DataError


def test_run_writes_metrics_weights_config_and_curves(tiny_run):
    run = tiny_run.run
    for path in (run.metrics, run.config, run.best_weights, run.last_weights, run.curves_png, run.history):
        assert path.is_file(), path
    metrics = json.loads(run.metrics.read_text())
    assert metrics["epochs_run"] == 2
    assert set(metrics["val"]["per_class"]) == set(metrics["classes"])
    assert 0.0 <= metrics["val"]["map50"] <= 1.0
    history = [json.loads(x) for x in run.history.read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all("map50" in h and "loss" in h for h in history)
    assert run.curves_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_then_eval_on_foreign_coco(foreign_spec_path, tmp_path):
    """Non-square images, mixed PNG/JPG, empty images, category ids from 11: train + eval complete."""
    rc = main(["train", str(foreign_spec_path), "--runs", str(tmp_path), "--name", "f", "--epochs", "1",
               "--batch-size", "2", "--set", "multiscale=False", "--set", "warmup_steps=1"])
    assert rc == 0
    run_dir = next(tmp_path.glob("*/f"))
    assert (run_dir / "metrics.json").is_file()
    rc = main(["eval", str(foreign_spec_path), "--run", str(run_dir)])
    assert rc == 0
    result = json.loads((run_dir / "eval" / "val" / "eval.json").read_text())
    assert set(result["per_class"]) == {"scratch", "dent", "stain"}


def test_class_order_mismatch_is_refused_before_training(tiny_spec, tmp_path):
    from detect.train import train

    spec = tiny_spec.__class__(**{**tiny_spec.__dict__, "classes": list(reversed(tiny_spec.classes))})
    with pytest.raises(DataError, match="order is the contract"):
        train(spec, tmp_path / "r", {"epochs": 1})


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
