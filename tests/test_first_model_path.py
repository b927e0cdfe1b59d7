"""One path from labels to a first model: `synth` / `data import` write a spec that starts from the kit's shipped base
(no spec edit before `train`), `train` refuses base weights of another model size before training, a user's own
train/val split imports in every format, and a refused import writes nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from detect.data.linefile import shipped_base
from detect.linespec import LineSpec

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "base_weights" / "pcb-base-tiny-320.pdparams"


def kit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The real CLI in its own process, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "defectkit", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def test_the_shipped_base_is_what_a_new_line_starts_from():
    base = shipped_base()
    assert base is not None and base.weights == BASE.resolve()
    assert (base.model_size, base.image_size) == ("tiny", 320)  # read from its provenance JSON


def test_synth_then_train_without_editing_the_spec_fine_tunes_the_base(tmp_path):
    out = kit("synth", "--out", "data/line", "--line", "line", "--count", "12", "--size", "128", "96",
              "--image-size", "96", "--seed", "5", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    spec_file = tmp_path / "data" / "line" / "line.yaml"
    raw = yaml.safe_load(spec_file.read_text())
    assert raw["model_size"] == "tiny" and raw["image_size"] == 96
    written = raw["train"]["pretrained"]
    assert not Path(written).is_absolute()  # relative to the spec file: folder and kit move together
    assert (spec_file.parent / written).resolve() == BASE.resolve()
    assert LineSpec.load(spec_file).settings.train.pretrained == str(BASE.resolve())

    run = kit("train", "data/line/line.yaml", "--name", "first", "--epochs", "1", "--batch-size", "4",
              "--set", "warmup_steps=1", "--set", "multiscale=False", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = json.loads((tmp_path / "runs" / "line" / "first" / "metrics.json").read_text())
    assert metrics["skipped_pretrained_tensors"] == []  # same model, same classes: every tensor of the base loaded
    settings = yaml.safe_load((tmp_path / "runs" / "line" / "first" / "settings.yaml").read_text())
    assert settings["settings"]["train"]["pretrained"] == str(BASE.resolve())


def test_base_weights_for_another_model_size_are_refused_before_training_with_the_fix(tmp_path):
    assert kit("synth", "--out", "line", "--line", "line", "--count", "8", "--size", "96", "96",
               "--model-size", "s", cwd=tmp_path).returncode == 0
    raw = yaml.safe_load((tmp_path / "line" / "line.yaml").read_text())
    assert raw["model_size"] == "s" and "pretrained" not in (raw.get("train") or {})  # the tiny base does not fit
    # the README's command with the shipped tiny base on an s spec
    out = kit("train", "line/line.yaml", "--name", "r", "--pretrained", str(BASE), cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    err = out.stderr
    assert "a tiny model (width 0.25), the spec says model_size s" in err, err
    assert "set model_size: tiny in" in err and "line.yaml" in err
    assert not (tmp_path / "runs").exists()  # refused before a run folder, a trainer or a step


def test_load_pretrained_refuses_more_than_the_class_head(tmp_path, tiny_spec):
    from dataclasses import replace

    import pytest

    from detect.ppyoloe import RunPaths, activate, build_config
    from detect.session import load_pretrained
    from edge_runtime.errors import ConfigError

    small = replace(tiny_spec, model_size="s")
    activate(build_config(small, RunPaths(tmp_path)))
    from ppdet.core.workspace import create

    with pytest.raises(ConfigError, match=r"tiny model \(width 0.25\), the spec says model_size s"):
        load_pretrained(create("YOLOv3"), str(BASE), small)
