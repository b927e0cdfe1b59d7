"""PaddleSlim PTQ of a real (tiny, 2-epoch) PP-YOLOE+ export: INT8 QDQ program with int8 weights, loadable by
the edge runtime's paddle backend, outputs close to the FP32 parent; algorithm and calibration-set refusals;
the vectorized KL search equals paddle's own."""
from __future__ import annotations

import numpy as np
import pytest

from compress.pipeline import calibration_images
from compress.ptq import ALGOS, check_algo, conv_sensitivity, kl_threshold, ptq_paddle, quantization_summary
from edge_runtime.errors import UserInputError
from edge_runtime.modelspec import ModelSpec, file_sha256

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ptq_variant(tiny_spec, tiny_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("ptq") / "ptq-int8"
    calib = calibration_images(tiny_spec, 4)
    return ptq_paddle(tiny_spec, tiny_export.directory, out, calib, algo="avg", progress=False), calib


def test_kl_threshold_equals_paddles_own():
    from paddle.static.quantization.cal_kl_threshold import cal_kl_threshold

    rng = np.random.default_rng(4)
    bins = np.arange(2048)
    for decay in (150, 600):
        hist = (rng.exponential(1.0, 2048) * rng.integers(0, 3, 2048) * 500 * np.exp(-bins / decay)).astype(np.int64)
        hist[1700:] = 0 if decay == 600 else hist[1700:]
        assert kl_threshold(hist, 0.02, 8) == cal_kl_threshold(hist, 0.02, 8)


def test_algorithms_are_checked_before_any_work(tiny_spec, tmp_path):
    assert check_algo("kl") == "KL" and check_algo("HIST") == "hist" and ALGOS == ("KL", "hist", "mse", "avg")
    with pytest.raises(UserInputError, match=r"'minmax' is not supported; choose one of KL, hist, mse, avg"):
        ptq_paddle(tiny_spec, tmp_path / "no-export", tmp_path / "out", [], algo="minmax")
    assert not (tmp_path / "out").exists()


def test_missing_or_empty_calibration_set_is_refused(tiny_spec, tiny_export, tmp_path):
    with pytest.raises(UserInputError, match=f"no calibration images in {tiny_spec.paths.images}"):
        ptq_paddle(tiny_spec, tiny_export.directory, tmp_path / "a", [], progress=False)
    gone = tiny_spec.paths.images / "not-there.jpg"
    with pytest.raises(UserInputError, match=rf"1 calibration image\(s\) missing in {tiny_spec.paths.images}: {gone}"):
        ptq_paddle(tiny_spec, tiny_export.directory, tmp_path / "b", [gone], progress=False)
    with pytest.raises(UserInputError, match="model_nonms.pdmodel .* does not exist: export the run first"):
        ptq_paddle(tiny_spec, tmp_path, tmp_path / "c", calibration_images(tiny_spec, 1), progress=False)


def test_int8_program_has_qdq_ops_and_int8_weights(ptq_variant, tiny_export):
    v, calib = ptq_variant
    assert (v.name, v.method, v.parent) == ("ptq-int8", "ptq", "fp32")
    deploy = ModelSpec.load(v.deploy_json)
    (entry,) = deploy.models
    assert (entry.file, entry.format, entry.precision, entry.nms) == ("model_nonms.pdmodel", "paddle", "int8", "host")
    assert entry.sha256 == file_sha256(v.export_dir / entry.file) and entry.runtime_version.startswith("paddle 2.6")
    summary = quantization_summary(v.export_dir / "model_nonms.pdmodel")
    assert summary["quantize_linear"] > 50 and summary["convs_int8"] > 50
    assert summary["int8_weights"] == summary["quantized_weights"] > 50  # stored as int8 (scales per channel)
    assert summary["convs_fp32"] == [s["weight"] for s in v.recipe["skipped"]]
    fp32_params = (tiny_export.directory / "model_nonms.pdiparams").stat().st_size
    assert (v.export_dir / "model_nonms.pdiparams").stat().st_size < 0.4 * fp32_params
    r = v.recipe
    assert r["algo"] == "avg" and r["weights"] == "channel_wise_abs_max" and r["calibration_images"] == 4
    assert r["calibration_files"] == [p.name for p in calib] and r["rounds"][0]["skipped"] == 0


def test_int8_runs_in_the_edge_runtime_close_to_fp32(ptq_variant, tiny_export):
    import cv2

    from edge_runtime.predict import Detector
    from edge_runtime.preprocess import preprocess

    v, calib = ptq_variant
    fp32 = Detector.from_model(tiny_export.directory / "model_nonms.pdmodel", backend="paddle")
    int8 = Detector.from_model(v.export_dir / "model_nonms.pdmodel", backend="paddle")
    assert int8.backend.name == "paddle"
    for path in calib[:2]:
        image, scale = preprocess(cv2.imread(str(path)), fp32.spec.input)
        feeds = {"image": image, "scale_factor": scale}
        (box_a, score_a), (box_b, score_b) = fp32.backend.infer(feeds), int8.backend.infer(feeds)
        assert box_a.shape == box_b.shape and score_a.shape == score_b.shape
        # the tiny run starts from the base weights: real, confident anchors, which simulated INT8 moves a little;
        # the background (most anchors) stays put. A broken quantization (e.g. pred_cls quantized: scores capped
        # near 0.5, STACK.md) moves the median and the tail far beyond these bounds.
        d = np.abs(score_a - score_b)
        assert score_a.max() > 0.05, "the FP32 model detects nothing (background ~0.013): the comparison would be vacuous"
        assert np.median(d) < 2e-3 and np.quantile(d, 0.99) < 0.05 and d.max() < 0.3, np.quantile(d, [0.5, 0.99, 1])
        # boxes in pixels of the 128 x 96 image: most anchors move by a fraction of a pixel's worth of range
        assert np.median(np.abs(box_a - box_b)) < 0.05 * np.abs(box_a).max()
        assert len(int8(cv2.imread(str(path)))) > 0


def test_conv_sensitivity_is_measured_per_weight(ptq_variant, tiny_export, tiny_spec):
    from compress.ptq import calibration_feeds, feed_names

    v, calib = ptq_variant
    src = tiny_export.directory / "model_nonms.pdmodel"
    feeds = calibration_feeds(calib[:2], ModelSpec.load(src), feed_names(src))
    lost = conv_sensitivity(tiny_export.directory, v.export_dir, "model_nonms", feeds)
    assert len(lost) == quantization_summary(v.export_dir / "model_nonms.pdmodel")["quantized_weights"]
    assert all(k.endswith(".w_0") for k in lost) and all(np.isfinite(x) for x in lost.values())
    assert max(lost.values()) > 0  # quantization noise is visible somewhere
