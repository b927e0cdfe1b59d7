"""The numpy statistics of edge_runtime.drift against scipy (installed in the dev venv, not on the edge box)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as ss

from edge_runtime.drift.stats import (
    adjust_p_values,
    chi2_homogeneity,
    chi2_sf,
    kolmogorov_sf,
    ks_2samp,
    psi,
    smoothed_shares,
)


def test_kolmogorov_sf_matches_scipy_kstwobign_over_the_whole_range():
    xs = np.concatenate([np.linspace(0.0, 4.0, 401), [1e-3, 0.999999, 1.000001, 7.0]])
    got = np.array([kolmogorov_sf(x) for x in xs])
    np.testing.assert_allclose(got, ss.kstwobign.sf(xs), atol=1e-13, rtol=0)
    tail = np.linspace(2.0, 5.0, 31)  # relative accuracy where alarms are decided
    np.testing.assert_allclose([kolmogorov_sf(x) for x in tail], ss.kstwobign.sf(tail), rtol=1e-10)


@pytest.mark.parametrize("n,m,shift,discrete", [(200, 1000, 0.0, False), (200, 2000, 0.25, False),
                                                (500, 500, 0.1, False), (120, 800, 0.0, True), (300, 1500, 1.0, True)])
def test_ks_2samp_statistic_exact_and_p_value_close_to_scipy_asymp(n, m, shift, discrete):
    rng = np.random.default_rng(n + m)
    a, b = rng.normal(0, 1, n), rng.normal(shift, 1, m)
    if discrete:  # ties, like detections per frame
        a, b = np.round(a * 1.5), np.round(b * 1.5)
    d, p = ks_2samp(a, b)
    ref = ss.ks_2samp(a, b, method="asymp")
    assert d == pytest.approx(ref.statistic, abs=1e-12)
    # scipy's asymp mode uses the exact one-sample law at n = round(n m / (n + m)); Stephens' corrected
    # Kolmogorov series tracks it within 0.012 absolute and 10 % relative in the tail
    assert p == pytest.approx(ref.pvalue, abs=0.012, rel=0.1)
    en = n * m / (n + m)
    _, p_limit = ks_2samp(a, b, finite_n_correction=False)
    assert p_limit == pytest.approx(ss.kstwobign.sf(np.sqrt(en) * d), abs=1e-13)


def test_ks_2samp_identical_and_disjoint_samples_and_empty_input():
    x = np.arange(100.0)
    assert ks_2samp(x, x) == (0.0, 1.0)
    d, p = ks_2samp(x, x + 1000)
    assert d == 1.0 and p < 1e-30
    with pytest.raises(ValueError, match="non-empty"):
        ks_2samp(x, np.array([]))


def test_psi_known_value_by_hand():
    # (a - e) ln(a / e) summed: 0.15 ln 2.5 + 0.05 ln 1.25 + 0.05 ln 1.2 + 0.15 ln 1.6 = 0.228217...
    assert psi([0.25] * 4, [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.228217, abs=1e-6)
    assert psi([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert psi([0.2, 0.8], [0.8, 0.2]) == pytest.approx(2 * 0.6 * np.log(4), rel=1e-12)  # symmetric


def test_psi_refuses_zero_shares_and_length_mismatch_with_the_fix():
    with pytest.raises(ValueError, match="smooth empty bins"):
        psi([0.5, 0.5], [1.0, 0.0])
    with pytest.raises(ValueError, match="same length"):
        psi([0.5, 0.5], [1.0])
    shares = smoothed_shares(np.array([10, 0, 0]), alpha=0.5)
    assert shares.sum() == pytest.approx(1.0) and shares.min() > 0
    assert shares[1] == pytest.approx(0.5 / 11.5)


@pytest.mark.parametrize("dof", [1, 2, 3, 6, 9, 25, 80])
def test_chi2_sf_matches_scipy(dof):
    xs = np.concatenate([np.linspace(0, 4 * dof + 60, 200), [1e-9]])
    got = np.array([chi2_sf(x, dof) for x in xs])
    want = ss.chi2.sf(xs, dof)
    np.testing.assert_allclose(got, want, atol=1e-13)
    tail = want > 1e-200
    np.testing.assert_allclose(got[tail], want[tail], rtol=1e-9)


def test_chi2_homogeneity_matches_scipy_contingency():
    ref = np.array([400, 300, 250, 0])
    win = np.array([30, 60, 90, 0])  # the empty category is dropped (dof 2)
    stat, p, dof = chi2_homogeneity(ref, win)
    s_stat, s_p, s_dof, _ = ss.chi2_contingency(np.vstack([ref, win])[:, :3], correction=False)
    assert (stat, dof) == (pytest.approx(s_stat, rel=1e-12), s_dof)
    assert p == pytest.approx(s_p, rel=1e-9)
    stat2, p2, _ = chi2_homogeneity(ref, win, design_effect=2.0)
    assert stat2 == pytest.approx(stat / 2) and p2 > p
    assert chi2_homogeneity(ref, np.zeros(4)) == (0.0, 1.0, 0)


def test_adjust_p_values_bonferroni_fdr_none():
    p = [0.01, 0.04, 0.03, 0.005, 0.5]
    assert adjust_p_values(p, "bonferroni") == pytest.approx([0.05, 0.2, 0.15, 0.025, 1.0])
    np.testing.assert_allclose(adjust_p_values(p, "fdr"), ss.false_discovery_control(p), rtol=1e-12)
    assert adjust_p_values(p, "none") == p
    with pytest.raises(ValueError, match="bonferroni"):
        adjust_p_values(p, "holm")


def test_ks_statistic_equals_scipy_on_many_small_tied_samples():
    rng = np.random.default_rng(7)
    for _ in range(100):
        a = np.round(rng.normal(0, 1, rng.integers(1, 60)) * 2)
        b = np.round(rng.normal(0.3, 1, rng.integers(1, 60)) * 2)
        assert ks_2samp(a, b)[0] == pytest.approx(ss.ks_2samp(a, b).statistic, abs=1e-12)
        assert ks_2samp(b, a)[0] == pytest.approx(ss.ks_2samp(b, a).statistic, abs=1e-12)
