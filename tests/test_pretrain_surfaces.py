"""`defectkit pretrain --corpus surfaces`: real corpus, real training, resumable, provenance with the corpus recipe."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from defectkit.cli import build_parser
from detect.data.surfaces_defects import SURFACE_CLASSES
from detect.pretrain import RECIPES, PretrainRecipe, pretrain, publish, recipe_from_args
from edge_runtime.errors import ConfigError, UserInputError
from edge_runtime.modelspec import file_sha256


def _recipe(argv: list[str]) -> PretrainRecipe:
    return recipe_from_args(build_parser().parse_args(["pretrain", *argv]))


def test_cli_picks_named_recipes_and_keeps_pcb_the_default():
    assert _recipe([]) == PretrainRecipe()  # default unchanged: the pcb base
    tiny = _recipe(["--corpus", "surfaces"])
    assert tiny == RECIPES["surfaces-base-tiny-320"] and tiny.corpus == "surfaces" and tiny.count == 3000
    s = _recipe(["--corpus", "surfaces", "--model-size", "s", "--minutes", "90"])
    assert s.name == "surfaces-base-s-320" and s.model_size == "s" and s.time_budget_min == 90
    assert _recipe(["--name", "surfaces-base-tiny-320"]).corpus == "surfaces"  # a named recipe keeps its corpus


def test_surfaces_pretrain_resumes_reuses_its_corpus_and_publishes_partial(tmp_path):
    recipe = replace(RECIPES["surfaces-base-tiny-320"], name="surf-test", count=12, seed=3, image_size=96, epochs=1,
                     batch_size=4, warmup_steps=1)
    work, out = tmp_path / "work", tmp_path / "out"
    weights = pretrain(recipe, work, out)
    record = json.loads(weights.with_suffix(".json").read_text())
    assert record["sha256"] == file_sha256(weights) and record["classes"] == list(SURFACE_CLASSES)
    assert record["corpus"]["kind"] == "surfaces" and record["corpus"]["recipe"]["seed"] == 3
    assert record["corpus"]["texture_sources"][0]["licence"] and len(record["corpus"]["families"]) >= 8
    assert record["partial"] is False and record["metrics"]["epochs_run"] == 1
    first_started = record["started"]

    with pytest.raises(UserInputError, match="--resume"):  # a second start in the same folder is refused
        pretrain(recipe, work, out)
    with pytest.raises(ConfigError, match="seed: 3 in the run, 4 now"):
        pretrain(replace(recipe, seed=4), work, out, resume=True)

    frame = work / "corpus" / "images" / "surf-test_00000.jpg"
    stamp = frame.stat().st_mtime_ns
    weights = pretrain(replace(recipe, epochs=2), work, out, resume=True)
    record = json.loads(weights.with_suffix(".json").read_text())
    assert frame.stat().st_mtime_ns == stamp  # the corpus on disk was reused, not redrawn
    assert record["metrics"]["epochs_run"] == 2 and record["partial"] is False
    assert record["started"] == first_started and record["last_session"]["started"] > first_started

    (work / "run" / "metrics.json").unlink()  # as if the run were still going: publish evaluates the best so far
    weights = publish(replace(recipe, epochs=5), work, out)
    record = json.loads(weights.with_suffix(".json").read_text())
    assert record["partial"] is True and record["metrics"]["epochs_run"] == 2
    assert "map50" in record["metrics"]["val"] and set(record["metrics"]["val"]["per_class"]) == set(SURFACE_CLASSES)
    assert record["resume_command"].endswith(f"--work {work} --resume")
    assert "--corpus surfaces" in record["resume_command"]
    assert record["run_dir"] == str(work / "run")


def test_resume_without_a_pretrain_names_the_command(tmp_path):
    with pytest.raises(UserInputError, match="defectkit pretrain --corpus surfaces"):
        pretrain(RECIPES["surfaces-base-tiny-320"], tmp_path, tmp_path / "out", resume=True)


def test_resume_before_the_first_checkpoint_says_start_again(tmp_path):
    from dataclasses import asdict

    recipe = RECIPES["surfaces-base-tiny-320"]
    (tmp_path / "recipe.json").write_text(json.dumps(asdict(recipe)))  # killed while drawing the corpus
    with pytest.raises(UserInputError, match="before its first checkpoint.*without --resume"):
        pretrain(recipe, tmp_path, tmp_path / "out", resume=True)


def test_publish_takes_the_recipe_the_run_recorded(tmp_path):
    from dataclasses import asdict

    from detect.pretrain import stored_recipe

    ran = replace(RECIPES["surfaces-base-tiny-320"], time_budget_min=70.0)
    (tmp_path / "recipe.json").write_text(json.dumps(asdict(ran)))
    assert stored_recipe(tmp_path, RECIPES["surfaces-base-tiny-320"]) == ran  # its budget, not the flag's default
    with pytest.raises(UserInputError, match="holds the pretrain 'surfaces-base-tiny-320', not 'surfaces-base-s-320'"):
        stored_recipe(tmp_path, RECIPES["surfaces-base-s-320"])
