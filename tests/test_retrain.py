"""Incremental retrain: a new defect class joins a line's model, old classes judged on the parent's val set.

The parent is the kit's base detector restricted to five classes (its head rows for the sixth cut off), on a
five-class synthetic line: a model that really detects, without training a parent in the test session. The
new data holds all six classes. The retrain itself is real ppdet training (2 epochs, 320 px).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from detect.data.defects import DEFECT_CLASSES
from edge_runtime.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
OLD = list(DEFECT_CLASSES[:5])


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """runs/pcb-rt/parent: base weights cut to five classes, the five-class line's spec and metrics."""
    from detect.data.synth import generate_line
    from detect.head_surgery import first_classes_model
    from detect.ppyoloe import RunPaths
    from detect.run_settings import write_run_settings

    tmp = tmp_path_factory.mktemp("retrain")
    spec = generate_line(tmp / "old", line="pcb-rt", count=48, seed=21, val_fraction=0.25, progress=False,
                         classes=tuple(OLD)).with_cli({"train": {"lr": 0.003}})  # as `defectkit train --lr 0.003`
    run = RunPaths(tmp / "runs" / "pcb-rt" / "parent")
    first_classes_model(ROOT / "base_weights" / "pcb-base-tiny-320.pdparams", 5, run.best_weights)
    write_run_settings(run.root, spec)
    run.metrics.write_text(json.dumps({"classes": OLD, "source": "base weights cut to five classes"}))
    return run


@pytest.fixture(scope="module")
def new_data(parent):
    """24 new images of the line with all six classes labelled (spurious_copper is new)."""
    from detect.data.synth import generate_line

    generate_line(parent.root.parents[2] / "new", line="pcb-rt", count=24, seed=33, val_fraction=0.25, progress=False)
    return parent.root.parents[2] / "new"


@pytest.fixture(scope="module")
def six_class_spec(parent):
    from dataclasses import replace

    from detect.linespec import LineSpec
    from detect.run_settings import load_run_spec

    spec = replace(load_run_spec(parent.root), classes=list(DEFECT_CLASSES))
    return LineSpec.load(spec.save(parent.root.parents[2] / "pcb-rt-v2.yaml"))


@pytest.fixture(scope="module")
def retrained(parent, new_data, six_class_spec):
    from detect.retrain import retrain

    return retrain(parent.root, [new_data], six_class_spec, parent.root.parent / "rt1",
                   {"retrain": {"epochs": 2},
                    "train": {"batch_size": 4, "multiscale": False, "warmup_steps": 4, "visualdl": False}}, quiet=True)


def test_grow_class_rows_keeps_old_rows_and_initialises_new_ones_like_ppdet():
    from detect.head_surgery import grow_class_rows

    w = np.arange(5 * 2 * 3 * 3, dtype="float32").reshape(5, 2, 3, 3)
    b = np.arange(5, dtype="float32")
    out = grow_class_rows({"yolo_head.pred_cls.0.weight": w, "yolo_head.pred_cls.0.bias": b, "other": b}, 5, 7)
    assert out["yolo_head.pred_cls.0.weight"].shape == (7, 2, 3, 3)
    assert np.array_equal(out["yolo_head.pred_cls.0.weight"][:5], w)
    assert not out["yolo_head.pred_cls.0.weight"][5:].any()
    assert np.allclose(out["yolo_head.pred_cls.0.bias"][5:], -np.log(99.0))  # ppdet bias_init_with_prob(0.01)
    assert out["other"] is not None and out["other"].shape == (5,)
    with pytest.raises(ConfigError, match="cannot drop classes"):
        grow_class_rows({"yolo_head.pred_cls.0.bias": b}, 5, 4)
    with pytest.raises(ConfigError, match="has 5 class rows, the parent line has 6"):
        grow_class_rows({"yolo_head.pred_cls.0.bias": b}, 6, 7)


@pytest.mark.timeout(300)
def test_retrain_adds_a_class_from_the_parent_weights(parent, retrained):
    from detect.heavy import paddle_stack

    paddle = paddle_stack().paddle
    run = retrained.run
    init = paddle.load(str(run.root / "init.pdparams"))
    before = paddle.load(str(parent.best_weights))
    for i in range(3):
        key = f"yolo_head.pred_cls.{i}.weight"
        assert list(init[key].shape)[0] == 6
        assert np.array_equal(init[key].numpy()[:5], before[key].numpy())  # old rows copied, not re-initialised
    after = paddle.load(str(run.best_weights))
    assert list(after["yolo_head.pred_cls.0.bias"].shape) == [6]
    metrics = json.loads(run.metrics.read_text())
    assert metrics["classes"] == list(DEFECT_CLASSES) and metrics["freeze"] == "backbone"
    assert metrics["skipped_pretrained_tensors"] == []  # every tensor came from the grown parent weights
    from detect.run_settings import read_record

    record = read_record(run.root)  # the retrain's own settings.yaml
    # the parent's recorded train.lr (0.003, given on its command line) x retrain.lr_factor
    assert record["settings"]["train"]["lr"] == pytest.approx(0.003 * 0.2)
    assert record["ppdet"]["LearningRate"]["base_lr"] == pytest.approx(0.003 * 0.2)
    assert record["settings"]["train"]["epochs"] == 2 and record["settings"]["train"]["freeze"] == "backbone"
    assert record["overrides"]["retrain"] == {"epochs": 2} and record["classes"] == list(DEFECT_CLASSES)


def test_merged_data_replays_the_parent_and_keeps_the_class_order(parent, new_data, retrained):
    from detect.data.coco import class_names, load_coco
    from detect.run_settings import load_run_spec
    from detect.settings import RetrainSettings

    data = retrained.run.root / "data"
    train, val, val_old = (load_coco(data / f"{n}.json") for n in ("train", "val", "val_old"))
    parent_spec = load_run_spec(parent.root)
    old_train, old_val = load_coco(parent_spec.paths.train), load_coco(parent_spec.paths.val)
    new_train, new_val = load_coco(new_data / "annotations/train.json"), load_coco(new_data / "annotations/val.json")
    assert class_names(train) == class_names(val) == class_names(val_old) == list(DEFECT_CLASSES)
    replayed = [im for im in train["images"] if im["file_name"].startswith("parent-")]
    n_old = len(old_train["images"])
    share = RetrainSettings().replay  # the default
    assert 0 < share < 1 and round(share * n_old) <= len(replayed) <= round(share * n_old) + 5  # (+ a missed class)
    assert len(train["images"]) == len(replayed) + len(new_train["images"])
    assert len(val["images"]) == len(old_val["images"]) + len(new_val["images"])  # every val image: the gate's
    assert len(val_old["images"]) == len(old_val["images"])
    old_boxes = {im["file_name"]: sum(a["image_id"] == im["id"] for a in old_train["annotations"])
                 for im in old_train["images"]}
    assert len(train["annotations"]) == sum(old_boxes[im["file_name"].split("-", 1)[1]] for im in replayed) + \
        len(new_train["annotations"])
    replayed_ids = {im["id"] for im in replayed}
    cat = {c["id"]: c["name"] for c in train["categories"]}
    assert {cat[a["category_id"]] for a in train["annotations"] if a["image_id"] in replayed_ids} == set(OLD)
    for im in train["images"] + val["images"]:
        assert (data / "images" / im["file_name"]).is_file()
    # a parent box keeps its class name; spurious_copper boxes come only from the new data
    names = {c["id"]: c["name"] for c in train["categories"]}
    assert sum(names[a["category_id"]] == "spurious_copper" for a in train["annotations"]) == \
        sum(a["category_id"] == 6 for a in new_train["annotations"])
    spec = load_run_spec(retrained.run.root)
    assert spec.paths.train == (data / "train.json").resolve() and spec.classes == list(DEFECT_CLASSES)
    record = json.loads((retrained.run.root / "retrain.json").read_text())
    assert record["new_classes"] == ["spurious_copper"] and record["retrain"]["replay"] == RetrainSettings().replay
    assert [s["split"] for s in record["data"]] == ["train", "train", "val", "val"]


def test_forgetting_verdict_is_computed_from_both_models_on_the_parents_val_set(parent, retrained):
    from detect.infer import evaluate_weights
    from detect.run_settings import load_run_spec

    v = retrained.verdict
    record = json.loads((retrained.run.root / "retrain.json").read_text())
    assert record["status"] == ("passed" if v.passed else "refused")
    assert [c.name for c in v.classes] == OLD and list(v.new_classes) == ["spurious_copper"]
    parent_spec = load_run_spec(parent.root)
    parent_eval = evaluate_weights(parent_spec, parent.best_weights, parent_spec.paths.val,
                                   retrained.run.root / "eval" / "check")
    assert v.old_map_parent == pytest.approx(parent_eval.map50_95, abs=1e-4)
    assert v.old_map_parent > 0.5  # the base detector really detects the five old classes
    # the gate scores the retrained model from the merged val set's detections of the parent's images: the same
    # figures as running it over the parent's val set again
    again = evaluate_weights(load_run_spec(retrained.run.root), retrained.run.best_weights,
                             retrained.run.root / "data" / "val_old.json", retrained.run.root / "eval" / "check_old")
    assert v.old_map_retrained == pytest.approx(again.map50_95, abs=1e-4)
    for c in v.classes:
        assert c.retrained == pytest.approx(again.per_class[c.name], abs=1e-4), c.name
    for c in v.classes:
        assert c.drop_points == pytest.approx((c.parent - c.retrained) * 100, abs=0.02)
        assert (f"class '{c.name}'" in " ".join(v.reasons)) == (c.drop_points > v.max_class_drop)
    assert (v.drop_points > v.max_map_drop) == any("old classes mAP50-95 dropped" in r for r in v.reasons)
    assert v.passed == (not v.reasons)
    page = (retrained.run.root / "retrain.md").read_text()
    assert "spurious_copper" in page and all(n in page for n in OLD)
    assert (retrained.run.root / "retrain.png").stat().st_size > 10_000


def test_resume_after_a_death_during_the_gate_judges_without_training(retrained, monkeypatch):
    from detect.retrain import resume_retrain

    path = retrained.run.root / "retrain.json"
    record = json.loads(path.read_text())
    verdict = record.pop("forgetting")
    path.write_text(json.dumps({**record, "status": "training"}))
    mtime = retrained.run.best_weights.stat().st_mtime
    monkeypatch.chdir(retrained.run.root.parent)  # a relative run path, as typed on the command line
    again = resume_retrain(retrained.run.root.name, quiet=True)
    assert retrained.run.best_weights.stat().st_mtime == mtime  # no training happened
    assert again.verdict.old_map_retrained == pytest.approx(verdict["old_map_retrained"], abs=1e-4)
    assert json.loads(path.read_text())["status"] in ("passed", "refused")


def test_bundle_refuses_a_refused_or_unjudged_retrain(retrained, tmp_path):
    from compress.bundle_from_run import retrain_record

    run = tmp_path / "run"
    shutil.copytree(retrained.run.root, run, ignore=shutil.ignore_patterns("images", "checkpoints", "eval"))
    record = json.loads((run / "retrain.json").read_text())
    (run / "retrain.json").write_text(json.dumps({**record, "status": "refused",
                                                  "forgetting": {"reasons": ["class 'spur' AP50-95 dropped"]}}))
    with pytest.raises(ConfigError, match="forgot old classes.*class 'spur'"):
        retrain_record(run, allow_refused=False)
    assert retrain_record(run, allow_refused=True)["status"] == "refused"
    (run / "retrain.json").write_text(json.dumps({**record, "status": "training"}))
    with pytest.raises(ConfigError, match="not been judged.*retrain --resume"):
        retrain_record(run, allow_refused=True)
    (run / "retrain.json").write_text(json.dumps({**record, "status": "passed"}))
    assert retrain_record(run, allow_refused=False)["new_classes"] == ["spurious_copper"]


def _cli(*args: str) -> tuple[int, str]:
    import contextlib
    import io

    from defectkit.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["retrain", *args])
    return code, err.getvalue()


def test_bad_retrain_input_is_refused_with_the_fix(parent, new_data, tmp_path):
    from dataclasses import replace

    from detect.run_settings import load_run_spec

    spec = load_run_spec(parent.root)
    replace(spec, classes=["spurious_copper"] + OLD).save(tmp_path / "reordered.yaml")  # every old id would move
    code, err = _cli("--from", str(parent.root), "--add", str(new_data), "--spec", str(tmp_path / "reordered.yaml"))
    assert code == 2 and "must start with the parent model's classes" in err and "Append new defect classes" in err
    code, err = _cli("--from", str(parent.root), "--add", str(new_data))  # six-class data, five-class spec
    assert code == 2 and "new/annotations/train.json" in err and "'spurious_copper'" in err and "Add them at the end" in err
    code, err = _cli("--from", str(parent.root))
    assert code == 2 and "--add DATA_FOLDER" in err
    code, err = _cli("--from", str(parent.root), "--add", str(tmp_path / "nowhere"))
    assert code == 2 and "no such folder" in err
    replace(spec, line="other-line").save(tmp_path / "other.yaml")
    code, err = _cli("--from", str(parent.root), "--add", str(new_data), "--spec", str(tmp_path / "other.yaml"))
    assert code == 2 and "not the parent run's line 'pcb-rt'" in err
    unfinished = tmp_path / "unfinished"
    shutil.copytree(parent.root, unfinished)
    (unfinished / "metrics.json").unlink()
    code, err = _cli("--from", str(unfinished), "--add", str(new_data))
    assert code == 2 and "has not finished" in err
    code, err = _cli("--from", str(parent.root), "--add", str(new_data), "--set", "replay=1.5")
    assert code == 2 and "retrain.replay" in err
    assert not list((parent.root.parent).glob("retrain-*"))  # nothing half-made left behind by a refusal
