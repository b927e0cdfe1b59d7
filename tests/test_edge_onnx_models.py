"""Small real ONNX detectors for the edge-runtime tests, and checks that they are what they claim.

They take ``image [1,3,h,w]`` and ``scale_factor [1,2]`` like a PP-YOLOE export and emit either form:
NMS in the model (``bbox [K,6]``, ``bbox_num [1]``) or not (``boxes [1,A,4]``, ``scores [1,C,A]``).
Boxes are fixed in network pixels and divided by the scale factor (so they come out in original
pixels, as the real export does); scores are constants times a channel mean of the input, so a test
image's colour decides them and the BGR->RGB order is exercised.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.modelspec import ModelSpec, file_sha256

OPSET = 13

# Hand-made boxes in network pixels (64 x 64 input): A0/A1 overlap with IoU 324/476 = 0.68.
NET_SIZE = (64, 64)
RAW_BOXES = np.array([[10, 10, 30, 30], [12, 12, 32, 32], [40, 40, 60, 60], [0, 0, 8, 8]], np.float32)
RAW_SCORES = np.array([[0.9, 0.8, 0.3, 0.005], [0.1, 0.85, 0.0, 0.02]], np.float32)  # [C=2, A=4]


def _common_nodes(net_boxes: np.ndarray):
    """Nodes: channel means [1,3] of the image and boxes [K,4] divided by [sx, sy, sx, sy]."""
    inits = [
        numpy_helper.from_array(net_boxes.astype(np.float32), "net_boxes"),
        numpy_helper.from_array(np.array([1, 0, 1, 0], np.int64), "xy_index"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["means"], axes=[2, 3], keepdims=0),
        helper.make_node("Gather", ["scale_factor", "xy_index"], ["sf4"], axis=1),
        helper.make_node("Div", ["net_boxes", "sf4"], ["orig_boxes"]),
    ]
    return nodes, inits


def _inputs(size: tuple[int, int]):
    return [
        helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size[0], size[1]]),
        helper.make_tensor_value_info("scale_factor", TensorProto.FLOAT, [1, 2]),
    ]


def build_nms_model(
    path: Path,
    net_boxes: np.ndarray,
    class_ids: list[int],
    channels: list[int],
    factors: list[float],
    size: tuple[int, int] = NET_SIZE,
) -> Path:
    """bbox [K,6] = (class, score = factor * mean of input channel, box / scale), bbox_num [1] = K."""
    k = len(class_ids)
    nodes, inits = _common_nodes(net_boxes)
    inits += [
        numpy_helper.from_array(np.array(class_ids, np.float32).reshape(k, 1), "cls_col"),
        numpy_helper.from_array(np.array(channels, np.int64), "channels"),
        numpy_helper.from_array(np.array(factors, np.float32).reshape(k, 1), "factors"),
        numpy_helper.from_array(np.array([k, 1], np.int64), "k1"),
        numpy_helper.from_array(np.array([k], np.int32), "num_const"),
    ]
    nodes += [
        helper.make_node("Gather", ["means", "channels"], ["picked"], axis=1),  # [1,K]
        helper.make_node("Reshape", ["picked", "k1"], ["picked_col"]),
        helper.make_node("Mul", ["picked_col", "factors"], ["score_col"]),
        helper.make_node("Concat", ["cls_col", "score_col", "orig_boxes"], ["bbox"], axis=1),
        helper.make_node("Identity", ["num_const"], ["bbox_num"]),
    ]
    outputs = [
        helper.make_tensor_value_info("bbox", TensorProto.FLOAT, [k, 6]),
        helper.make_tensor_value_info("bbox_num", TensorProto.INT32, [1]),
    ]
    graph = helper.make_graph(nodes, "nms_in_model", _inputs(size), outputs, inits)
    return _save(graph, path)


def build_raw_model(
    path: Path,
    net_boxes: np.ndarray = RAW_BOXES,
    base_scores: np.ndarray = RAW_SCORES,
    channel: int = 0,
    size: tuple[int, int] = NET_SIZE,
    scores_first: bool = False,
) -> Path:
    """boxes [1,A,4] = box / scale; scores [1,C,A] = base * mean of one input channel (exclude_nms form)."""
    c, a = base_scores.shape
    nodes, inits = _common_nodes(net_boxes)
    inits += [
        numpy_helper.from_array(base_scores.reshape(1, c, a).astype(np.float32), "base_scores"),
        numpy_helper.from_array(np.array(channel, np.int64), "channel"),
        numpy_helper.from_array(np.array([1, a, 4], np.int64), "shape_1a4"),
    ]
    nodes += [
        helper.make_node("Gather", ["means", "channel"], ["mean_c"], axis=1),  # [1]
        helper.make_node("Mul", ["base_scores", "mean_c"], ["scores"]),
        helper.make_node("Reshape", ["orig_boxes", "shape_1a4"], ["boxes"]),
    ]
    outputs = [
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, a, 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, c, a]),
    ]
    if scores_first:
        outputs.reverse()
    graph = helper.make_graph(nodes, "nms_on_host", _inputs(size), outputs, inits)
    return _save(graph, path)


def _save(graph, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="defectkit-tests")
    model.ir_version = 8  # readable by every onnxruntime >= 1.10
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_deploy(
    directory: Path,
    model_file: str,
    classes: list[str],
    nms: str,
    size: tuple[int, int] = NET_SIZE,
    fmt: str = "onnx",
    postprocess: dict | None = None,
) -> Path:
    """A deploy.json for one model file of ``directory`` (sha256 computed from the file)."""
    raw = {
        "schema": "defectkit.deploy/1",
        "line": "test-line",
        "classes": classes,
        "input": {
            "size": list(size), "color": "RGB", "scale": 0.00392156862745098, "mean": [0, 0, 0],
            "std": [1, 1, 1], "resize": "stretch", "layout": "NCHW", "feeds": ["image", "scale_factor"],
        },
        "postprocess": postprocess or {"nms_iou": 0.6, "score_threshold": 0.01, "nms_top_k": 1000, "keep_top_k": 100},
        "models": [{
            "file": model_file, "format": fmt, "target": "any", "precision": "fp32", "nms": nms,
            "runtime_version": None, "sha256": file_sha256(directory / model_file),
        }],
    }
    path = directory / "deploy.json"
    path.write_text(json.dumps(raw, indent=2))
    ModelSpec.load(path)  # the helper must write what the runtime accepts
    return path


def test_models_are_valid_onnx_with_the_export_io(tmp_path):
    nms = build_nms_model(tmp_path / "a.onnx", RAW_BOXES[:2], [0, 1], [0, 2], [0.9, 0.7])
    raw = build_raw_model(tmp_path / "b.onnx")
    for path, outs in ((nms, ["bbox", "bbox_num"]), (raw, ["boxes", "scores"])):
        model = onnx.load(str(path))
        assert [i.name for i in model.graph.input] == ["image", "scale_factor"]
        assert [o.name for o in model.graph.output] == outs
