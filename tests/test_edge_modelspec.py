"""deploy.json: round trip, validation messages, lookup and checksum verification."""
from __future__ import annotations

import json

import pytest

from edge_runtime.errors import BundleError, ConfigError, ModelError
from edge_runtime.modelspec import FILENAME, InputSpec, ModelEntry, ModelSpec, PostprocessSpec, file_sha256


def _raw(**over):
    raw = {
        "schema": "defectkit.deploy/1",
        "line": "line-a",
        "classes": ["scratch", "dent"],
        "input": {"size": [320, 384], "color": "RGB", "scale": 0.00392156862745098, "mean": [0, 0, 0],
                  "std": [1, 1, 1], "resize": "stretch", "layout": "NCHW", "feeds": ["image", "scale_factor"]},
        "postprocess": {"nms_iou": 0.6, "score_threshold": 0.01, "nms_top_k": 1000, "keep_top_k": 100},
        "models": [
            {"file": "model.onnx", "format": "onnx", "target": "x86", "precision": "fp32", "nms": "in_model",
             "runtime_version": "1.31.1", "sha256": "a" * 64},
            {"file": "model_arm.nb", "format": "paddlelite", "target": "arm", "precision": "int8", "nms": "in_model",
             "runtime_version": None, "sha256": "b" * 64},
        ],
    }
    raw.update(over)
    return raw


def test_round_trip_keeps_every_field(tmp_path):
    spec = ModelSpec.from_dict(_raw())
    assert spec.input == InputSpec(size=(320, 384))
    assert (spec.input.height, spec.input.width, spec.input.cv2_interp) == (320, 384, 1)
    assert spec.postprocess == PostprocessSpec()
    assert spec.models[1] == ModelEntry("model_arm.nb", "paddlelite", "arm", "int8", "in_model", None, "b" * 64)
    path = spec.save(tmp_path)  # a directory means <dir>/deploy.json
    assert path == tmp_path / FILENAME
    again = ModelSpec.load(tmp_path / "model.onnx")  # found beside a model file
    assert again == spec
    written = json.loads(path.read_text())
    assert written["input"]["size"] == [320, 384] and written["models"][0]["runtime_version"] == "1.31.1"
    assert "meta" not in written
    assert not list(tmp_path.glob("*.tmp"))


def test_find_returns_the_entry_or_names_the_choices():
    spec = ModelSpec.from_dict(_raw())
    assert spec.find("/some/where/model_arm.nb").precision == "int8"
    with pytest.raises(ModelError, match=r"no entry for 'other.onnx' \(it lists: model.onnx, model_arm.nb\)"):
        spec.find("other.onnx")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.update(schema="defectkit.deploy/2"), r"schema is 'defectkit.deploy/2', this runtime reads"),
        (lambda r: r.update(clases=["x"]), r"unknown key 'clases'. Did you mean 'classes'\?"),
        (lambda r: r.pop("models"), r"required key\(s\) missing: models"),
        (lambda r: r.update(classes=["a", "a"]), r"class names must be unique"),
        (lambda r: r["input"].update(size=[320]), r"'input'.*'size' must be \[height, width\]"),
        (lambda r: r["input"].update(color="HSV"), r"'color' must be one of RGB, BGR, got 'HSV'"),
        (lambda r: r["input"].update(resize="letterbox"), r"'resize' must be one of stretch"),
        (lambda r: r["input"].update(std=[1, 0, 1]), r"'std\[1\]' must be greater than 0"),
        (lambda r: r["input"].update(mean=[0, 0]), r"'mean' must be a list of 3 numbers"),
        (lambda r: r["postprocess"].update(nms_iou=1.5), r"'nms_iou' must be in \(0, 1\]"),
        (lambda r: r["postprocess"].update(keep_top_k=-2), r"'keep_top_k' must be a whole number >= -1"),
        (lambda r: r["models"][0].update(format="tflite"), r"models\[0\].*'format' must be one of onnx, paddle"),
        (lambda r: r["models"][0].update(sha256="xyz"), r"'sha256' must be 64 lower-case hex digits"),
        (lambda r: r["models"][0].update(file="../model.onnx"), r"'file' must be a bare file name"),
        (lambda r: r["models"][1].update(file="model.onnx"), r"each model file may appear once"),
        (lambda r: r["models"][0].update(nms="maybe"), r"'nms' must be one of in_model, host"),
    ],
)
def test_validation_messages_name_the_key_and_the_fix(mutate, message):
    raw = _raw()
    mutate(raw)
    with pytest.raises(ConfigError, match=message):
        ModelSpec.from_dict(raw)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"deploy.json' does not exist: a deployable model needs its deploy.json"):
        ModelSpec.load(tmp_path / "model.onnx")
    (tmp_path / FILENAME).write_text("{not json")
    with pytest.raises(ConfigError, match=r"deploy.json' is not valid JSON"):
        ModelSpec.load(tmp_path)


def test_save_refuses_what_load_would_refuse(tmp_path):
    spec = ModelSpec.from_dict(_raw())
    spec.classes = []
    with pytest.raises(ConfigError, match="before writing"):
        spec.save(tmp_path / FILENAME)
    assert not (tmp_path / FILENAME).exists()


def test_verify_checks_presence_and_sha256(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"model bytes")
    raw = _raw()
    raw["models"][0]["sha256"] = file_sha256(model)
    spec = ModelSpec.from_dict(raw)
    assert spec.verify(tmp_path, spec.models[0]) == model
    model.write_bytes(b"tampered")
    with pytest.raises(BundleError, match=r"model.onnx' has sha256 .* expects .*the file was changed or truncated"):
        spec.verify(tmp_path, spec.models[0])
    with pytest.raises(ModelError, match=r"model_arm.nb' listed in deploy.json does not exist"):
        spec.verify(tmp_path, spec.models[1])


def test_meta_is_kept_and_optional_fields_default(tmp_path):
    raw = _raw(meta={"kit_version": "0.1.0"})
    raw["input"] = {"size": [64, 64], "interp": "cubic"}
    del raw["postprocess"]
    spec = ModelSpec.from_dict(raw)
    assert spec.meta == {"kit_version": "0.1.0"}
    assert spec.input.cv2_interp == 2 and spec.input.feeds == ("image", "scale_factor")
    assert spec.postprocess.nms_iou == 0.6
    assert ModelSpec.load(spec.save(tmp_path / "x" / FILENAME)).meta == {"kit_version": "0.1.0"}
