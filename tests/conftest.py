"""Shared fixtures: small real data sets and one small real training run that several stages reuse.

Training a real PP-YOLOE+ (tiny size, 96 px, a few steps) costs seconds; doing it once per session
keeps the suite fast while every stage downstream (eval, export, ONNX Runtime, compression) runs on
a genuine ppdet model rather than a stand-in.
"""
from __future__ import annotations

import zlib  # noqa: F401  -- before paddle anywhere in the test process (import-order segfault)
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def foreign_spec_path(tmp_path_factory) -> Path:
    """A COCO set the kit never generated: non-square, PNG+JPG, empty images, category ids 11.."""
    from detect.data.foreign import make_foreign_coco

    return make_foreign_coco(tmp_path_factory.mktemp("foreign") / "line")


@pytest.fixture(scope="session")
def tiny_spec(tmp_path_factory):
    """A small synthetic PCB line at 96 px for fast real training."""
    from detect.data.synth import generate_line

    from dataclasses import replace

    spec = generate_line(tmp_path_factory.mktemp("tinyline") / "pcb", line="pcb-tiny", count=16,
                         size=(128, 96), seed=3, val_fraction=0.25, progress=False)
    spec = replace(spec, image_size=96)
    spec.save(spec.source)
    return spec


TINY_TRAIN = {"epochs": 2, "batch_size": 4, "warmup_steps": 2, "lr": 0.005, "multiscale": False}


@pytest.fixture(scope="session")
def tiny_run(tiny_spec, tmp_path_factory):
    """A real 2-epoch training run (tiny PP-YOLOE+, 96 px) with best/last weights and metrics."""
    from detect.train import train

    return train(tiny_spec.with_cli({"train": TINY_TRAIN}), tmp_path_factory.mktemp("runs") / "tiny", quiet=True)


@pytest.fixture(scope="session")
def tiny_export(tiny_spec, tiny_run):
    """Paddle (NMS / no NMS) and ONNX exports of the tiny run, with deploy.json (the spec read from the run)."""
    from detect.export import export
    from detect.run_settings import load_run_spec

    return export(load_run_spec(tiny_run.run.root), tiny_run.best_weights, tiny_run.run.export_dir)


@pytest.fixture(scope="session")
def base_run(tmp_path_factory):
    """A run folder holding the kit's base detector (PP-YOLOE+ tiny, 320 px, trained on synthetic boards) for a
    small synthetic line: a model that really detects, without training in the test session.

    The 2-epoch ``tiny_run`` scores every box at the NMS floor, so accuracy-preserving checks (gates, golden
    images, INT8 vs FP32) need this one.
    """
    import json
    import shutil

    from detect.data.synth import generate_line
    from detect.ppyoloe import RunPaths
    from detect.run_settings import write_run_settings

    root = Path(__file__).resolve().parents[1]
    spec = generate_line(tmp_path_factory.mktemp("baseline") / "pcb", line="pcb-base", count=48, seed=21,
                         val_fraction=0.25, progress=False)
    run = RunPaths(tmp_path_factory.mktemp("baseruns") / "base")
    run.best_weights.parent.mkdir(parents=True)
    shutil.copyfile(root / "base_weights" / "pcb-base-tiny-320.pdparams", run.best_weights)
    write_run_settings(run.root, spec)  # what every later stage reads instead of the spec file
    run.metrics.write_text(json.dumps({"classes": list(spec.classes), "source": "base weights, not trained"}))
    return run


@pytest.fixture(scope="session")
def base_export(base_run):
    """FP32 exports (paddle, ONNX; NMS in the graph and on the host) of the base detector."""
    from detect.export import export
    from detect.run_settings import load_run_spec

    return export(load_run_spec(base_run.root), base_run.best_weights, base_run.export_dir)
