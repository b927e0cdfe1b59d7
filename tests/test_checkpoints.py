"""Checkpoint storage: atomic directories with a sha256 manifest, pointers, corruption fallback, retention
(unit level on small tensors), and retention after a real 10-epoch run (keep_last 3: best + last 3)."""
from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from detect import checkpoints as ck
from detect.settings import TrainSettings
from edge_runtime.errors import ConfigError


def _paddle():
    from detect.heavy import paddle_stack

    return paddle_stack().paddle


def _write(root, epoch, value=0.0, created=None):
    paddle = _paddle()
    ckpt = ck.write_checkpoint(root, ck.checkpoint_name("line", "run", epoch),
                               {"model.pdparams": {"w": paddle.full([64, 64], value)}, "optimizer.pdopt": {"lr": 1}},
                               {"epoch": epoch})
    if created is not None:  # backdate for the weekly rule
        manifest = json.loads((ckpt.path / ck.MANIFEST).read_text())
        manifest["created"] = created.isoformat(timespec="seconds")
        (ckpt.path / ck.MANIFEST).write_text(json.dumps(manifest))
    return ckpt


def test_checkpoint_is_a_complete_directory_with_a_manifest(tmp_path):
    ckpt = _write(tmp_path, 3, 1.5)
    assert ckpt.name == "line-run-e0003" and ckpt.epoch == 3
    assert sorted(p.name for p in ckpt.path.iterdir()) == ["manifest.json", "model.pdparams", "optimizer.pdopt",
                                                           "state.json"]
    manifest = json.loads((ckpt.path / "manifest.json").read_text())
    assert manifest["format"] == ck.FORMAT and set(manifest["files"]) == {"model.pdparams", "optimizer.pdopt",
                                                                          "state.json"}
    assert ck.verify(ckpt) == [] and ckpt.state()["epoch"] == 3
    assert float(ckpt.tensors("model.pdparams")["w"].numpy().mean()) == 1.5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_corrupt_latest_is_detected_and_resume_falls_back_with_a_warning(tmp_path, damage):
    _write(tmp_path, 1)
    second = _write(tmp_path, 2)
    target = second.path / ("manifest.json" if damage == "manifest" else "model.pdparams")
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "delete":
        target.unlink()
    else:
        target.write_text("{not json")
    assert ck.verify(second)
    with pytest.warns(ck.CheckpointWarning, match="line-run-e0002.*falling back"):
        assert ck.find_resumable(tmp_path).epoch == 1


def test_no_sound_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        ck.find_resumable(tmp_path)
    only = _write(tmp_path, 1)
    (only.path / "state.json").write_text("{}")
    with pytest.warns(ck.CheckpointWarning), pytest.raises(ConfigError, match="all corrupt"):
        ck.find_resumable(tmp_path)


def test_killed_writer_leaves_only_a_hidden_temporary_that_is_ignored_and_cleaned(tmp_path):
    _write(tmp_path, 1)
    half = tmp_path / ".tmp-line-run-e0002-999"
    half.mkdir()
    (half / "model.pdparams").write_bytes(b"\0" * 10)
    assert [c.epoch for c in ck.list_checkpoints(tmp_path)] == [1]
    assert ck.clean_temporary(tmp_path) == [half] and not half.exists()


def test_pointers_are_small_json_files_and_tolerate_missing_targets(tmp_path):
    first = _write(tmp_path, 1)
    ck.write_pointer(tmp_path, "latest", first)
    ck.write_pointer(tmp_path, "best", first, map50_95=0.25)
    assert ck.read_pointer(tmp_path, "latest") == first
    assert json.loads((tmp_path / "best.json").read_text()) == {"checkpoint": first.name, "epoch": 1, "map50_95": 0.25}
    (tmp_path / "latest.json").write_text("garbage")
    assert ck.read_pointer(tmp_path, "latest") is None


def test_retention_keeps_last_n_best_and_newest_of_each_week(tmp_path):
    now = datetime.now(timezone.utc)
    for epoch in range(1, 11):
        _write(tmp_path, epoch, created=now - timedelta(weeks=3) if epoch <= 2 else now)
    ck.write_pointer(tmp_path, "best", ck.list_checkpoints(tmp_path)[4])  # epoch 5
    deleted = ck.apply_retention(tmp_path, ck.Retention(keep_last=3, keep_best=True, keep_weekly=True))
    assert [c.epoch for c in ck.list_checkpoints(tmp_path)] == [2, 5, 8, 9, 10]  # 2 = newest of its week
    assert len(deleted) == 5
    ck.apply_retention(tmp_path, ck.Retention(keep_last=2, keep_best=False, keep_weekly=False))
    assert [c.epoch for c in ck.list_checkpoints(tmp_path)] == [9, 10]


def test_retention_never_deletes_the_only_loadable_checkpoint(tmp_path):
    for epoch in (1, 2, 3):
        _write(tmp_path, epoch)
    for ckpt in ck.list_checkpoints(tmp_path)[1:]:  # the kept ones are corrupt
        (ckpt.path / "model.pdparams").write_bytes(b"broken")
    with pytest.warns(ck.CheckpointWarning, match="deletes nothing"):
        assert ck.apply_retention(tmp_path, ck.Retention(keep_last=2, keep_best=False, keep_weekly=False)) == []
    assert [c.epoch for c in ck.list_checkpoints(tmp_path)] == [1, 2, 3]


def test_keep_last_below_one_is_refused():
    with pytest.raises(ConfigError, match="keep_last must be at least 1"):
        ck.Retention.from_settings(TrainSettings(keep_last=0))  # the table allows it; the policy does not


@pytest.mark.timeout(150)
def test_ten_epochs_with_keep_last_3_leave_best_and_last_three(tiny_spec, tmp_path):
    from detect.train import train

    spec = tiny_spec.with_cli({"train": {"epochs": 10, "batch_size": 4, "warmup_steps": 2, "lr": 0.01,
                                         "multiscale": False, "keep_last": 3, "eval_interval": 1, "visualdl": False}})
    result = train(spec, tmp_path / "r10", quiet=True)
    root = result.run.checkpoints
    best = ck.read_pointer(root, "best")
    metrics = json.loads(result.run.metrics.read_text())
    assert best.epoch == metrics["best_epoch"]
    names = sorted(os.listdir(root))
    expected = {ck.checkpoint_name(tiny_spec.line, "r10", e) for e in (8, 9, 10, best.epoch)}
    assert names == sorted(expected | {"best.json", "latest.json"})
    assert ck.read_pointer(root, "latest").epoch == 10
    for ckpt in ck.list_checkpoints(root):  # every one on disk loads and verifies
        assert ck.verify(ckpt) == []
        assert np.isfinite(ckpt.tensors("model.pdparams")["yolo_head.pred_cls.2.bias"].numpy()).all()
