"""The edge runtime is the leaf: it runs with numpy, cv2 and one inference runtime, nothing of the trainer.

A subprocess installs an import hook that makes paddle, ppdet, the kit's other packages, PyYAML, tqdm and
the onnx package unimportable, then imports the runtime and runs a real prediction through
``python -m edge_runtime``. (Python 3.9 compatibility itself is exercised in the edge-box root filesystem.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np

from tests.test_edge_onnx_models import RAW_BOXES, build_nms_model, write_deploy

ROOT = Path(__file__).resolve().parents[1]
TRAINER_SIDE = ["paddle", "ppdet", "paddleslim", "paddle2onnx", "detect", "compress", "fleet", "defectkit",
                "yaml", "tqdm", "onnx"]

HOOK = textwrap.dedent("""
    import sys
    BLOCKED = set({blocked!r})

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked: the edge runtime must not need it")
            return None

    sys.meta_path.insert(0, Block())
""")


def _run(code: str, blocked: list[str], cwd: Path) -> subprocess.CompletedProcess:
    script = HOOK.format(blocked=blocked) + textwrap.dedent(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=60)


def test_runtime_imports_and_predicts_without_the_trainer(tmp_path):
    export = tmp_path / "export"
    build_nms_model(export / "model.onnx", RAW_BOXES[:2], [0, 1], [0, 2], [0.9, 0.7])
    write_deploy(export, "model.onnx", ["scratch", "dent"], nms="in_model")
    (tmp_path / "imgs").mkdir()
    cv2.imwrite(str(tmp_path / "imgs" / "red.png"), np.full((40, 60, 3), (0, 0, 255), np.uint8))
    proc = _run(f"""
        import runpy
        import edge_runtime.predict, edge_runtime.cli, edge_runtime.draw, edge_runtime.decision
        import edge_runtime.backends.onnxruntime_backend, edge_runtime.backends.paddle_inference_backend
        sys.argv = ["edge_runtime", "predict", "--model", {str(export / "model.onnx")!r},
                    "--source", "imgs", "--out", "p.jsonl", "--threads", "1", "--save-annotated", "ann"]
        try:
            runpy.run_module("edge_runtime", run_name="__main__")
        except SystemExit as exc:
            code = exc.code
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print("EXIT", code, "LOADED", loaded)
    """, TRAINER_SIDE, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "EXIT 0 LOADED []" in proc.stdout, proc.stdout + proc.stderr
    assert "1 images: 1 NG, 0 OK" in proc.stdout
    record = json.loads((tmp_path / "p.jsonl").read_text())
    assert record["verdict"] == "NG" and record["detections"][0]["class"] == "scratch"
    assert (tmp_path / "ann" / "red.png").is_file()


def test_a_box_without_onnxruntime_still_imports_and_says_what_to_install(tmp_path):
    export = tmp_path / "export"
    build_nms_model(export / "model.onnx", RAW_BOXES[:1], [0], [0], [0.9])
    write_deploy(export, "model.onnx", ["scratch"], nms="in_model")
    (tmp_path / "imgs").mkdir()
    proc = _run(f"""
        import edge_runtime.predict, edge_runtime.cli
        from edge_runtime.cli import main
        code = main(["predict", "--model", {str(export / "model.onnx")!r}, "--source", "imgs"])
        print("EXIT", code)
    """, TRAINER_SIDE + ["onnxruntime"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "EXIT 3" in proc.stdout
    assert proc.stderr.strip() == ("edge_runtime predict: error: no installed backend can run this model: "
                                   "it needs onnxruntime. Install one, e.g.: pip install 'defectkit[edge]'")
