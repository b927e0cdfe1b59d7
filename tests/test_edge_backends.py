"""Backend registry, backend choice, helpful missing-dependency errors, and both adapters on real models."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edge_runtime import backends
from edge_runtime.backends import BACKENDS, BackendInfo, choose_backend, create_backend
from edge_runtime.errors import ConfigError, MissingDependencyError, ModelError
from edge_runtime.modelspec import ModelSpec
from edge_runtime.predict import Detector
from tests.test_edge_onnx_models import NET_SIZE, RAW_BOXES, RAW_SCORES, build_raw_model, write_deploy

CLASSES = ["scratch", "dent"]


def _spec(*entries) -> ModelSpec:
    models = [{"file": f, "format": fmt, "target": target, "nms": "in_model", "sha256": "0" * 64}
              for f, fmt, target in entries]
    return ModelSpec.from_dict({"schema": "defectkit.deploy/1", "line": "l", "classes": CLASSES,
                                "input": {"size": [64, 64]}, "models": models})


def test_registry_and_choice_by_format_target_and_preference(monkeypatch):
    assert {"onnxruntime", "paddle"} <= set(BACKENDS) and "onnxruntime" in backends.available_backends()
    monkeypatch.setattr(backends, "_host_target", lambda: "x86")
    spec = _spec(("m_arm.nb", "paddlelite", "arm"), ("m.pdmodel", "paddle", "x86"), ("m.onnx", "onnx", "any"))
    # the arm entry is skipped on x86; deploy.json order decides among the rest
    assert choose_backend(spec) == backends.BackendChoice("paddle", spec.models[1])
    assert choose_backend(spec, preferred="onnxruntime").entry.file == "m.onnx"
    assert choose_backend(spec, model_file="m.onnx").backend == "onnxruntime"
    with pytest.raises(ModelError, match=r"backend 'onnxruntime' runs onnx models, but the model is paddle"):
        choose_backend(spec, preferred="onnxruntime", model_file="m.pdmodel")
    with pytest.raises(ConfigError, match=r"unknown backend 'padle'. Did you mean 'paddle'\?"):
        choose_backend(spec, preferred="padle")


def test_missing_runtime_names_package_and_extra(monkeypatch):
    gone = dataclasses.replace(BACKENDS["onnxruntime"], package="onnxruntime_not_installed_here")
    monkeypatch.setitem(BACKENDS, "onnxruntime", gone)
    message = (r"backend 'onnxruntime' needs the Python package 'onnxruntime_not_installed_here', which is not "
               r"installed. Install it with: pip install 'defectkit\[edge\]'")
    with pytest.raises(MissingDependencyError, match=message):
        create_backend("onnxruntime")
    spec = _spec(("m.onnx", "onnx", "any"))
    with pytest.raises(MissingDependencyError, match=message):
        choose_backend(spec, preferred="onnxruntime")
    with pytest.raises(MissingDependencyError, match=r"no installed backend can run this model: it needs onnxruntime"):
        choose_backend(spec)
    assert MissingDependencyError.exit_code == 3


def test_registry_is_open_for_new_runtimes(monkeypatch):
    info = BackendInfo("fake", "edge_runtime.backends.onnxruntime_backend", "OnnxRuntimeBackend", "numpy",
                       "pip install numpy", ("fakefmt",))
    monkeypatch.setitem(BACKENDS, "fake", info)
    monkeypatch.setattr("edge_runtime.modelspec.FORMATS", ("onnx", "paddle", "paddlelite", "fakefmt"))
    spec = _spec(("m.fake", "fakefmt", "any"))
    assert choose_backend(spec).backend == "fake"
    assert create_backend("fake").name == "onnxruntime"  # the class the table points at


def test_onnxruntime_adapter_threads_and_feed_errors(tmp_path):
    path = build_raw_model(tmp_path / "m.onnx")
    be = create_backend("onnxruntime")
    with pytest.raises(ModelError, match="call load"):
        be.infer({})
    be.load(path, threads=3)
    assert be._session.get_session_options().intra_op_num_threads == 3
    assert be.input_names == ["image", "scale_factor"] and be.output_names == ["boxes", "scores"]
    image = np.ones((1, 3, *NET_SIZE), np.float32)
    boxes, scores = be.infer({"image": image, "scale_factor": np.ones((1, 2), np.float32)})
    np.testing.assert_allclose(boxes[0], RAW_BOXES)
    np.testing.assert_allclose(scores[0], RAW_SCORES)
    with pytest.raises(ModelError, match=r"expects inputs \['image', 'scale_factor'\], got \['image'\]"):
        be.infer({"image": image})
    with pytest.raises(ModelError, match=r"ONNX Runtime failed to run .* on inputs \{'image': \(1, 3, 5, 5\)"):
        be.infer({"image": np.ones((1, 3, 5, 5), np.float32), "scale_factor": np.ones((1, 2), np.float32)})


def _save_paddle_model(prefix):
    """The paddle twin of build_raw_model, saved as model.pdmodel / model.pdiparams by paddle.jit.save."""
    from detect.heavy import paddle_stack

    paddle = paddle_stack().paddle

    class Twin(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.register_buffer("net_boxes", paddle.to_tensor(RAW_BOXES))
            self.register_buffer("base", paddle.to_tensor(RAW_SCORES[None]))

        def forward(self, image, scale_factor):
            sx, sy = scale_factor[:, 1:2], scale_factor[:, 0:1]
            boxes = (self.net_boxes / paddle.concat([sx, sy, sx, sy], axis=1)).reshape([1, -1, 4])
            red = image.mean(axis=[2, 3])[:, 0:1].reshape([1, 1, 1])
            return boxes, self.base * red

    spec = [paddle.static.InputSpec([1, 3, *NET_SIZE], "float32", "image"),
            paddle.static.InputSpec([1, 2], "float32", "scale_factor")]
    paddle.jit.save(Twin(), str(prefix), input_spec=spec)


def test_paddle_inference_adapter_agrees_with_onnxruntime(tmp_path):
    pd_dir, ort_dir = tmp_path / "pd", tmp_path / "ort"
    _save_paddle_model(pd_dir / "model")
    write_deploy(pd_dir, "model.pdmodel", CLASSES, nms="host", fmt="paddle")
    build_raw_model(ort_dir / "model.onnx")
    write_deploy(ort_dir, "model.onnx", CLASSES, nms="host")
    pd_det = Detector.from_model(pd_dir / "model.pdmodel", threads=1)
    assert pd_det.backend.name == "paddle" and pd_det.backend.input_names == ["image", "scale_factor"]
    ort_det = Detector.from_model(ort_dir / "model.onnx", threads=1)
    rng = np.random.default_rng(0)
    for h, w in ((96, 128), (64, 64), (200, 50)):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        a, b = pd_det(image), ort_det(image)
        assert len(a) == len(b) > 0
        np.testing.assert_array_equal(a.class_ids, b.class_ids)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)
        np.testing.assert_allclose(a.boxes, b.boxes, rtol=1e-5)
    be = create_backend("paddle")
    with pytest.raises(ModelError, match=r"needs 'model.pdmodel' with 'model.pdiparams' beside it"):
        be.load(ort_dir / "model.onnx", threads=1)
