"""One source of settings from the line spec to the bundle: a line with its own per-class threshold and drift
window, trained through `defectkit train --lr 0.003`, bundled with `defectkit bundle RUN`. The verified manifest
carries exactly the line's runtime / drift / report sections, the drift reference was decided with that runtime
section, and the `--lr` given to train is in every downstream record (variant.json, the bundle's recipe).

The run starts from the kit's base detector (one epoch at 320 px on the 48-board base line), so its golden images
and drift reference come from a model that really detects.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from compress.bundle_from_run import bundle_from_run
from compress.keys import init_keys
from compress.pipeline import ensure_parent, golden_images, load_run
from compress.variants import load_variant
from defectkit.cli import main
from detect.run_settings import load_run_spec
from edge_runtime.bundle import verify_bundle

ROOT = Path(__file__).resolve().parents[1]
BASE_WEIGHTS = ROOT / "base_weights" / "pcb-base-tiny-320.pdparams"


@pytest.fixture(scope="module")
def line(base_run, tmp_path_factory):
    """(line spec file, the class with its own threshold): the base line's data, the line's own settings."""
    base = load_run_spec(base_run.root)
    special = base.classes[1]
    spec = replace(base, source=None).with_cli({
        "runtime": {"class_thresholds": {special: 0.35}},
        "drift": {"window": 120, "min_frames": 60},
        "train": {"pretrained": str(BASE_WEIGHTS), "epochs": 1, "batch_size": 4, "warmup_steps": 1,
                  "multiscale": False},
    })
    path = tmp_path_factory.mktemp("line") / "pcb-base.yaml"
    replace(spec, cli={}).save(path)  # the spec file states them; nothing else is on a command line
    return path, special


@pytest.fixture(scope="module")
def shipped(line, tmp_path_factory):
    """Trained through the CLI with --lr 0.003, FP32 parent measured, golden images chosen, bundled."""
    spec_file, _ = line
    runs = tmp_path_factory.mktemp("runs")
    assert main(["train", str(spec_file), "--lr", "0.003", "--runs", str(runs), "--name", "t"]) == 0
    run_dir = runs / "pcb-base" / "t"
    spec, run = load_run(run_dir)
    parent = ensure_parent(spec, run, threads=[], progress=False)
    golden_images(spec, run, parent, 4)
    keys = init_keys(tmp_path_factory.mktemp("keys"))
    out = bundle_from_run(run.root, ["fp32"], tmp_path_factory.mktemp("store"), keys.private, progress=False)
    return run, out, keys


def test_the_manifest_carries_the_line_settings_and_the_reference_agrees(line, shipped):
    _, special = line
    run, out, keys = shipped
    man = verify_bundle(out, keys.public)
    assert man.settings.runtime.class_thresholds == {special: 0.35}
    assert man.settings.drift.window == 120 and man.settings.drift.min_frames == 60
    assert man.settings.runtime.score_threshold == 0.5  # the table default where the line says nothing
    assert man.settings.to_dict() == load_run_spec(run.root).settings.box_sections()
    # the drift reference was decided with exactly the thresholds the box will decide with
    ref = json.loads((out / "drift_reference.json").read_text())
    assert ref["meta"]["runtime"] == man.settings.runtime.to_dict()
    # the golden images were chosen with them too (recorded beside the list)
    golden = json.loads((run.root / "compress" / "golden.json").read_text())
    assert golden["runtime"] == man.settings.runtime.to_dict() and len(man.golden) == len(golden["images"]) >= 2


def test_lr_given_to_train_appears_in_every_downstream_record(shipped):
    run, out, keys = shipped
    settings_yaml = run.root / "settings.yaml"
    sha = hashlib.sha256(settings_yaml.read_bytes()).hexdigest()
    spec = load_run_spec(run.root)
    assert spec.settings.train.lr == 0.003 and spec.cli == {"train": {"lr": 0.003}}
    parent = load_variant(run.root, "fp32")
    assert parent.settings["run_settings"] == {"file": str(settings_yaml.resolve()), "sha256": sha}
    assert parent.settings["overrides"] == {"train": {"lr": 0.003}}
    recipe = verify_bundle(out, keys.public).recipe
    assert recipe["settings"]["run_settings"]["sha256"] == sha
    assert recipe["settings"]["overrides"]["train"]["lr"] == 0.003
    # and a QAT of this run would train at the run's lr x compress.qat_lr_factor
    from compress.qat import qat_settings

    assert qat_settings(spec, BASE_WEIGHTS, 1, None, None).train.lr == pytest.approx(0.0003)


def test_low_level_build_takes_the_same_settings_from_the_run(line, shipped, tmp_path, capsys):
    run, out, keys = shipped
    code = main(["bundle", "build", "--out", str(tmp_path / "s"), "--version", "1.0.0",
                 "--deploy", str(run.export_dir), "--key", str(keys.private),
                 "--drift-reference", str(out / "drift_reference.json"), "--run", str(run.root)])
    assert code == 0, capsys.readouterr().err
    assert "note:" not in capsys.readouterr().out
    man = verify_bundle(tmp_path / "s" / "pcb-base" / "1.0.0", keys.public)
    assert man.settings == verify_bundle(out, keys.public).settings
    # a reference decided with other thresholds than the run's is refused
    other = tmp_path / "drift_default.json"
    ref = json.loads((out / "drift_reference.json").read_text())
    ref["meta"]["runtime"]["class_thresholds"] = {}
    other.write_text(json.dumps(ref))
    code = main(["bundle", "build", "--out", str(tmp_path / "s"), "--version", "1.0.1",
                 "--deploy", str(run.export_dir), "--key", str(keys.private),
                 "--drift-reference", str(other), "--run", str(run.root)])
    assert code == 2 and "was built with runtime settings" in capsys.readouterr().err
