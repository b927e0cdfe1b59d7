"""ONNX Runtime INT8 of the base detector: really INT8 (QDQ, int8 weights, smaller), sensitive convs chosen by
measurement and recorded with their figures, close to FP32, refused without calibration images."""
from __future__ import annotations

import pytest

from compress.ort_quant import quantize_onnx
from compress.pipeline import calibration_images, load_run
from edge_runtime.errors import UserInputError
from edge_runtime.modelspec import ModelSpec


@pytest.fixture(scope="module")
def int8(base_run, base_export, tmp_path_factory):
    spec, run = load_run(base_run.root)
    out = tmp_path_factory.mktemp("ortint8") / "ort-int8"
    v = quantize_onnx(spec, run.export_dir, out, calibration_images(spec, 8), max_excluded=2, progress=False)
    return spec, run, v


def test_the_model_is_int8_qdq_and_smaller(int8):
    import onnx

    spec, run, v = int8
    model = onnx.load(str(v.export_dir / "model_nonms.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 50 and ops.count("DequantizeLinear") > 50
    int8_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) > 50
    fp32 = (run.export_dir / "model_nonms.onnx").stat().st_size
    assert (v.export_dir / "model_nonms.onnx").stat().st_size < 0.5 * fp32
    entry = ModelSpec.load(v.export_dir / "deploy.json").models[0]
    assert (entry.precision, entry.nms, entry.format) == ("int8", "host", "onnx")
    assert entry.runtime_version.startswith("onnxruntime ")


def test_sensitive_convs_come_from_measurement(int8):
    _, _, v = int8
    r = v.recipe
    fixed = r["fixed_fp32"]  # the 3-conv stem and the 3 DFL projection convs, then measured
    assert len(fixed) == 6 and r["rounds"][0]["kept_fp32"] == len(fixed) and r["reduce_range"] is True
    assert all({"calib_map_drop_pts", "images_off", "verdict_flips"} <= set(x) for x in r["rounds"])
    if len(r["rounds"]) > 1:  # the first round was not good enough: convs were ranked by the dB they lose
        ranked = [x["db_lost"] for x in r["most_sensitive"]]
        assert ranked == sorted(ranked, reverse=True) and len(ranked) >= 2
        kept = [x["node"] for x in r["kept_fp32"]]
        measured = [x["node"] for x in r["most_sensitive"] if x["node"] not in fixed]
        assert kept == measured[:len(kept)]  # the worst measured, in order


def test_int8_detections_stay_close_to_fp32(int8):
    from compress.gate import golden_check

    spec, run, v = int8
    import json

    val = json.loads(spec.paths.val.read_text())["images"]
    images = [spec.paths.images / im["file_name"] for im in val]
    check = golden_check(run.export_dir / "model_nonms.onnx", v.export_dir / "model_nonms.onnx", images, spec)
    assert len(check.verdict_flips) <= 1 and len(check.mismatched) <= 3, check


def test_no_calibration_images_is_refused(base_run, base_export, tmp_path):
    spec, run = load_run(base_run.root)
    with pytest.raises(UserInputError, match="no calibration images"):
        quantize_onnx(spec, run.export_dir, tmp_path / "x", [], progress=False)
    with pytest.raises(UserInputError, match="has NMS in the graph"):
        quantize_onnx(spec, run.export_dir, tmp_path / "x", calibration_images(spec, 2), source="model.onnx",
                      progress=False)
