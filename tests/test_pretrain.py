"""`defectkit pretrain`: real corpus + real training, weights with a provenance record, usable as --pretrained."""
from __future__ import annotations

import json

import numpy as np

from detect.data.board import draw_board
from detect.pretrain import PretrainRecipe, pretrain
from edge_runtime.modelspec import file_sha256


def test_varied_style_changes_mask_colour_and_green_is_unchanged():
    greens = [draw_board(np.random.default_rng(i), 96, 96).palette["mask"] for i in range(4)]
    same = [draw_board(np.random.default_rng(i), 96, 96, "green").palette["mask"] for i in range(4)]
    assert all(np.array_equal(a, b) for a, b in zip(greens, same))  # default line output is unchanged
    varied = np.array([draw_board(np.random.default_rng(i), 96, 96, "varied").palette["mask"] for i in range(24)])
    assert varied.std(axis=0).max() > 40  # far more colour spread than green boards alone


def test_pretrain_writes_weights_with_provenance_and_they_load(tmp_path, tiny_spec):
    recipe = PretrainRecipe(name="base-test", count=10, seed=5, image_size=96, epochs=1, batch_size=4,
                            warmup_steps=1)
    weights = pretrain(recipe, tmp_path / "work", tmp_path / "out")
    record = json.loads(weights.with_suffix(".json").read_text())
    assert record["sha256"] == file_sha256(weights)
    assert record["recipe"]["seed"] == 5 and record["recipe"]["style"] == "varied"
    assert record["metrics"]["epochs_run"] == 1 and "map50" in record["metrics"]["val"]

    from detect.ppyoloe import build_config  # noqa: F401  (the heavy stack is loaded by pretrain already)
    from detect.train import train

    spec = tiny_spec.with_cli({"train": {"epochs": 1, "batch_size": 4, "multiscale": False, "warmup_steps": 1,
                                         "pretrained": str(weights)}})
    run = train(spec, tmp_path / "ft", quiet=True)
    assert run.metrics["skipped_pretrained_tensors"] == []  # same classes: nothing skipped


def test_pretrained_with_another_class_count_skips_the_head(tmp_path, tiny_run, foreign_spec_path):
    """6-class weights into a 3-class line: mismatched head tensors are skipped and listed."""
    from dataclasses import replace

    from detect.linespec import LineSpec
    from detect.train import train

    spec = replace(LineSpec.load(foreign_spec_path), image_size=96).with_cli({"train": {
        "epochs": 1, "batch_size": 2, "multiscale": False, "warmup_steps": 1, "pretrained": str(tiny_run.best_weights)}})
    result = train(spec, tmp_path / "ft3", quiet=True)
    skipped = result.metrics["skipped_pretrained_tensors"]
    assert skipped and all("pred_cls" in name for name in skipped)
