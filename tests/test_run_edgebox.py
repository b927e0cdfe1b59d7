"""THE BAR: in the edge box (Python 3.9), ``python -m edge_runtime run`` on an image folder with the ``.nb``
(Paddle Lite 2.13rc0) and with the ONNX model (ONNX Runtime 1.19) gives identical verdicts and one JSON
line per image.

One tiny paddle detector (no-NMS export form) becomes both models: paddle2onnx for the ONNX, the kit's
``rewrite_for_lite`` + ``opt_in_edgebox`` for the x86 ``.nb``. Both go into one signed bundle whose golden
expectations come from the paddle model on paddle.inference on the host; at start the box self-tests both backends against them.
"""
from __future__ import annotations

import json
import shutil

import pytest

from compress.bundle import ModelFile
from compress.lite_convert import edgebox_run, opt_in_edgebox, rewrite_for_lite
from tests.edgebox import ensure_edgebox
from tests.runkit import CLASSES, export_tiny_detector, make_bundle, make_keys, write_images
from tests.test_edge_onnx_models import write_deploy

pytestmark = [pytest.mark.edgebox, pytest.mark.timeout(300)]


def _lines(out_dir):
    files = sorted((out_dir / "predictions").glob("*.jsonl"))
    assert len(files) == 1, files
    return [json.loads(line) for line in files[0].read_text().splitlines()]


def test_nb_and_onnx_in_the_edge_box_give_identical_verdicts(tmp_path):
    ensure_edgebox()
    exp, onnx_path = export_tiny_detector(tmp_path / "exp")
    write_deploy(exp, "model.onnx", CLASSES, nms="host")
    rewrite_for_lite(exp, tmp_path / "fixed")
    lite = opt_in_edgebox(tmp_path / "fixed", tmp_path / "nb" / "tiny_x86", "x86")
    keys = make_keys(tmp_path)
    models = [ModelFile(onnx_path, "onnx", "any", "fp32", "host", None),
              ModelFile(lite.path, "paddlelite", "x86", "fp32", "host", lite.version)]
    golden = tmp_path / "golden_paddle"  # the golden set comes from the paddle model on paddle.inference
    golden.mkdir()
    for name in ("model.pdmodel", "model.pdiparams"):
        shutil.copyfile(exp / name, golden / name)
    write_deploy(golden, "model.pdmodel", CLASSES, nms="host", fmt="paddle")
    bundle = make_bundle(tmp_path, keys, models=models, onnx_model=onnx_path, golden_model=golden / "model.pdmodel",
                         golden_reds=(30, 120, 240))
    reds = [10, 40, 70, 100, 130, 160, 190, 220, 250, 25, 85, 145, 205, 235]
    images = write_images(tmp_path / "imgs", reds, seed=5)
    (tmp_path / "imgs" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 300)  # logged and skipped
    outs = {}
    for backend in ("paddlelite", "onnxruntime"):
        out = tmp_path / f"out_{backend}"
        out.mkdir()
        proc = edgebox_run(
            ["sh", "-c", f"python --version && python -m edge_runtime run --bundle {bundle.parent / '1.0.0.tar.gz'} "
                         f"--public-key {keys.public} --source {tmp_path / 'imgs'} --device-id box-{backend} "
                         f"--out {out} --backend {backend} --threads 1 --metrics-port -1 --score-threshold 0.8"],
            [tmp_path], timeout=240, check=False)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "Python 3.9" in proc.stdout
        # both backends were self-tested against the golden images at start, whichever inspects
        selftest = [ln for ln in proc.stderr.splitlines() if "defectkit.selftest: self-test of bundle 1.0.0" in ln]
        assert len(selftest) == 1 and "6/6 golden checks passed on " in selftest[0], proc.stderr  # 2 backends x 3
        assert "onnxruntime:model.onnx" in selftest[0] and "paddlelite:tiny_x86.nb" in selftest[0]
        assert f"on {backend}" in proc.stdout and "15 frames: " in proc.stdout and "1 skipped" in proc.stdout
        outs[backend] = _lines(out)
    lite_lines, ort_lines = outs["paddlelite"], outs["onnxruntime"]
    assert len(lite_lines) == len(ort_lines) == len(images) + 1  # one JSON line per image, the bad one too
    assert [r["source"] for r in lite_lines] == [r["source"] for r in ort_lines]
    assert [r.get("verdict") for r in lite_lines] == [r.get("verdict") for r in ort_lines]
    verdicts = [r["verdict"] for r in ort_lines if "verdict" in r]
    assert "NG" in verdicts and "OK" in verdicts  # the comparison means something
    bad = [r for r in ort_lines if "error" in r]
    assert len(bad) == 1 and bad[0]["source"].endswith("truncated.jpg") and "truncated JPEG" in bad[0]["error"]
    for a, b in zip(lite_lines, ort_lines):
        assert [d["class_id"] for d in a.get("detections", [])] == [d["class_id"] for d in b.get("detections", [])]
        for da, db in zip(a.get("detections", []), b.get("detections", [])):
            assert da["score"] == pytest.approx(db["score"], abs=1e-4)
            assert da["box"] == pytest.approx(db["box"], abs=0.02)
