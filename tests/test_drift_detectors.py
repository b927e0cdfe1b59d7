"""PSI, KS and categorical detectors: fit / score / predict, known values, the verdict dict, errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats as ss

from edge_runtime.drift import CategoricalDetector, KSDetector, PSIDetector
from edge_runtime.errors import DataError

VERDICT_KEYS = {"is_drift", "distance", "p_val", "threshold"}


def test_psi_detector_recovers_the_analytic_psi_of_a_mean_shift():
    rng = np.random.default_rng(0)
    det = PSIDetector(n_bins=10, threshold=0.25).fit(rng.normal(0, 1, 200_000))
    edges = det.edges
    assert edges.size == 9
    np.testing.assert_allclose(edges, ss.norm.ppf(np.linspace(0.1, 0.9, 9)), atol=0.02)
    shift = 0.5
    cdf = np.concatenate([[0.0], ss.norm.cdf(edges - shift), [1.0]])
    expected = psi_value = float(np.sum((np.diff(cdf) - 0.1) * np.log(np.diff(cdf) / 0.1)))
    got = det.score(rng.normal(shift, 1, 200_000)).distance
    assert got == pytest.approx(expected, abs=0.005)
    assert 0.2 < psi_value < 0.3  # a half-sigma shift is about the classic 0.25 alarm level
    same = det.score(rng.normal(0, 1, 200_000)).distance
    assert same < 0.001


def test_psi_detector_gives_discrete_features_one_bin_per_value():
    ref = np.repeat([0.0, 1.0, 2.0], [700, 250, 50])  # detections per frame
    det = PSIDetector(n_bins=10).fit(ref)
    np.testing.assert_array_equal(det.edges, [0.0, 1.0])  # bins: <=0, (0,1], >1
    np.testing.assert_allclose(det.ref_shares, (np.array([700, 250, 50]) + 0.5) / 1001.5)
    window = np.repeat([0.0, 1.0, 2.0, 5.0], [20, 40, 30, 10])
    shares_w = (np.array([20, 40, 40]) + 0.5) / 101.5
    want = float(np.sum((shares_w - det.ref_shares) * np.log(shares_w / det.ref_shares)))
    assert det.score(window).distance == pytest.approx(want, rel=1e-12)


def test_psi_detector_predict_dict_and_nan_handling():
    rng = np.random.default_rng(1)
    det = PSIDetector(n_bins=5, threshold=0.25).fit(rng.normal(0, 1, 5000))
    out = det.predict(np.concatenate([rng.normal(3, 1, 300), [np.nan, np.inf]]))
    assert set(out["data"]) == VERDICT_KEYS and out["meta"]["name"] == "PSIDetector" and out["meta"]["bins"] == 5
    assert out["data"]["is_drift"] == 1 and out["data"]["distance"] > 1 and out["data"]["p_val"] is None
    assert det.predict(rng.normal(0, 1, 300))["data"]["is_drift"] == 0
    assert math.isnan(det.score(np.array([np.nan])).distance)  # an empty window never raises


def test_detectors_refuse_to_score_before_fit_and_tiny_references():
    with pytest.raises(DataError, match="call fit"):
        PSIDetector().score(np.zeros(10))
    with pytest.raises(DataError, match="call fit"):
        KSDetector().predict(np.zeros(10))
    with pytest.raises(DataError, match="at least 10 are needed"):
        PSIDetector(min_samples=10).fit(np.array([1.0, 2.0, np.nan]))
    with pytest.raises(DataError, match="no finite values"):
        KSDetector().fit(np.array([np.nan]))
    with pytest.raises(DataError, match="at least 2"):
        PSIDetector(n_bins=1)


def test_ks_detector_matches_scipy_and_predicts_on_p_value():
    rng = np.random.default_rng(2)
    ref, win = rng.normal(0, 1, 2000), rng.normal(0.3, 1, 200)
    det = KSDetector(p_val=0.01).fit(ref)
    score = det.score(win)
    want = ss.ks_2samp(ref, win, method="asymp")
    assert score.distance == pytest.approx(want.statistic, abs=1e-12)
    assert score.p_val == pytest.approx(want.pvalue, abs=0.01, rel=0.1)
    out = det.predict(win)
    assert set(out["data"]) == VERDICT_KEYS and out["data"]["threshold"] == 0.01
    assert out["data"]["is_drift"] == int(score.p_val < 0.01)
    assert det.predict(rng.normal(0, 1, 200))["data"]["is_drift"] == 0


def test_categorical_detector_class_shares_and_design_effect():
    rng = np.random.default_rng(3)
    ref = rng.multinomial(2, [0.5, 0.3, 0.2], size=1000)  # 2 detections per frame
    det = CategoricalDetector(threshold=0.25, p_val=0.001, labels=("spot", "scratch", "stain")).fit(ref)
    assert det.ref_units == 1000 and det.ref_counts.sum() == 2000
    same = det.score(rng.multinomial(2, [0.5, 0.3, 0.2], size=200))
    assert same.distance < 0.05 and same.p_val > 0.001
    shifted = rng.multinomial(2, [0.1, 0.2, 0.7], size=200)
    score = det.score(shifted)
    assert score.distance > 0.25 and score.p_val < 1e-10
    # the statistic is divided by the pooled detections per frame with detections (2 here)
    plain = ss.chi2_contingency(np.vstack([ref.sum(0), shifted.sum(0)]), correction=False)[0]
    assert score.statistic == pytest.approx(plain / 2.0, rel=1e-9)
    out = det.predict(shifted)
    assert out["data"]["is_drift"] == 1 and out["meta"]["p_val_threshold"] == 0.001
    assert det.score(np.zeros((10, 3))).p_val == 1.0  # nothing detected: nothing to test


def test_categorical_detector_errors_name_the_shape():
    det = CategoricalDetector(labels=("ok", "ng")).fit_counts(np.array([90.0, 10.0]), 100)
    with pytest.raises(DataError, match=r"frames x 2"):
        det.score(np.zeros((5, 3)))
    with pytest.raises(DataError, match="2 labels for 3"):
        CategoricalDetector(labels=("ok", "ng")).fit_counts(np.array([1.0, 2.0, 3.0]), 3)
    with pytest.raises(DataError, match="non-negative"):
        CategoricalDetector().fit_counts(np.array([1.0, -2.0]), 3)
