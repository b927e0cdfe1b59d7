"""The full edge path on real ONNX models: pre -> ONNX Runtime -> post -> decision -> JSON lines, and the CLI."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_runtime import cli
from edge_runtime.settings import RuntimeSettings
from edge_runtime.errors import BundleError, ConfigError, ModelError, UserInputError
from edge_runtime.predict import Detector, predict_folder
from tests.test_edge_onnx_models import RAW_BOXES, build_nms_model, build_raw_model, write_deploy

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["scratch", "dent"]


def _image(h: int, w: int, bgr: tuple[int, int, int]) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = bgr
    return img


@pytest.fixture()
def nms_export(tmp_path):
    """NMS-in-model export: box 0 scores 0.9 * mean red, box 1 scores 0.7 * mean blue."""
    d = tmp_path / "export_nms"
    build_nms_model(d / "model.onnx", RAW_BOXES[:2], class_ids=[0, 1], channels=[0, 2], factors=[0.9, 0.7])
    write_deploy(d, "model.onnx", CLASSES, nms="in_model")
    return d


@pytest.fixture()
def raw_export(tmp_path):
    d = tmp_path / "export_raw"
    build_raw_model(d / "model.onnx", scores_first=True)  # output order must not matter
    write_deploy(d, "model.onnx", CLASSES, nms="host")
    return d


def test_detector_in_model_nms_boxes_in_original_pixels_and_rgb_order(nms_export):
    det = Detector.from_model(nms_export / "model.onnx", threads=1)
    assert det.backend.name == "onnxruntime" and det.backend.input_names == ["image", "scale_factor"]
    dets = det(_image(96, 128, (0, 0, 255)))  # pure red (BGR) -> only the red-driven box 0 scores
    assert dets.class_ids.tolist() == [0]
    assert dets.scores.tolist() == pytest.approx([0.9], abs=1e-5)
    # network box [10,10,30,30] on a 64x64 input, image 128 wide x 96 high -> x * 2, y * 1.5
    np.testing.assert_allclose(dets.boxes[0], [20, 15, 60, 45], rtol=1e-5)
    dets = det(_image(32, 64, (255, 0, 255)))  # magenta: both boxes, blue one lower
    assert dets.class_ids.tolist() == [0, 1] and dets.scores.tolist() == pytest.approx([0.9, 0.7], abs=1e-5)
    np.testing.assert_allclose(dets.boxes[1], [12, 6, 32, 16], rtol=1e-5)
    t = det.last_timing
    assert t.pre > 0 and t.infer > 0 and t.post >= 0 and t.total == pytest.approx(t.pre + t.infer + t.post)


def test_detector_host_nms_matches_hand_computed_result(raw_export):
    det = Detector.from_model(raw_export, threads=1)  # a directory works too
    dets = det(_image(96, 128, (255, 255, 255)))  # white: scores = base scores
    # class 0: A0 0.9 kept, A1 suppressed (IoU 0.68 > 0.6), A2 0.3 kept, A3 0.005 below 0.01
    # class 1: A1 0.85 kept, A0 suppressed, A3 0.02 kept
    assert dets.class_ids.tolist() == [0, 1, 0, 1]
    assert dets.scores.tolist() == pytest.approx([0.9, 0.85, 0.3, 0.02], abs=1e-5)
    np.testing.assert_allclose(dets.boxes[1], [24, 18, 64, 48], rtol=1e-5)


def _folder(tmp_path) -> Path:
    src = tmp_path / "images"
    (src / "sub").mkdir(parents=True)
    cv2.imwrite(str(src / "red.png"), _image(96, 128, (0, 0, 255)))
    cv2.imwrite(str(src / "sub" / "blue.jpg"), _image(60, 80, (255, 0, 0)))
    cv2.imwrite(str(src / "black.bmp"), _image(50, 50, (0, 0, 0)))
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    (src / "notes.txt").write_text("not an image")
    return src


def test_predict_folder_writes_json_lines_and_annotated_pngs(nms_export, tmp_path):
    src = _folder(tmp_path)
    out = tmp_path / "out" / "preds.jsonl"
    ann = tmp_path / "annotated"
    summary = predict_folder(nms_export / "model.onnx", src, out, RuntimeSettings(score_threshold=0.5),
                             save_annotated=ann, threads=1)
    assert (summary.images, summary.errors, summary.ng, summary.ok) == (4, 1, 2, 1)
    assert set(summary.latency_ms) == {"pre", "infer", "post", "total"} and summary.latency_ms["infer"] > 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    by_name = {Path(r["source"]).name: r for r in lines}
    assert sorted(by_name) == ["black.bmp", "blue.jpg", "broken.png", "red.png"]
    red = by_name["red.png"]
    assert (red["height"], red["width"], red["verdict"]) == (96, 128, "NG")
    assert red["detections"] == [{"class_id": 0, "class": "scratch", "score": pytest.approx(0.9, abs=1e-4),
                                  "box": [20.0, 15.0, 60.0, 45.0], "counted": True}]
    assert set(red["latency_ms"]) == {"pre", "infer", "post"}
    assert datetime.fromisoformat(red["time"].replace("Z", "+00:00")).tzinfo is not None
    assert by_name["blue.jpg"]["verdict"] == "NG" and by_name["blue.jpg"]["detections"][0]["class"] == "dent"
    assert by_name["black.bmp"]["verdict"] == "OK" and by_name["black.bmp"]["detections"] == []
    assert "cannot decode" in by_name["broken.png"]["error"] and "verdict" not in by_name["broken.png"]
    pngs = sorted(p.relative_to(ann).as_posix() for p in ann.rglob("*.png"))
    assert pngs == ["black.png", "red.png", "sub/blue.png"]
    drawn = cv2.imread(str(ann / "red.png"))
    assert drawn.shape == (96, 128, 3) and not np.array_equal(drawn, _image(96, 128, (0, 0, 255)))
    # a higher threshold turns the blue part (0.7) OK; thresholds per class work through the same path
    summary = predict_folder(nms_export / "model.onnx", src, out, RuntimeSettings(score_threshold=0.8), threads=1)
    assert (summary.ng, summary.ok) == (1, 2)


def test_predict_folder_errors_are_kit_errors(nms_export, tmp_path):
    with pytest.raises(UserInputError, match="is not a directory of images"):
        predict_folder(nms_export / "model.onnx", tmp_path / "nope", tmp_path / "p.jsonl", threads=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match=r"no images found in '.*empty' \(looked for .jpg"):
        predict_folder(nms_export / "model.onnx", tmp_path / "empty", tmp_path / "p.jsonl", threads=1)
    with pytest.raises(ConfigError, match="class_thresholds names classes the model does not have: 'rust'"):
        predict_folder(nms_export / "model.onnx", _folder(tmp_path), tmp_path / "p.jsonl",
                       RuntimeSettings(class_thresholds={"rust": 0.2}), threads=1)
    assert not list(tmp_path.glob("*.jsonl")) and not list(tmp_path.glob(".*.tmp"))


def test_from_model_refuses_tampered_missing_or_mismatched_models(nms_export, tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        Detector.from_model(tmp_path / "missing.onnx")
    model = nms_export / "model.onnx"
    good = model.read_bytes()
    model.write_bytes(good[:-1])
    with pytest.raises(BundleError, match="the file was changed or truncated"):
        Detector.from_model(model)
    model.write_bytes(good)
    # the wrong NMS setting in deploy.json is explained, not mis-decoded
    write_deploy(nms_export, "model.onnx", CLASSES, nms="host")
    det = Detector.from_model(model, threads=1)
    with pytest.raises(ModelError, match=r"set its entry's \"nms\" to \"in_model\""):
        det(_image(10, 10, (1, 2, 3)))
    model.write_bytes(b"not an onnx file")
    write_deploy(nms_export, "model.onnx", CLASSES, nms="in_model")
    with pytest.raises(ModelError, match=r"ONNX Runtime .* cannot load '.*model.onnx'"):
        Detector.from_model(model)


def test_cli_main_prints_summary_and_reports_errors_in_one_line(nms_export, tmp_path, capsys):
    src = _folder(tmp_path)
    cfg = tmp_path / "runtime.json"
    cfg.write_text(json.dumps({"runtime": {"score_threshold": 0.95, "class_thresholds": {"dent": 0.5}}}))
    out = tmp_path / "preds.jsonl"
    code = cli.main(["predict", "--model", str(nms_export / "model.onnx"), "--source", str(src), "--out", str(out),
                     "--threads", "1", "--settings-override", str(cfg)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "4 images: 1 NG, 2 OK, 1 unreadable; median latency" in printed and "on onnxruntime" in printed
    # the flag overrides the file's score threshold (red 0.9 becomes NG too)
    code = cli.main(["predict", "--model", str(nms_export / "model.onnx"), "--source", str(src), "--out", str(out),
                     "--threads", "1", "--settings-override", str(cfg), "--score-threshold", "0.5"])
    assert code == 0 and "2 NG, 1 OK" in capsys.readouterr().out
    code = cli.main(["predict", "--model", str(nms_export / "model.onnx"), "--source", str(src),
                     "--backend", "onnxrt"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("edge_runtime predict: error: unknown backend 'onnxrt'. Did you mean 'onnxruntime'? "
                          "Known backends: onnxruntime, paddle")


def test_register_adds_the_same_predict_verb_to_another_cli():
    parser = argparse.ArgumentParser(prog="defectkit")
    cli.register(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["predict", "--model", "m.onnx", "--source", "imgs", "--save-annotated", "ann"])
    assert args.func is cli.run_predict and args.threads is None and args.out == Path("preds.jsonl")
    assert args.save_annotated == Path("ann") and args.backend is None and args.score_threshold is None


def test_python_dash_m_edge_runtime(nms_export, tmp_path):
    src = _folder(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "edge_runtime", "predict", "--model", str(nms_export / "model.onnx"),
         "--source", str(src), "--out", str(tmp_path / "p.jsonl"), "--threads", "1"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "4 images: 2 NG, 1 OK, 1 unreadable" in proc.stdout
    assert "cannot decode" in proc.stderr  # the unreadable image is logged
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 4


def test_draw_marks_counted_boxes_in_class_colour_and_ignored_ones_grey():
    from edge_runtime.decision import decide
    from edge_runtime.draw import class_color, draw_detections
    from edge_runtime.postprocess import Detections

    img = np.full((200, 300, 3), 255, np.uint8)
    dets = Detections.build(np.array([[20, 60, 120, 160], [150, 60, 280, 190], [10, 10, 20, 20]]),
                            np.array([0.9, 0.4, 0.05]), np.array([0, 1, 1]))
    verdict = decide(dets, CLASSES, RuntimeSettings())
    drawn = draw_detections(img, dets, CLASSES, verdict)
    assert tuple(drawn[110, 20].tolist()) == class_color(0)  # left edge of the counted box
    assert tuple(drawn[120, 150].tolist()) == (160, 160, 160)  # left edge of the ignored box
    assert np.array_equal(drawn[15, 200:], img[15, 200:])  # the 0.05 box is below min_score_drawn: not drawn
    assert drawn[5, 5].tolist() != [255, 255, 255] and np.array_equal(img, np.full_like(img, 255))  # banner; copy
