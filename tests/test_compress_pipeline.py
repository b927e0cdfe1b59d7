"""`defectkit compress` end to end on a real detector: each method makes its variants, every variant is
evaluated, timed and judged by the gate against the FP32 parent, and the table shows them side by side."""
from __future__ import annotations

import csv
import shutil

import pytest

from compress.pipeline import compress_layer, compress_run, load_run
from compress.variants import list_variants
from defectkit.cli import main

FAST = {"calib_images": 8, "golden_images": 4, "latency_threads": [1, 2]}


@pytest.fixture()
def run_copy(base_run, base_export, tmp_path):
    """A private copy of the base run (each test writes its own compress/ folder)."""
    dst = tmp_path / "run"
    shutil.copytree(base_run.root, dst, ignore=shutil.ignore_patterns("compress"))
    return dst


def _spec(run, **compress):
    """The run's spec with ``--set`` values on top, as `defectkit compress` builds it (once per command)."""
    return load_run(run)[0].with_cli(compress_layer({"compress": compress}))


def _check_measured(v, parent, run):
    import hashlib

    assert v.eval is not None and v.eval_model and v.size_mb > 0
    assert v.gate is not None and v.gate["parent_map50_95"] == pytest.approx(parent.map50_95)
    assert v.gate["variant_map50_95"] == pytest.approx(v.map50_95)
    assert v.gate["golden"]["images"] == 4  # FAST: golden_images 4
    assert v.gate["passed"] == (not v.gate["reasons"])
    # the variant names the run's settings.yaml it was made from, and this command's overrides
    sha = hashlib.sha256((run / "settings.yaml").read_bytes()).hexdigest()
    assert v.settings["run_settings"]["sha256"] == sha and v.settings["overrides"]["compress"]["golden_images"] == 4


def _passed(v):
    g = v.gate
    assert g["passed"] and g["reasons"] == [], g["reasons"]
    assert g["map_drop_pts"] <= g["max_map_drop"] == 1.0
    assert g["golden"]["mismatched"] == {} and g["golden"]["verdict_flips"] == []


def _refused_for_accuracy(v, res):
    g = v.gate
    assert not g["passed"] and g["map_drop_pts"] > g["max_map_drop"] == 1.0
    assert g["reasons"][0].startswith(f"mAP50-95 dropped {g['map_drop_pts']:.2f} points (limit 1.00)")
    assert any(m.startswith(f"gate REFUSED for {v.name}") for m in res.messages)


def test_ptq_makes_gated_int8_variants_and_a_table(run_copy):
    # avg calibration and one PaddleSlim round keep this test short; the defaults (KL, 8) run in the demo
    res = compress_run(run_copy, "ptq", _spec(run_copy, **FAST, ptq_algo="avg", ptq_max_fp32_convs=0), lite=False,
                       progress=False)
    by = {v.name: v for v in res.variants}
    assert set(by) == {"ort-int8", "ort-int8-fast", "ptq-int8"}  # compress.ort_recipes: default and fast
    for v in by.values():
        _check_measured(v, res.parent, run_copy)
    ort = by["ort-int8"]
    # the base detector keeps its accuracy in ONNX Runtime INT8 (sensitive convs kept FP32 by measurement) and in
    # PaddleSlim INT8 (avg calibration; measured drop -1.1 and 0.6 points): both pass, golden images unchanged
    _passed(ort)
    _passed(by["ptq-int8"])
    # the fast recipe (activations and element-wise ops in int8 too) on this 12-image set: measured -1.63 pt, so
    # refused here (on the demo line's 60 validation boards it passed: -0.13 pt); a refused variant is kept on disk
    # and never packed by `bundle` without --variant
    fast = by["ort-int8-fast"]
    assert fast.recipe["ops"] != ort.recipe["ops"] == ["Conv"] and "Sigmoid" in fast.recipe["ops"]
    _refused_for_accuracy(fast, res)
    assert ort.size_mb < 0.5 * res.parent.size_mb
    assert {"onnxruntime@1", "onnxruntime@2"} <= set(ort.latency_ms)
    rows = list(csv.reader(res.table.csv.open()))
    assert [r[0] for r in rows[1:]] == ["fp32", "ort-int8", "ort-int8-fast", "ptq-int8"]
    assert res.table.png.stat().st_size > 10_000
    assert any(m.startswith("gate PASSED for ort-int8") for m in res.messages)


def test_prune_30_percent_flops_is_gated_with_figures(run_copy):
    res = compress_run(run_copy, "prune", _spec(run_copy, **{**FAST, "prune_epochs": 1, "latency_threads": [2]}),
                       lite=False, progress=False)
    (v,) = res.variants
    _check_measured(v, res.parent, run_copy)
    assert v.name == "prune-30" and v.gflops is not None and res.parent.gflops is not None
    assert v.gflops <= 0.75 * res.parent.gflops  # about -30 % FLOPs, measured
    assert v.recipe["gflops_before"] == pytest.approx(res.parent.gflops, rel=0.05)
    # one recovery epoch (4 steps on 36 boards) cannot make up for 30 % fewer FLOPs: mAP50-95 collapses
    # (measured 0.723 -> 0.009) and parts flip from NG to OK on the golden images; the gate refuses it
    _refused_for_accuracy(v, res)
    assert v.gate["golden"]["verdict_flips"] and any(r.startswith("OK/NG verdict differs") for r in v.gate["reasons"])


def test_qat_variant_is_gated(run_copy):
    res = compress_run(run_copy, "qat", _spec(run_copy, **{**FAST, "qat_epochs": 1, "latency_threads": [2]}),
                       lite=False, progress=False)
    (v,) = res.variants
    _check_measured(v, res.parent, run_copy)
    assert v.name == "qat-int8" and v.method == "qat"
    # one QAT epoch from the parent's weights keeps the golden detections within the self-test tolerance and the
    # mAP50-95 (measured 0.723 -> 0.733 since QAT's step assigns task-aligned from its first step, near-centre
    # anchors for thin boxes; it lost 1.9 points with the ATSS phase and ppdet's rule): passed
    _passed(v)
    assert v.settings["train"]["lr"] == pytest.approx(0.01 * 0.1)  # the run's train.lr x compress.qat_lr_factor


def test_cli_compress_refuses_an_unknown_setting_and_a_missing_run(tmp_path, capsys):
    assert main(["compress", str(tmp_path / "nope"), "--method", "ptq"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compress", str(tmp_path), "--method", "distill"])


def test_cli_compress_unknown_key_is_named(run_copy, capsys):
    assert main(["compress", str(run_copy), "--method", "ptq", "--set", "calib_image=4"]) == 2
    assert "did you mean 'calib_images'" in capsys.readouterr().err.lower()
    assert list_variants(run_copy) == []  # refused before anything was written


def test_compress_changes_only_the_compress_section_of_the_run(run_copy, capsys):
    """Everything but compress.* is the run's: the bundle reads it back from settings.yaml and must see what the
    gate judged with, so another section on the command line (or in a spec handed in) is refused up front."""
    from edge_runtime.errors import ConfigError

    assert main(["compress", str(run_copy), "--method", "ptq", "--set", "train.lr=0.1"]) == 2
    assert "--set train.lr: compress only overrides compress.* settings; 'train' settings are the run's" in (
        capsys.readouterr().err)
    spec = load_run(run_copy)[0].with_cli({"runtime": {"score_threshold": 0.4}})
    with pytest.raises(ConfigError, match=r"only compress\.\* may change\): runtime\.score_threshold: 0\.5 -> 0\.4"):
        compress_run(run_copy, "ptq", spec, lite=False, progress=False)
    assert list_variants(run_copy) == []
