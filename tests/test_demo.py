"""The demo chain at toy scale: every stage runs for real and the report holds what the README promises."""
from __future__ import annotations

import json

from defectkit.demo import run_demo


def test_demo_chain_writes_report_with_map_onnx_and_edge_predictions(tmp_path):
    result = run_demo(tmp_path / "demo", count=30, holdout=5, overrides={"epochs": 1, "batch_size": 4,
                                                                         "warmup_steps": 1},
                      # one quantization round each, few images: the chain, not the recipe, is under test here
                      compress_overrides={"ptq_algo": "avg", "ptq_max_fp32_convs": 0, "ort_max_fp32_convs": 1,
                                          "calib_images": 4, "golden_images": 2, "latency_threads": [2]})
    md = result.report_md.read_text()
    assert "mAP50" in md and "model.onnx" in md
    figures = json.loads(result.report_json.read_text())
    # one epoch from the kit's base detector (lines/pcb-demo.yaml): the fine-tuned model really detects the defects
    assert figures["val"]["map50"] > 0.5, figures["val"]
    metrics = json.loads((tmp_path / "demo" / "runs" / "pcb-demo" / "demo" / "metrics.json").read_text())
    assert figures["val"] == metrics["val"]
    onnx_path = tmp_path / "demo" / figures["export"]["onnx"] if not figures["export"]["onnx"].startswith("/") \
        else figures["export"]["onnx"]
    assert str(onnx_path).endswith("model.onnx")
    rows = open(figures["predictions"]).read().splitlines()
    assert len(rows) == 5 and figures["edge"]["images"] == 5
    assert all(json.loads(r)["verdict"] in ("OK", "NG") for r in rows)
    # compressed behind the gate, shipped as a signed bundle, inspected by the edge loop, reported back
    c = figures["compress"]
    names = {v["name"] for v in c["variants"]}
    assert {"fp32", "ort-int8", "ort-int8-fast", "ptq-int8"} <= names
    # the bundle holds FP32 and exactly the ONNX Runtime variants the gate passed; the box ran one of them
    passed = {v["name"] for v in c["variants"] if v["gate"] and v["name"].startswith("ort-")}
    assert c["shipped"][0] == "fp32" and set(c["shipped"]) == {"fp32", *passed}
    assert "## Compression" in md and "| fp32 | fp32 |" in md
    from edge_runtime.bundle import verify_bundle

    man = verify_bundle(c["bundle"], c["public_key"])
    assert man.version == "1.0.0" and man.golden
    from detect.run_settings import load_run_spec

    run_spec = load_run_spec(figures["run"])  # the box runs on the run's own runtime/drift/report settings
    assert man.settings.to_dict() == run_spec.settings.box_sections()
    assert run_spec.settings.train.epochs == 1 and run_spec.cli["train"]["epochs"] == 1  # the demo's overrides
    loop = figures["edge_loop"]
    assert loop["frames"] == 5 and loop["collector_frames"] == 5 and loop["errors"] == 0
    assert {m.variant for m in man.models} == set(c["shipped"])
    assert loop["variant"] in c["shipped"] and f"ran **{loop['variant']}**" in md
