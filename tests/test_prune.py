"""Pruning (compress.prune): real PaddleSlim filter pruning of the kit's base detector on the tiny line at 96 px,
a real fine-tune epoch, the export run by the edge runtime in paddle.inference and ONNX Runtime.

The base weights (trained at 320 px) give a genuine PP-YOLOE+ tiny with trained filters, so the FPGM criterion
and the FLOPs search work on real values; at 96 px everything takes seconds.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.errors import UserInputError

ROOT = Path(__file__).resolve().parents[1]
BASE_WEIGHTS = ROOT / "base_weights" / "pcb-base-tiny-320.pdparams"


@pytest.fixture(scope="module")
def variant(tiny_spec, tmp_path_factory):
    from compress.prune import prune

    return prune(tiny_spec, BASE_WEIGHTS, tmp_path_factory.mktemp("prune") / "prune-30", flops_target=0.3,
                 finetune_epochs=1, overrides={"batch_size": 4}, progress=False)


def _images(spec, n=4):
    return sorted(spec.paths.images.glob("*.jpg"))[:n]


def _train_dir(variant) -> Path:
    return variant.export_dir / "prune_train"


def test_flops_drop_by_the_target_measured_before_and_after(variant, tiny_spec):
    from compress.prune import measure_cost

    before = measure_cost(tiny_spec, BASE_WEIGHTS)
    after = measure_cost(tiny_spec, _train_dir(variant) / "weights" / "best.pdparams")
    reduction = 1 - after[0] / before[0]
    assert 0.28 <= reduction <= 0.36, (before, after)  # -30 % asked; filters are whole, so a little more
    assert after[1] < 0.9 * before[1]  # parameters drop too
    r = variant.recipe
    assert (r["gflops_before"], r["params_m_before"]) == before and (r["gflops_after"], r["params_m_after"]) == after
    assert (variant.gflops, variant.params_m) == after
    assert r["flops_reduction"] == pytest.approx(reduction, abs=1e-3)
    assert 0 < r["ratio"] < 0.9 and r["flops_target"] == 0.3 and r["criterion"] == "fpgm"
    # backbone and neck both pruned; the collections that feed the neck / the head were kept whole
    assert r["collections"]["backbone"] > 5 and r["collections"]["neck"] > 5
    assert r["collections_kept_whole"]["backbone"] >= 1 and r["collections_kept_whole"]["neck"] >= 1
    assert r["pruned_layers"] > 20
    assert variant.name == "prune-30" and variant.method == "prune" and variant.parent == "fp32"


def test_exported_program_has_the_pruned_shapes(variant):
    """The shipped convs are narrower than the unpruned detector's: read the program's filter shapes."""
    from detect.heavy import paddle_stack

    paddle_stack()
    from paddle.base.proto import framework_pb2

    program = framework_pb2.ProgramDesc()
    program.ParseFromString((variant.export_dir / "model_nonms.pdmodel").read_bytes())
    block = program.blocks[0]
    shapes = {v.name: list(v.type.lod_tensor.tensor.dims) for v in block.vars if v.type.HasField("lod_tensor")}
    filters = [shapes[a] for op in block.ops if op.type == "conv2d" for i in op.inputs if i.parameter == "Filter"
               for a in i.arguments]
    assert not any(op.type == "multiclass_nms3" for op in block.ops)
    # PP-YOLOE+ tiny's widths are multiples of 8 (16, 24, 32, ...); pruned convs keep other counts
    assert sum(1 for f in filters if f[0] % 8) >= 10, filters
    assert (variant.export_dir / "model.pdiparams").stat().st_size < 0.85 * BASE_WEIGHTS.stat().st_size


def test_export_runs_in_paddle_inference_and_onnxruntime_and_they_agree(variant, tiny_spec):
    import cv2

    from detect.compare import compare_models
    from edge_runtime.modelspec import ModelSpec, file_sha256
    from edge_runtime.predict import Detector
    from edge_runtime.preprocess import preprocess

    deploy = ModelSpec.load(variant.deploy_json)
    assert deploy.classes == tiny_spec.classes
    assert {(m.file, m.format, m.nms) for m in deploy.models} == {
        ("model.pdmodel", "paddle", "in_model"), ("model_nonms.pdmodel", "paddle", "host"),
        ("model.onnx", "onnx", "in_model"), ("model_nonms.onnx", "onnx", "host")}
    for m in deploy.models:
        assert m.precision == "fp32" and m.sha256 == file_sha256(variant.export_dir / m.file)
    assert deploy.meta["method"] == "prune"
    # raw outputs of the host-NMS models: the same network in both runtimes
    pd = Detector.from_model(variant.export_dir / "model_nonms.pdmodel", backend="paddle")
    ort = Detector.from_model(variant.export_dir / "model_nonms.onnx", backend="onnxruntime")
    for path in _images(tiny_spec):
        image, scale = preprocess(cv2.imread(str(path)), pd.spec.input)
        feeds = {"image": image, "scale_factor": scale}
        a = pd.backend.infer({n: feeds[n] for n in pd.backend.input_names})
        b = ort.backend.infer({n: feeds[n] for n in ort.backend.input_names})
        assert a[0].shape == b[0].shape and a[1].shape[1] == tiny_spec.num_classes
        assert np.abs(a[0] - b[0]).max() < 1e-2 and np.abs(a[1] - b[1]).max() < 1e-5
    # and through the runtime's whole path, NMS included (scores here sit just above the NMS floor of 0.01)
    agree = compare_models(variant.export_dir / "model_nonms.pdmodel", variant.export_dir / "model_nonms.onnx",
                           _images(tiny_spec), min_score=0.01, backend_a="paddle", backend_b="onnxruntime")
    assert agree.matched > 0 and agree.ok(box_rel_tol=1e-3, score_tol=1e-4), agree.summary()
    with_nms = Detector.from_model(variant.export_dir / "model.onnx", backend="onnxruntime")
    assert len(with_nms(cv2.imread(str(_images(tiny_spec)[0]))).scores) > 0


def test_finetune_ran_an_epoch_and_wrote_history(variant):
    r = variant.recipe
    assert r["finetune_epochs"] == 1 and len(r["finetune_val"]) == 1 and r["best_epoch"] == 1
    assert len(r["seconds_per_epoch"]) == 1 and r["seconds_per_epoch"][0] > 0
    history = [json.loads(line) for line in (_train_dir(variant) / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history if "map50_95" in h] == [1]
    assert history[-1]["map50_95"] == pytest.approx(r["finetune_val"][0]["map50_95"], abs=1e-4)
    assert not (_train_dir(variant) / "checkpoints").exists()  # not resumable, not kept
    # the variant contract round-trips
    from compress.variants import load_variant

    variant.save(variant.export_dir.parent.parent)
    loaded = load_variant(variant.export_dir.parent.parent, "prune-30")
    assert loaded.gflops == variant.gflops and loaded.recipe == json.loads(json.dumps(r))


def test_deploy_fusion_of_pruned_repvgg_blocks_keeps_the_outputs(variant, tiny_spec):
    """The RepVgg workaround: a fused (deploy) pruned detector computes what the unfused one does."""
    from compress.prune_filters import build_detector, detector_inputs, repvgg_blocks, to_deploy

    weights = _train_dir(variant) / "weights" / "best.pdparams"
    model = build_detector(tiny_spec, weights)
    feeds = {"image": detector_inputs(tiny_spec.image_size)[0]["image"] * 0.5}

    def features():  # RepVgg blocks live in the backbone and the neck: compare the neck's outputs
        return [t.numpy() for t in model.neck(model.backbone(feeds))]

    ref = features()
    assert to_deploy(model) == len(repvgg_blocks(model)) > 5
    fused = features()
    assert all(hasattr(b, "conv") and not hasattr(b, "conv1") for b in repvgg_blocks(model))
    assert [f.shape for f in fused] == [f.shape for f in ref]
    assert max(float(np.abs(a - b).max() / (np.abs(a).max() + 1e-6)) for a, b in zip(ref, fused)) < 1e-4
    to_deploy(model)  # a second call is harmless (ppdet's export calls convert_to_deploy again)


def test_ratio_mode_with_l1_and_no_finetune(tiny_spec, tmp_path):
    from compress.prune import prune
    from edge_runtime.predict import Detector

    v = prune(tiny_spec, BASE_WEIGHTS, tmp_path / "prune-l1", ratio=0.25, criterion="l1", finetune_epochs=0,
              progress=False)
    assert v.name == "prune-25" and v.recipe["ratio"] == 0.25 and v.recipe["flops_target"] is None
    assert v.recipe["tool"].endswith("L1NormFilterPruner") and v.recipe["finetune_val"] == []
    assert 0.05 < v.recipe["flops_reduction"] < v.recipe["ratio"] + 0.1
    det = Detector.from_model(v.export_dir / "model_nonms.onnx", backend="onnxruntime")
    import cv2

    assert det(cv2.imread(str(_images(tiny_spec)[0]))).boxes.shape[1:] == (4,)


def test_finetune_settings_are_the_run_train_section_under_the_recipe(tiny_spec, variant):
    from compress.prune import PRUNE_FINETUNE_RECIPE, prune_settings

    run_spec = tiny_spec.with_cli({"train": {"lr": 0.003, "freeze": "backbone", "mosaic": 0.5},
                                   "compress": {"prune_warmup_steps": 4}})
    s = prune_settings(run_spec, BASE_WEIGHTS, 2, {"batch_size": 2}).train
    assert s.lr == pytest.approx(0.003)  # the run's lr (a `--lr` given to train) trains the recovery too
    assert s.freeze == "none" and s.mosaic == 0.0 and s.warmup_steps == 4 and s.epochs == 2 and s.batch_size == 2
    assert not {"lr", "epochs", "warmup_steps"} & set(PRUNE_FINETUNE_RECIPE)
    # the variant records the settings its fine-tune used
    used = variant.settings["train"]
    assert used["lr"] == pytest.approx(tiny_spec.settings.train.lr) == variant.recipe["lr"]
    assert used["batch_size"] == 4 and used["freeze"] == "none"
    assert used["warmup_steps"] == tiny_spec.settings.compress.prune_warmup_steps
    from detect.run_settings import load_run_spec

    session = load_run_spec(_train_dir(variant)).settings.train  # the fine-tune session's own settings.yaml
    assert session.lr == used["lr"] and session.freeze == "none" and session.epochs == 1


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one of ratio"),
    ({"ratio": 0.3, "flops_target": 0.3}, "exactly one of ratio"),
    ({"ratio": 0.0}, r"ratio is the share of filters .* got 0\.0"),
    ({"ratio": 1.5}, r"in \(0, 0\.9\]; got 1\.5"),
    ({"ratio": True}, "got True"),
    ({"flops_target": 1.0}, r"flops_target .* number in \(0, 1\) .* got 1\.0 \(compress\.prune_flops in"),
    ({"flops_target": -0.3}, "got -0.3"),
    ({"flops_target": "0.3"}, "got '0.3'"),
    ({"flops_target": float("nan")}, "got nan"),
    ({"flops_target": 0.3, "criterion": "l2"}, r"unknown criterion 'l2'; choose fpgm or l1 \(compress\.prune_criterion"),
    ({"flops_target": 0.3, "finetune_epochs": -1}, "finetune_epochs must be a whole number >= 0, got -1"),
    ({"flops_target": 0.3, "finetune_epochs": 1.5}, "got 1.5"),
])
def test_bad_arguments_are_refused_before_any_work(tiny_spec, tmp_path, kwargs, match):
    from compress.prune import prune

    with pytest.raises(UserInputError, match=match):
        prune(tiny_spec, BASE_WEIGHTS, tmp_path / "v", progress=False, **kwargs)
    assert not (tmp_path / "v").exists()


def test_missing_weights_and_unreachable_target_are_refused(tiny_spec, tmp_path):
    from compress.prune import prune

    with pytest.raises(UserInputError, match=r"'.*nope\.pdparams' is not a \.pdparams file\. Train first"):
        prune(tiny_spec, tmp_path / "nope.pdparams", tmp_path / "v", flops_target=0.3)
    with pytest.raises(UserInputError, match=r"-95% is out of reach: .* removes \d+\.\d% of the FLOPs. Ask for at most"):
        prune(tiny_spec, BASE_WEIGHTS, tmp_path / "v", flops_target=0.95, finetune_epochs=0, progress=False)
    assert not list((tmp_path / "v").glob("model*"))
