"""The edge runtime on a real PP-YOLOE+ export (trained by the session fixture), through its CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from detect.compare import compare_models

ROOT = Path(__file__).resolve().parent.parent


def test_host_nms_matches_in_model_nms_on_real_detector(base_run, base_export):
    # the base detector really detects (the 2-epoch tiny run scores everything at the 0.01 floor, where a 0.02
    # cut compares two empty sets); the same weights with NMS in the graph and NMS on the host must agree
    from detect.run_settings import load_run_spec

    images = sorted(load_run_spec(base_run.root).paths.images.iterdir())[:6]
    agreement = compare_models(base_export.files["onnx"], base_export.files["onnx_nonms"], images, min_score=0.3,
                               backend_a="onnxruntime", backend_b="onnxruntime", threads=1)
    print("in-model NMS vs host NMS:", agreement.summary())
    assert agreement.images == 6
    assert agreement.matched >= 6  # real detections compared: at least one per image on average
    assert not agreement.count_mismatches
    assert agreement.max_box_rel < 1e-3 and agreement.max_score_abs < 1e-4


def test_python_m_edge_runtime_predict_writes_one_line_per_image(tiny_spec, tiny_export, tmp_path):
    out = tmp_path / "preds.jsonl"
    ann = tmp_path / "ann"
    proc = subprocess.run([sys.executable, "-m", "edge_runtime", "predict", "--model", str(tiny_export.files["onnx_nonms"]),
                           "--source", str(tiny_spec.paths.images), "--out", str(out), "--save-annotated", str(ann),
                           "--score-threshold", "0.05", "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(list(tiny_spec.paths.images.iterdir()))
    for row in rows:
        assert row["verdict"] in ("OK", "NG")
        assert all(d["class"] in tiny_spec.classes for d in row["detections"])
    assert len(list(ann.glob("*.png"))) >= 1
