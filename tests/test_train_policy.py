"""Training policy on real ppdet runs: early stopping keeps the best epoch's weights, augmentation preview,
VisualDL logs, bad settings refused before training, and the GPU launcher script (command construction
checked with --dry-run: no Docker engine and no GPU exist here; the multi-process path runs for real on the
CPU through paddle.distributed.launch over gloo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.errors import ConfigError

KIT = Path(__file__).resolve().parent.parent
SCRIPT = KIT / "scripts" / "train_line.sh"
FAST = {"batch_size": 4, "warmup_steps": 2, "multiscale": False, "visualdl": False,
        "eval_interval": 1}  # early stopping below counts one evaluation per epoch


def _tensors(path):
    from detect.heavy import paddle_stack

    return {k: v.numpy() for k, v in paddle_stack().paddle.load(str(path)).items()}


@pytest.mark.timeout(150)
def test_early_stopping_ends_a_plateau_and_keeps_the_best_epochs_weights(tiny_spec, tmp_path):
    from detect.checkpoints import list_checkpoints, read_pointer
    from detect.train import train

    spec = tiny_spec.with_cli({"train": {**FAST, "epochs": 12, "lr": 0.002, "patience": 2, "visualdl": True}})
    result = train(spec, tmp_path / "es", quiet=True)
    metrics, run = result.metrics, result.run
    history = [json.loads(line) for line in run.history.read_text().splitlines()]
    maps = [h["map50_95"] for h in history]
    best_epoch = 1 + int(np.argmax(maps))  # first epoch with the highest mAP
    assert metrics["stop_reason"].startswith("early stop") and "for 2 evaluations" in metrics["stop_reason"]
    assert metrics["epochs_run"] == len(history) == best_epoch + 2 < 12
    assert metrics["best_epoch"] == best_epoch
    best = read_pointer(run.checkpoints, "best")
    assert best.epoch == best_epoch and best.state()["stop"] is None
    last = list_checkpoints(run.checkpoints)[-1]
    assert last.state()["stop"]["kind"] == "early_stop"
    kept = _tensors(run.best_weights)  # the evaluated (EMA) weights of the best epoch, not the last ones
    assert all(np.array_equal(kept[k], v) for k, v in _tensors(best.path / "ema.pdparams").items())
    assert any(not np.array_equal(kept[k], v) for k, v in _tensors(last.path / "ema.pdparams").items())
    # VisualDL (ppdet's VisualDLWriter) logged the run, and the curve PNG exists either way
    assert list((run.root / "vdl").glob("vdlrecords.*.log")) and run.curves_png.stat().st_size > 10_000


@pytest.mark.timeout(60)
def test_augment_preview_writes_a_grid_of_what_the_model_sees(tiny_spec, tmp_path):
    import cv2

    from detect.augment_preview import augment_preview, preview_samples

    over = tiny_spec.with_cli({"train": {"mosaic": 1.0, "mixup": 0.5, "close_mosaic": 1, "epochs": 3,
                                         "multiscale": True}})
    png = augment_preview(over, tmp_path / "grid.png", n=6)
    image = cv2.imread(str(png))
    assert image is not None and image.shape[0] > 256 and image.shape[1] >= 512
    a = preview_samples(over, 4)
    b = preview_samples(over, 4)  # same seeds, same samples as the training loader draws
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    assert {x[0].shape[0] for x in a} <= {tiny_spec.image_size + d for d in (-64, -32, 0, 32, 64)}
    assert all(len(boxes) == len(labels) and (boxes[:, 2:] - boxes[:, :2] >= 2).all() for _, boxes, labels in a)
    plain = preview_samples(tiny_spec.with_cli({"train": {"hsv": [0, 0, 0], "flip": 0.0, "multiscale": False}}), 2)
    assert all(img.shape[:2] == (tiny_spec.image_size, tiny_spec.image_size) and img.mean() > 20 for img, _, _ in plain)
    last = preview_samples(over, 2, epoch=2)  # the close_mosaic epoch: plain samples again
    assert not any(np.array_equal(x[0], y[0]) for x, y in zip(a, last))
    with pytest.raises(ConfigError, match="not an epoch of this run"):
        augment_preview(over, tmp_path / "x.png", epoch=3)


@pytest.mark.parametrize("overrides, message", [
    ({"mixup": 0.3}, "mixup needs train.mosaic > 0"),
    ({"mosaic": 0.5, "close_mosaic": -1}, "close_mosaic must be >= 0"),
    ({"flip": 1.5}, r"probability in \[0, 1\]"),
    ({"hsv": [0.1, 0.2]}, "three non-negative gains"),
    ({"keep_last": 0}, "keep_last must be at least 1"),
    ({"freezee": "stem"}, "Did you mean 'freeze'"),
])
def test_bad_training_settings_are_refused_before_training(tiny_spec, tmp_path, overrides, message):
    from detect.train import train

    with pytest.raises(ConfigError, match=message):  # refused where the command line is put on the spec
        train(tiny_spec.with_cli({"train": overrides}), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_pretrained_from_another_class_count_skips_the_head_and_says_so(tiny_spec, tiny_run, tmp_path):
    from dataclasses import replace

    from detect.ppyoloe import RunPaths, activate, build_config
    from detect.session import load_pretrained

    three = replace(tiny_spec, classes=tiny_spec.classes[:3])
    activate(build_config(three, RunPaths(tmp_path)))
    from ppdet.core.workspace import create

    skipped = load_pretrained(create("YOLOv3"), str(tiny_run.best_weights))
    assert skipped and all(k.startswith("yolo_head.pred_cls") for k in skipped)
    with pytest.raises(ConfigError, match="do not exist"):
        load_pretrained(create("YOLOv3"), str(tmp_path / "nothing.pdparams"))


def test_64_px_lines_train_the_static_assigner_fits_the_coarsest_level(tiny_spec):
    from dataclasses import replace

    from detect.ppyoloe import RunPaths, build_config

    spec = replace(tiny_spec, image_size=64)
    cfg = build_config(spec, RunPaths(Path("x")))
    assert cfg["PPYOLOEHead"]["static_assigner"]["topk"] == 4  # 2 x 2 cells at stride 32


def _dry(*args, cwd):
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=30, env={**os.environ, "DEFECTKIT_PY": sys.executable})
    return out


def test_train_line_script_builds_docker_and_host_commands(tiny_spec, tmp_path):
    spec = str(tiny_spec.source)
    data_root = str(tiny_spec.paths.root)
    out = _dry(spec, "--runs", str(tmp_path / "runs"), "--name", "r1", "--epochs", "5", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cmd = out.stdout.strip()
    assert cmd.startswith("docker run --rm --gpus all ")
    assert f"-v {tmp_path}/runs:{tmp_path}/runs " in cmd and f"-v {data_root}:{data_root}:ro" in cmd
    assert f"-w {tmp_path} --entrypoint python3 defectkit-gpu:latest /opt/defectkit/defectkit/__main__.py train {spec}" in cmd
    assert cmd.endswith(f"--runs {tmp_path}/runs --name r1 --epochs 5")
    out = _dry(spec, "--gpus", "2", "--build", "--image", "my/img:1", "--", "--resume", "runs/x/r1", cwd=tmp_path)
    first, second = (line.strip() for line in out.stdout.strip().splitlines())
    assert first.startswith("docker build -f ") and first.endswith(f"-t my/img:1 {KIT}")
    assert '--gpus \\"device=0\\,1\\"' in second
    assert "-m paddle.distributed.launch --gpus 0\\,1 --log_dir" in second and second.endswith("--resume runs/x/r1")
    out = _dry(spec, "--no-docker", "--gpus", "4", cwd=tmp_path)
    assert out.stdout.startswith(f"{sys.executable} -m paddle.distributed.launch --gpus 0\\,1\\,2\\,3 ")
    assert f"{KIT}/defectkit/__main__.py train {spec}" in out.stdout
    bad = _dry(spec, "--gpus", "two", cwd=tmp_path)
    assert bad.returncode == 2 and "--gpus takes a number" in bad.stderr
    missing = _dry(str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


@pytest.mark.timeout(180)
def test_two_training_processes_through_paddle_distributed_launch_on_cpu(tiny_spec, tmp_path):
    """The multi-GPU entry (paddle.distributed.launch) for real, with two CPU processes over gloo: the
    ranks share the batches, rank 0 evaluates and writes, and its early-stop decision ends both."""
    out = subprocess.run(
        ["bash", str(SCRIPT), str(tiny_spec.source), "--no-docker", "--cpu-procs", "2", "--runs", str(tmp_path),
         "--name", "d2", "--epochs", "4", "--batch-size", "2", "--set", "multiscale=False", "--set", "lr=0.0",
         "--set", "patience=1", "--set", "visualdl=False", "--set", "eval_interval=1"],  # one evaluation per epoch
        cwd=tmp_path, capture_output=True, text=True, timeout=170, env={**os.environ, "DEFECTKIT_PY": sys.executable})
    logs = tmp_path / "launch-logs"
    assert out.returncode == 0, (out.stdout[-1500:], [p.read_text()[-1500:] for p in logs.glob("workerlog.*")])
    run = tmp_path / tiny_spec.line / "d2"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["epochs_run"] == 2 and metrics["stop_reason"].startswith("early stop")
    assert "stopped by rank 0" in (logs / "workerlog.1").read_text()
    state = json.loads(next((run / "checkpoints").glob("*-e0002/state.json")).read_text())
    n_train = len(json.loads(tiny_spec.paths.train.read_text())["images"])
    assert state["steps_per_epoch"] == n_train // 2 // 2  # batch 2, two ranks: each takes half the batches


def test_docker_pins_come_from_pyproject_without_the_cpu_paddle():
    sys.path.insert(0, str(KIT / "docker"))
    try:
        from pins import pins
    finally:
        sys.path.pop(0)
    reqs = pins(str(KIT / "pyproject.toml"), ["train", "vdl"])
    assert not any(r.startswith("paddlepaddle") for r in reqs)
    assert "paddle2onnx==1.3.1" in reqs and "numpy>=1.21,<1.24" in reqs and "visualdl==2.5.3" in reqs
    dockerfile = (KIT / "docker" / "Dockerfile.gpu").read_text()
    assert "FROM ${PADDLE_IMAGE}" in dockerfile and "paddlepaddle/paddle:2.6.2-gpu" in dockerfile
    assert "--no-deps -r requirements/nodeps.txt" in dockerfile


@pytest.mark.timeout(120)
def test_batches_of_only_defect_free_images_train(tmp_path):
    """Good parts dominate real lines: a batch without any box must not crash PP-YOLOE's assigner."""
    from detect.data.synth import generate_line
    from detect.train import train

    spec = generate_line(tmp_path / "ok", line="mostly-ok", count=10, size=(96, 96), seed=5,
                         defect_free_fraction=0.8, val_fraction=0.2, progress=False)
    result = train(spec.with_cli({"train": {**FAST, "epochs": 1, "batch_size": 2, "lr": 0.01}}), tmp_path / "run",
                   quiet=True)
    assert result.metrics["epochs_run"] == 1
