"""Retrain: the parent as a teacher inside ppdet's step, EWC, the epochs policy, lineage (data version, parent chain).

Real paddle/ppdet on the kit's tiny base detector: a five-class parent (the base cut to five classes) on a synthetic
line, a retrain that adds the sixth class (2 epochs, 320 px). The distillation and EWC terms are checked through the
session hook itself (:func:`detect.session.build_session` on a copy of the retrained run): zero where the student is
the teacher, positive once it drifts, gradients only into the student.
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
TRAIN = {"batch_size": 4, "multiscale": False, "warmup_steps": 4, "visualdl": False}


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    from detect.data.synth import generate_line
    from detect.head_surgery import first_classes_model
    from detect.ppyoloe import RunPaths
    from detect.run_settings import write_run_settings

    tmp = tmp_path_factory.mktemp("teacher")
    spec = generate_line(tmp / "old", line="pcb-t", count=32, seed=21, val_fraction=0.25, progress=False,
                         classes=tuple(OLD)).with_cli({"train": {"lr": 0.003, "batch_size": 4}})
    run = RunPaths(tmp / "runs" / "pcb-t" / "parent")
    first_classes_model(ROOT / "base_weights" / "pcb-base-tiny-320.pdparams", 5, run.best_weights)
    write_run_settings(run.root, spec)
    run.metrics.write_text(json.dumps({"classes": OLD}))
    return run


@pytest.fixture(scope="module")
def new_data(parent):
    from detect.data.synth import generate_line

    root = parent.root.parents[2] / "new"
    generate_line(root, line="pcb-t", count=16, seed=33, val_fraction=0.25, progress=False)
    return root


@pytest.fixture(scope="module")
def six(parent):
    from dataclasses import replace

    from detect.linespec import LineSpec
    from detect.run_settings import load_run_spec

    spec = replace(load_run_spec(parent.root), classes=list(DEFECT_CLASSES))
    return LineSpec.load(spec.save(parent.root.parents[2] / "pcb-t-v2.yaml"))


@pytest.fixture(scope="module")
def retrained(parent, new_data, six):
    from detect.retrain import retrain

    return retrain(parent.root, [new_data], six, parent.root.parent / "rt", {"retrain": {"epochs": 2}, "train": TRAIN},
                   quiet=True)


def _session(retrained, tmp_path, cli=None, record_update=None):
    """A training session built by the kit on a copy of the retrained run (the hook reads its retrain.json)."""
    from detect.ppyoloe import RunPaths
    from detect.run_settings import load_run_spec
    from detect.session import build_session

    run = tmp_path / "copy"
    shutil.copytree(retrained.run.root, run, ignore=shutil.ignore_patterns("checkpoints", "eval", "vdl"))
    for name in ("metrics.json", "history.jsonl"):
        (run / name).unlink(missing_ok=True)
    if record_update:
        record = json.loads((run / "retrain.json").read_text())
        record.update(record_update)
        (run / "retrain.json").write_text(json.dumps(record))
    spec = load_run_spec(retrained.run.root).with_cli(cli)
    return build_session(spec, RunPaths(run))


def _bn_eval(model):
    from detect.heavy import paddle_stack

    paddle = paddle_stack().paddle
    for m in model.sublayers():
        if isinstance(m, paddle.nn.layer.norm._BatchNormBase):
            m.eval()


def _batch(session):
    data = next(iter(session.loader.loader(0)))
    data["epoch_id"] = 0
    return data


def test_distillation_losses_are_zero_for_equal_outputs_and_grow_with_the_difference():
    from detect.distill import dfl_kd, score_kd
    from detect.heavy import paddle_stack

    paddle = paddle_stack().paddle
    rng = np.random.default_rng(0)
    t_scores = paddle.to_tensor(rng.uniform(0.001, 0.999, (2, 50, 6)).astype("float32"))
    t_dist = paddle.to_tensor(rng.normal(0, 2, (2, 50, 4 * 17)).astype("float32"))
    assert float(score_kd(t_scores, t_scores, 5, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(dfl_kd(t_dist, t_dist, t_scores, 5, 2.0)) == pytest.approx(0.0, abs=1e-6)
    s = paddle.to_tensor(t_scores.numpy() * 0.5)
    s.stop_gradient = False
    near = paddle.to_tensor(t_scores.numpy() * 0.9)
    assert float(score_kd(s, t_scores, 5, 2.0)) > float(score_kd(near, t_scores, 5, 2.0)) > 0
    # the appended class (column 6) is not the teacher's: changing it costs nothing
    only_new = t_scores.numpy().copy()
    only_new[:, :, 5] = 0.5
    assert float(score_kd(paddle.to_tensor(only_new), t_scores, 5, 2.0)) == pytest.approx(0.0, abs=1e-6)
    d = paddle.to_tensor(t_dist.numpy() + rng.normal(0, 1, t_dist.shape).astype("float32"))
    d.stop_gradient = False
    assert float(dfl_kd(d, t_dist, t_scores, 5, 2.0)) > 0.01
    loss = score_kd(s, t_scores, 5, 2.0) + dfl_kd(d, t_dist, t_scores, 5, 2.0)
    loss.backward()
    assert s.grad is not None and float(paddle.abs(s.grad[:, :, :5]).sum()) > 0
    assert float(paddle.abs(s.grad[:, :, 5]).sum()) == 0.0  # no pull on the new class
    assert d.grad is not None and t_scores.grad is None and t_dist.grad is None


@pytest.mark.timeout(300)
def test_teacher_in_the_training_step_is_zero_for_the_parent_and_trains_only_the_student(retrained, tmp_path):
    from detect.heavy import paddle_stack

    paddle = paddle_stack().paddle
    session = _session(retrained, tmp_path)
    terms = session.trainer.retrain_terms
    assert terms is not None and terms.n_old == 5 and terms.shared_backbone  # backbone frozen: features reused
    assert terms.distill == 1.0 and terms.distill_dfl == 0.5 and terms.temperature == 2.0  # retrain defaults
    model, teacher = session.trainer.model, terms.teacher
    student_ids = {id(p) for p in model.parameters()}
    assert not any(id(p) in student_ids for p in teacher.parameters())  # a separate model ...
    assert not any(k.startswith(("teacher", "retrain")) for k in model.state_dict())  # ... outside the student's tree
    data = _batch(session)
    model.train()  # as ppdet trains it: the frozen backbone computes exactly the teacher's features (so they are shared)
    with paddle.no_grad():
        own = teacher.backbone({"image": data["image"]})
        shared = model.backbone({"image": data["image"]})
    assert all(np.allclose(a.numpy(), b.numpy(), atol=1e-5) for a, b in zip(own, shared))
    _bn_eval(model)  # the student as it was loaded: the parent's weights, running statistics
    out = model(data)
    assert float(out["loss_distill_cls"]) == pytest.approx(0.0, abs=1e-5)
    assert float(out["loss_distill_dfl"]) == pytest.approx(0.0, abs=1e-5)
    base = 1.0 * out["loss_cls"] + 2.5 * out["loss_iou"] + 0.5 * out["loss_dfl"]
    assert float(out["loss"]) == pytest.approx(float(base + out["loss_distill_cls"] + out["loss_distill_dfl"]), rel=1e-5)
    # the student drifts on the old classes' scores and its boxes: the teacher pulls back, only on the student
    rng = np.random.default_rng(1)
    for layer in list(model.yolo_head.pred_cls) + list(model.yolo_head.pred_reg):
        w = layer.weight.numpy()
        layer.weight.set_value((w + rng.normal(0, 0.05, w.shape)).astype("float32"))
    teacher_before = {k: v.numpy().copy() for k, v in teacher.state_dict().items()}
    data = _batch(session)
    out = model(data)
    assert float(out["loss_distill_cls"]) > 1e-3 and float(out["loss_distill_dfl"]) > 1e-3
    (out["loss_distill_cls"] + out["loss_distill_dfl"]).backward()
    grads = [p.grad for p in model.yolo_head.pred_cls.parameters()]
    assert all(g is not None for g in grads) and sum(float(paddle.abs(g).sum()) for g in grads) > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.stop_gradient for p in teacher.parameters())
    assert all(np.array_equal(v.numpy(), teacher_before[k]) for k, v in teacher.state_dict().items())


def test_a_retrain_run_trains_with_the_teacher_and_records_it(retrained):
    record = json.loads((retrained.run.root / "retrain.json").read_text())
    assert record["teacher"]["old_classes"] == 5 and Path(record["teacher"]["weights"]).is_file()
    assert record["teacher"]["distill"] == 1.0
    # EWC is on by default (retrain.ewc 10): the parent's Fisher was computed into the parent's run, once
    assert record["ewc"]["weight"] == 10.0 and Path(record["ewc"]["fisher"]).is_file()
    assert "computed" in record["ewc"]["note"]
    log = (retrained.run.root / "train.log").read_text()
    assert "loss_distill_cls" in log and "loss_distill_dfl" in log  # ppdet's own step logged the teacher's terms
    assert "loss_ewc" in log


def test_a_teacher_whose_classes_are_not_the_first_of_the_run_is_refused(retrained, tmp_path):
    record = json.loads((retrained.run.root / "retrain.json").read_text())
    swapped = [OLD[1], OLD[0]] + OLD[2:]  # the parent's class list no longer a prefix of the run's
    with pytest.raises(ConfigError, match=r"teacher's classes \['mouse_bite', 'missing_hole'.*are not the first "
                                          r"classes of the run's.*defectkit retrain --from"):
        _session(retrained, tmp_path, record_update={"parent": {**record["parent"], "classes": swapped}})


def test_distillation_and_ewc_off_install_nothing(retrained, tmp_path):
    session = _session(retrained, tmp_path, {"retrain": {"distill": 0.0, "distill_dfl": 0.0, "ewc": 0.0}})
    assert getattr(session.trainer, "retrain_terms", None) is None
    out = session.trainer.model(_batch(session))
    assert not any(k.startswith("loss_distill") for k in out)


@pytest.mark.timeout(300)
def test_ewc_fisher_is_computed_once_in_the_parent_run_and_penalises_drift(parent, retrained, tmp_path, capsys,
                                                                            monkeypatch):
    import detect.mkl
    from detect.ewc import ensure_fisher, fisher_files
    from detect.heavy import paddle_stack
    from detect.retrain_data import load_parent

    paddle = paddle_stack().paddle
    p = load_parent(parent.root)
    path, meta = fisher_files(parent.root)
    path.unlink(missing_ok=True)
    switched = []  # the retrain computes the Fisher before its session: MKL's kernel switch must come first
    real_switch = detect.mkl.prefer_mkl_avx2
    monkeypatch.setattr(detect.mkl, "prefer_mkl_avx2", lambda on=True: switched.append(on) or real_switch(on))
    got, note = ensure_fisher(p, 2)
    assert got == path and path.is_file() and "computed" in note and "computing it" in capsys.readouterr().out
    assert switched == [p.spec.settings.train.mkl_avx2_on_amd]
    assert json.loads(meta.read_text())["freeze"] == "none"  # the default: every tensor
    frozen, _ = ensure_fisher(p, 2, freeze="backbone")  # what the retrain freezes needs no Fisher: recomputed
    assert not any(k.startswith("backbone.") for k in paddle.load(str(frozen)))
    path.unlink()
    got, note = ensure_fisher(p, 2)
    mtime = path.stat().st_mtime_ns
    again, note = ensure_fisher(p, 2)
    assert "reused" in note and path.stat().st_mtime_ns == mtime  # once per parent
    fisher = paddle.load(str(path))
    values = np.concatenate([v.numpy().ravel() for v in fisher.values()])
    assert (values >= 0).all() and values.max() > 0
    assert np.mean([v.numpy().mean() for v in fisher.values()]) == pytest.approx(1.0, rel=1e-3)  # normalised
    assert list(fisher["yolo_head.pred_cls.0.weight"].shape)[0] == 5  # the parent's own head
    session = _session(retrained, tmp_path, {"retrain": {"ewc": 10.0, "distill": 0.0, "distill_dfl": 0.0}},
                       {"ewc": {"fisher": str(path), "weight": 10.0}})
    model = session.trainer.model
    _bn_eval(model)
    out = model(_batch(session))
    assert float(out["loss_ewc"]) == pytest.approx(0.0, abs=1e-9)  # the student starts at the parent
    head = model.yolo_head.pred_cls[0]
    w = head.weight.numpy()
    w[:5] += 0.01
    head.weight.set_value(w)
    out = model(_batch(session))
    assert float(out["loss_ewc"]) > 0
    out["loss_ewc"].backward()
    g = head.weight.grad.numpy()
    assert np.abs(g[:5]).sum() > 0 and np.abs(g[5:]).sum() == 0  # the new class row is free
    # asked for EWC but the record names no Fisher file: refused with the fix
    with pytest.raises(ConfigError, match="names no Fisher file"):
        _session(retrained, tmp_path / "b", {"retrain": {"ewc": 10.0}}, {"ewc": None})


def test_epochs_follow_the_new_datas_share_and_are_recorded(parent, new_data, retrained):
    from detect.retrain import epochs_for_share, retrain_policy
    from detect.retrain_data import load_parent
    from detect.run_settings import load_run_spec

    assert [epochs_for_share(s)[0] for s in (0.0, 0.05, 0.0999, 0.10, 0.2, 0.2999, 0.30, 0.45, 0.5, 0.9)] == \
        [3, 3, 3, 5, 5, 5, 8, 8, 10, 10]
    assert "under 10%" in epochs_for_share(0.05)[1] and "10%-30%" in epochs_for_share(0.2)[1]
    p = load_parent(parent.root)
    spec = load_run_spec(parent.root)
    auto = retrain_policy(spec, p, 5, 100)
    assert auto["epochs"] == 3 and "5.0%" in auto["why"] and auto["new_share"] == 0.05
    assert auto["lr"] == pytest.approx(0.003 * 0.2) and auto["patience"] == 2
    # warmup: at most one epoch of the retrain (the parent's 30 steps would cover a short retrain whole)
    assert spec.settings.train.warmup_steps == 30 and auto["warmup_steps"] == 30  # steps per epoch unknown
    assert retrain_policy(spec, p, 5, 100, None, 7)["warmup_steps"] == 7
    assert retrain_policy(spec, p, 5, 100, {"train": {"warmup_steps": 20}}, 7)["warmup_steps"] == 30  # given
    assert retrain_policy(spec, p, 40, 100)["epochs"] == 8
    assert retrain_policy(spec.with_cli({"retrain": {"epochs": 7}}), p, 5, 100)["epochs"] == 7
    cli = {"train": {"epochs": 4, "lr": 0.001}}
    given = retrain_policy(spec.with_cli(cli), p, 5, 100, cli)
    assert given["epochs"] == 4 and given["lr"] == 0.001 and "given" in given["why"]
    record = json.loads((retrained.run.root / "retrain.json").read_text())
    pol = record["policy"]
    assert pol["epochs"] == 2 and pol["why"] == "given (retrain.epochs)"
    from detect.data.coco import load_coco

    n_new = len(load_coco(new_data / "annotations" / "train.json")["images"])
    n_old = len(load_coco(spec.paths.train)["images"])
    assert pol["new_images"] == n_new and pol["train_images"] == n_old + n_new
    assert pol["new_share"] == pytest.approx(n_new / (n_old + n_new), abs=1e-4)
    metrics = json.loads(retrained.run.metrics.read_text())
    assert metrics["epochs"] == 2
    from detect.run_settings import read_record

    assert read_record(retrained.run.root)["settings"]["train"]["patience"] == 2  # early stopping on the merged val


def test_lr_factor_outside_the_sane_range_is_refused():
    from detect.settings import RetrainSettings

    RetrainSettings(lr_factor=0.15).validate("x")
    for bad in (0.9, 0.01, 0.0):
        with pytest.raises(ConfigError, match=r"lr_factor must be in \[0.02, 0.5\]"):
            RetrainSettings(lr_factor=bad).validate("x")
    with pytest.raises(ConfigError, match="distill_temperature"):
        RetrainSettings(distill_temperature=0).validate("x")
    with pytest.raises(ConfigError, match="retrain.ewc is a loss weight"):
        RetrainSettings(ewc=-1).validate("x")


def test_lineage_records_content_hashes_sources_and_the_parent_chain(parent, new_data, retrained, capsys):
    from detect.checkpoints import file_sha256
    from detect.retrain_lineage import data_version

    record = json.loads((retrained.run.root / "retrain.json").read_text())
    lin = record["lineage"]
    data = retrained.run.root / "data"
    per_image = json.loads((data / "lineage.json").read_text())
    hashes = {im["file"]: im["sha256"] for im in per_image["images"]}
    for name, digest in list(hashes.items())[:5]:
        assert file_sha256(data / "images" / name) == digest
    assert lin["data_version"] == data_version(data / "train.json", data / "val.json", hashes)
    adds = [s for s in lin["sources"] if s["tag"].startswith("add1")]
    assert {s["annotations_sha256"] for s in adds} == {file_sha256(new_data / "annotations" / f"{n}.json")
                                                       for n in ("train", "val")}
    head = lin["parents"][0]
    assert head["run"] == str(parent.root.resolve()) and head["kind"] == "train"
    assert head["weights_sha256"] == file_sha256(parent.best_weights)
    from defectkit.cli import main

    assert main(["lineage", str(retrained.run.root)]) == 0
    out = capsys.readouterr().out
    assert lin["data_version"][:16] in out and str(parent.root.resolve()) in out and "first fine-tune" in out
    # a retrain of this retrain: its chain holds both, newest first
    from detect.retrain_data import load_parent
    from detect.retrain_lineage import _parent_entry

    entry, chain = _parent_entry(load_parent(retrained.run.root))
    assert entry["kind"] == "retrain" and entry["data_version"] == lin["data_version"]
    assert chain == lin["parents"]
    # the bundle manifest's recipe carries it
    from compress.bundle_from_run import retrain_recipe

    recipe = retrain_recipe(record)
    assert recipe["lineage"]["data_version"] == lin["data_version"]
    assert recipe["lineage"]["parents"][0]["weights_sha256"] == head["weights_sha256"]
    assert recipe["policy"]["epochs"] == 2
    json.dumps(recipe)  # plain JSON, inside the existing recipe dict


def test_reviews_duplicates_and_an_empty_increment(parent, new_data, tmp_path):
    from detect.data.coco import load_coco
    from detect.retrain_data import load_parent, merge_data

    p = load_parent(parent.root)
    hard = tmp_path / "hard"
    shutil.copytree(new_data, hard)
    coco = load_coco(hard / "annotations" / "train.json")
    coco["info"] = {"description": "defectkit hard examples", "reviewed": True, "reviewed_by": "a.ng",
                    "reviewed_at": "2026-11-20T10:00:00Z"}
    # one image of the parent's own training set, copied under another name: a duplicate by content
    old = load_coco(p.spec.paths.train)
    dup = old["images"][0]
    shutil.copyfile(p.spec.paths.images / dup["file_name"], hard / "images" / "copy-of-parent.png")
    coco["images"].append({**dup, "id": 9999, "file_name": "copy-of-parent.png"})
    (hard / "annotations" / "train.json").write_text(json.dumps(coco))
    merged = merge_data(p, [hard], list(DEFECT_CLASSES), tmp_path / "out", 1.0, 0)
    src = next(s for s in merged.sources if s["tag"] == "add1")
    assert src["review"] == {"description": "defectkit hard examples", "reviewed": True, "reviewed_by": "a.ng",
                             "reviewed_at": "2026-11-20T10:00:00Z"}
    assert src["duplicates"] == 1 and src["duplicates_of"] == {"parent": 1}
    train = load_coco(merged.train)
    assert len(train["images"]) == len(old["images"]) + len(coco["images"]) - 1  # not double-counted
    assert merged.new_share == (len(coco["images"]) - 1, len(train["images"]))
    empty = tmp_path / "empty"
    shutil.copytree(new_data, empty)
    e = load_coco(empty / "annotations" / "train.json")
    (empty / "annotations" / "train.json").write_text(json.dumps({**e, "images": [], "annotations": []}))
    with pytest.raises(DataError, match="empty increment"):
        merge_data(p, [empty], list(DEFECT_CLASSES), tmp_path / "out2", 1.0, 0)
