"""`defectkit compress` end to end on a real detector: each method makes its variants, every variant is
evaluated, timed and judged by the gate against the FP32 parent, and the table shows them side by side."""
from __future__ import annotations

import csv
import shutil

import pytest

from compress.pipeline import compress_run
from compress.variants import list_variants
from defectkit.cli import main

FAST = {"calib_images": 8, "golden_images": 4, "latency_threads": [1, 2]}


@pytest.fixture()
def run_copy(base_run, base_export, tmp_path):
    """A private copy of the base run (each test writes its own compress/ folder)."""
    dst = tmp_path / "run"
    shutil.copytree(base_run.root, dst, ignore=shutil.ignore_patterns("compress"))
    return dst


def _check_measured(v, parent):
    assert v.eval is not None and v.eval_model and v.size_mb > 0
    assert v.gate is not None and v.gate["parent_map50_95"] == pytest.approx(parent.map50_95)
    assert v.gate["golden"]["images"] >= 2
    assert v.gate["passed"] == (not v.gate["reasons"])


def test_ptq_makes_gated_int8_variants_and_a_table(run_copy):
    # avg calibration and one PaddleSlim round keep this test short; the defaults (KL, 8) run in the demo
    res = compress_run(run_copy, "ptq", {**FAST, "ptq_algo": "avg", "ptq_max_fp32_convs": 0}, lite=False,
                       progress=False)
    by = {v.name: v for v in res.variants}
    assert set(by) == {"ort-int8", "ptq-int8"}
    for v in by.values():
        _check_measured(v, res.parent)
    ort = by["ort-int8"]
    # the base detector keeps its accuracy in ONNX Runtime INT8 (sensitive convs kept FP32 by measurement)
    assert ort.gate["passed"], ort.gate["reasons"]
    assert ort.size_mb < 0.5 * res.parent.size_mb
    assert {"onnxruntime@1", "onnxruntime@2"} <= set(ort.latency_ms)
    rows = list(csv.reader(res.table.csv.open()))
    assert [r[0] for r in rows[1:]] == ["fp32", "ort-int8", "ptq-int8"]
    assert res.table.png.stat().st_size > 10_000
    assert any(m.startswith("gate PASSED for ort-int8") for m in res.messages)


def test_prune_30_percent_flops_is_gated_with_figures(run_copy):
    res = compress_run(run_copy, "prune", {**FAST, "prune_epochs": 1, "latency_threads": [2]}, lite=False,
                       progress=False)
    (v,) = res.variants
    _check_measured(v, res.parent)
    assert v.name == "prune-30" and v.gflops is not None and res.parent.gflops is not None
    assert v.gflops <= 0.75 * res.parent.gflops  # about -30 % FLOPs, measured
    assert v.recipe["gflops_before"] == pytest.approx(res.parent.gflops, rel=0.05)
    line = next(m for m in res.messages if "prune-30" in m and m.startswith("gate"))
    assert "mAP50-95" in line and "limit 1.00" in line  # passed or refused, the figures are shown


def test_qat_variant_is_gated(run_copy):
    res = compress_run(run_copy, "qat", {**FAST, "qat_epochs": 1, "latency_threads": [2]}, lite=False,
                       progress=False)
    (v,) = res.variants
    _check_measured(v, res.parent)
    assert v.name == "qat-int8" and v.method == "qat"


def test_cli_compress_refuses_an_unknown_setting_and_a_missing_run(tmp_path, capsys):
    assert main(["compress", str(tmp_path / "nope"), "--method", "ptq"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compress", str(tmp_path), "--method", "distill"])


def test_cli_compress_unknown_key_is_named(run_copy, capsys):
    assert main(["compress", str(run_copy), "--method", "ptq", "--set", "calib_image=4"]) == 2
    assert "did you mean 'calib_images'" in capsys.readouterr().err.lower()
    assert list_variants(run_copy) == []  # refused before anything was written
