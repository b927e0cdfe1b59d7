"""The accuracy gate and the comparison table: verdicts from figures, golden checks on a real export,
the same COCO evaluation through two backends, and the table files."""
from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest

from compress.gate import GoldenCheck, choose_golden, golden_check, judge
from compress.table import to_csv, to_markdown, write_table
from compress.variants import Variant, list_variants, load_variant
from edge_runtime.errors import UserInputError


def _eval(m: float) -> dict:
    return {"map50_95": m, "map50": min(1.0, m + 0.2)}


def test_judge_passes_within_the_limit_and_refuses_beyond_it_with_figures():
    ok = GoldenCheck(images=4)
    passed = judge("ort-int8", "fp32", 0.700, 0.693, ok, max_map_drop=1.0)
    assert passed.passed and passed.map_drop_pts == pytest.approx(0.7)
    refused = judge("prune-30", "fp32", 0.700, 0.680, ok, max_map_drop=1.0)
    assert not refused.passed
    assert "dropped 2.00 points (limit 1.00): 0.7000 -> 0.6800" in refused.reasons[0]
    assert "REFUSED" in refused.line() and "+2.00 pt" in refused.line()
    better = judge("qat-int8", "fp32", 0.700, 0.720, ok, max_map_drop=1.0)
    assert better.passed and better.map_drop_pts < 0


def test_judge_refuses_golden_mismatches_verdict_flips_and_no_golden():
    bad = GoldenCheck(images=3, mismatched={"b.png": "expected short 0.91 at [1,2,3,4]: no match"},
                      verdict_flips=["c.png"])
    r = judge("ptq-int8", "fp32", 0.5, 0.5, bad, 1.0)
    assert not r.passed
    assert any("golden b.png: expected short" in x for x in r.reasons)
    assert any("OK/NG verdict differs on c.png" in x for x in r.reasons)
    none = judge("ptq-int8", "fp32", 0.5, 0.5, GoldenCheck(images=0), 1.0)
    assert not none.passed and "no golden image" in none.reasons[0]


def _noisy_copy(src_dir, dst_dir, scale: float):
    """A copy of the export whose host-NMS ONNX has every weight perturbed (a "broken compression")."""
    import onnx
    from onnx import numpy_helper

    from edge_runtime.modelspec import ModelSpec, file_sha256

    shutil.copytree(src_dir, dst_dir)
    path = dst_dir / "model_nonms.onnx"
    model = onnx.load(str(path))
    rng = np.random.default_rng(0)
    # paddle2onnx stores weights as Constant nodes, not graph initializers
    for node in model.graph.node:
        if node.op_type != "Constant":
            continue
        attr = node.attribute[0]
        arr = numpy_helper.to_array(attr.t)
        if arr.dtype == np.float32 and arr.size > 16:
            noisy = (arr * (1 + scale * rng.standard_normal(arr.shape))).astype(np.float32)
            attr.t.CopyFrom(numpy_helper.from_array(noisy, attr.t.name))
    onnx.save(model, str(path))
    import dataclasses

    spec = ModelSpec.load(dst_dir / "deploy.json")
    spec.models = [dataclasses.replace(m, sha256=file_sha256(dst_dir / m.file)) for m in spec.models]
    spec.save(dst_dir / "deploy.json")
    return path


@pytest.fixture(scope="module")
def base(base_run, base_export):
    from detect.run_settings import load_run_spec

    spec = load_run_spec(base_run.root)
    val = json.loads(spec.paths.val.read_text())["images"]
    return spec, base_export.directory, [spec.paths.images / im["file_name"] for im in val]


def test_golden_check_on_a_real_detector(base, tmp_path):
    spec, export, images = base
    same = golden_check(export / "model_nonms.onnx", export / "model_nonms.pdmodel", images, spec)
    assert same.ok and same.images == len(images) == 12
    broken = _noisy_copy(export, tmp_path / "broken", scale=0.3)
    diff = golden_check(export / "model_nonms.onnx", broken, images, spec)
    assert not diff.ok and diff.mismatched
    r = judge("broken", "fp32", 0.7, 0.7, diff, 1.0)
    assert not r.passed and any(x.startswith("golden ") for x in r.reasons)


def test_choose_golden_takes_unambiguous_ng_and_ok_parts(base):
    spec, export, images = base
    picked = choose_golden(export / "model_nonms.onnx", spec, count=4)
    assert 2 <= len(picked) <= 4
    assert choose_golden(export / "model_nonms.onnx", spec, count=4, margin=0.6) == []  # every score is within 0.6 of 0.5


def test_gate_limits_and_decisions_are_the_run_settings(base):
    """One source: the gate's limits are the typed compress section, its OK/NG decisions the runtime section
    (the same object the bundle ships and the drift reference is built with)."""
    from compress.gate import gate_settings, runtime_config

    spec, _, _ = base
    changed = spec.with_cli({"compress": {"max_map_drop": 2.5, "golden_score_tol": 0.1, "golden_min_score": 0.4},
                             "runtime": {"class_thresholds": {spec.classes[0]: 0.35}}})
    max_drop, tol, runtime = gate_settings(changed)
    assert max_drop == 2.5 and tol.score == 0.1 and tol.min_score == 0.4
    assert tol.box_px == spec.settings.compress.golden_box_px
    assert runtime is changed.settings.runtime is runtime_config(changed)
    assert runtime.thresholds_for(spec.classes)[0] == pytest.approx(0.35)
    assert gate_settings(spec)[0] == spec.settings.compress.max_map_drop == 1.0


def test_same_coco_evaluation_through_two_backends(base):
    from compress.measure import evaluate_model

    spec, export, _ = base
    a = evaluate_model(export / "model_nonms.onnx", spec, backend="onnxruntime", progress=False)
    b = evaluate_model(export / "model_nonms.pdmodel", spec, backend="paddle", progress=False)
    assert a.images == b.images == 12
    assert a.map50 > 0.8  # the base detector really detects this line's defects
    assert abs(a.map50_95 - b.map50_95) < 1e-3 and abs(a.map50 - b.map50) < 1e-3


def _variants(tmp_path):
    parent = Variant("fp32", "fp32", None, tmp_path / "export", eval=_eval(0.70), gflops=2.0, size_mb=30.0,
                     latency_ms={"onnxruntime@1": 50.0, "onnxruntime@2": 31.0, "paddle@2": 60.0})
    good = Variant("ort-int8", "ptq", "fp32", tmp_path / "c" / "ort-int8", eval=_eval(0.695), gflops=2.0,
                   size_mb=8.0, latency_ms={"onnxruntime@1": 38.0, "onnxruntime@2": 23.0},
                   gate=judge("ort-int8", "fp32", 0.70, 0.695, GoldenCheck(4), 1.0).to_dict())
    bad = Variant("prune-30", "prune", "fp32", tmp_path / "c" / "prune-30", eval=_eval(0.60), gflops=1.4,
                  size_mb=20.0, latency_ms={"onnxruntime@2": 24.0},
                  gate=judge("prune-30", "fp32", 0.70, 0.60, GoldenCheck(4), 1.0).to_dict())
    return [parent, good, bad]


def test_table_markdown_csv_png(tmp_path):
    vs = _variants(tmp_path)
    md = to_markdown(vs)
    assert "| ort-int8 | ptq | 0.6950 |" in md and "| passed |" in md
    assert "**prune-30 refused:** mAP50-95 dropped 10.00 points" in md
    rows = list(csv.reader(io.StringIO(to_csv(vs))))
    assert rows[0][:3] == ["variant", "method", "mAP50-95"]
    assert "onnxruntime@2 ms" in rows[0] and "paddle@2 ms" in rows[0]
    assert rows[2][rows[0].index("onnxruntime@2 ms")] == "23.0"
    assert rows[3][rows[0].index("Δ mAP50-95 (pt)")] == "-10.00"
    paths = write_table(tmp_path / "run", vs, "demo")
    assert paths.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths.markdown.read_text().startswith("# Compression of demo")


def test_variant_files_round_trip_and_missing_variant_is_named(tmp_path):
    run = tmp_path / "run"
    for v in _variants(tmp_path):
        v.save(run)
    names = [v.name for v in list_variants(run)]
    assert names == ["fp32", "ort-int8", "prune-30"]
    back = load_variant(run, "ort-int8")
    assert back.export_dir == (tmp_path / "c" / "ort-int8").resolve()
    assert back.gate["passed"] and back.latency_ms["onnxruntime@2"] == 23.0
    with pytest.raises(UserInputError, match="no variant 'qat-int8' \\(have: fp32, ort-int8, prune-30\\)"):
        load_variant(run, "qat-int8")
