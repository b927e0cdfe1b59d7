"""Export v1: paddle inference with/without NMS and ONNX (checked), deploy.json, backend agreement."""
from __future__ import annotations

import cv2
import numpy as np
import onnx

from detect.compare import compare_models
from edge_runtime.modelspec import ModelSpec


def test_export_writes_all_variants_and_deploy_json(tiny_export):
    files = tiny_export.files
    assert set(files) == {"paddle", "paddle_nonms", "onnx", "onnx_nonms"}
    for path in files.values():
        assert path.is_file() and path.stat().st_size > 100_000
    onnx.checker.check_model(str(files["onnx"]))
    spec = ModelSpec.load(tiny_export.deploy_json)
    assert {(m.file, m.nms) for m in spec.models} == {
        ("model.pdmodel", "in_model"), ("model_nonms.pdmodel", "host"),
        ("model.onnx", "in_model"), ("model_nonms.onnx", "host")}
    assert spec.input.size == [96, 96] or tuple(spec.input.size) == (96, 96)


def _raw(model, backend, img):
    from edge_runtime.predict import Detector
    from edge_runtime.preprocess import preprocess

    det = Detector.from_model(model, backend=backend, threads=1)
    image, scale = preprocess(img, det.spec.input)
    feeds = {"image": image, "scale_factor": scale}
    return det.backend.infer({n: feeds[n] for n in det.backend.input_names})


def test_onnxruntime_matches_paddle_inference_raw_outputs(tiny_spec, tiny_export):
    """No-NMS outputs compared tensor by tensor: the strict check, independent of NMS row order."""
    files = tiny_export.files
    images = sorted(tiny_spec.paths.images.iterdir())[:4]
    worst_box = worst_score = 0.0
    for path in images:
        img = cv2.imread(str(path))
        a = _raw(files["onnx_nonms"], "onnxruntime", img)
        b = _raw(files["paddle_nonms"], "paddle", img)
        a = sorted(a, key=lambda x: x.ndim * 10 + x.shape[-1])
        b = sorted(b, key=lambda x: x.ndim * 10 + x.shape[-1])
        for x, y in zip(a, b):
            assert x.shape == y.shape
        boxes_a = next(x for x in a if x.shape[-1] == 4)
        boxes_b = next(y for y in b if y.shape[-1] == 4)
        scores_a = next(x for x in a if x.shape[-1] != 4)
        scores_b = next(y for y in b if y.shape[-1] != 4)
        scale = np.maximum(np.abs(boxes_b), 1.0)
        worst_box = max(worst_box, float((np.abs(boxes_a - boxes_b) / scale).max()))
        worst_score = max(worst_score, float(np.abs(scores_a - scores_b).max()))
    print(f"ONNX Runtime vs paddle.inference (no NMS): box rel diff {worst_box:.2e}, score diff {worst_score:.2e}")
    assert worst_box < 1e-3
    assert worst_score < 1e-4


def test_nms_exports_agree_through_the_edge_runtime(base_run, base_export):
    """ONNX Runtime vs paddle.inference with NMS in the graph, on the base detector (it really detects: the
    2-epoch tiny run scores everything at the 0.01 floor, so a score cut would compare nothing)."""
    from detect.run_settings import load_run_spec

    files = base_export.files
    spec = load_run_spec(base_run.root)
    images = sorted(spec.paths.images.iterdir())[:4]
    agreement = compare_models(files["onnx"], files["paddle"], images, min_score=0.3,
                               backend_a="onnxruntime", backend_b="paddle", threads=1)
    print(agreement.summary())
    assert agreement.images == 4
    assert agreement.matched >= 4 and not agreement.count_mismatches  # real detections, the same ones
    assert agreement.max_box_rel < 1e-3 and agreement.max_score_abs < 1e-4
