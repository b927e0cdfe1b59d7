"""The edge runtime on a real edge box: Python 3.9, ONNX Runtime 1.19, no tqdm, no PyYAML, no paddle.

Runs ``python -m edge_runtime predict`` inside the debootstrapped root filesystem (scripts/edge_box.sh,
built once and cached) on both output forms, and compares its JSON lines with the host's.
"""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from compress.lite_convert import edgebox_run
from edge_runtime.settings import RuntimeSettings
from edge_runtime.predict import predict_folder
from tests.edgebox import ensure_edgebox
from tests.test_edge_onnx_models import RAW_BOXES, build_nms_model, build_raw_model, write_deploy

pytestmark = [pytest.mark.edgebox, pytest.mark.timeout(300)]


def _lines(path):
    return {json.loads(l)["source"].rsplit("/", 1)[-1]: json.loads(l) for l in path.read_text().splitlines()}


def test_predict_in_the_edge_box_matches_the_host(tmp_path):
    ensure_edgebox()
    build_nms_model(tmp_path / "nms" / "model.onnx", RAW_BOXES[:2], [0, 1], [0, 2], [0.9, 0.7])
    write_deploy(tmp_path / "nms", "model.onnx", ["scratch", "dent"], nms="in_model")
    build_raw_model(tmp_path / "raw" / "model.onnx")
    write_deploy(tmp_path / "raw", "model.onnx", ["scratch", "dent"], nms="host")
    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        cv2.imwrite(str(src / f"img{i}.png"), rng.integers(0, 256, (50 + 20 * i, 90, 3), dtype=np.uint8))
    cv2.imwrite(str(src / "red.jpg"), np.full((96, 128, 3), (0, 0, 255), np.uint8))
    (src / "bad.png").write_bytes(b"not a png")
    for form in ("nms", "raw"):
        box_out, host_out = tmp_path / f"box_{form}.jsonl", tmp_path / f"host_{form}.jsonl"
        proc = edgebox_run(
            ["sh", "-c", f"python --version && python -m edge_runtime predict --model {tmp_path / form} "
                         f"--source {src} --out {box_out} --threads 1 --score-threshold 0.2"],
            [tmp_path], timeout=240, check=False)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "Python 3.9" in proc.stdout and "5 images:" in proc.stdout and "1 unreadable" in proc.stdout
        assert "onnxruntime 1.19" in proc.stderr  # the box's own runtime, not the host's
        predict_folder(tmp_path / form, src, host_out, RuntimeSettings(score_threshold=0.2), threads=1)
        box, host = _lines(box_out), _lines(host_out)
        assert sorted(box) == sorted(host)
        for name, rec in host.items():
            other = box[name]
            assert other.get("verdict") == rec.get("verdict") and ("error" in other) == ("error" in rec), name
            assert [d["class_id"] for d in other.get("detections", [])] == [d["class_id"] for d in rec.get("detections", [])]
            for a, b in zip(other.get("detections", []), rec.get("detections", [])):
                assert a["score"] == pytest.approx(b["score"], abs=1e-4)
                assert a["box"] == pytest.approx(b["box"], abs=0.02)
