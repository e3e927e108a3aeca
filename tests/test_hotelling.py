"""Hotelling's T^2 test of benchmarks/quality.py: the F tail against tables, calibration on correlated
coordinates, and a 5% injected bias flagged while an unbiased estimator passes."""

import pytest
import torch


def test_f_distribution_tail_matches_tables():
    from benchmarks.hotelling import f_sf

    for f, d1, d2, p in [(3.3258, 5, 10, 0.05), (5.8489, 2, 20, 0.01), (2.228 ** 2, 1, 10, 0.05), (1.0, 7, 7, 0.5)]:
        assert f_sf(f, d1, d2) == pytest.approx(p, abs=2e-5)


def test_hotelling_is_calibrated_on_correlated_coordinates_after_projection():
    """Unbiased Gaussian estimates with strongly correlated coordinates and more coordinates (60) than
    estimates (24): both tests reject at the nominal 5% rate (400 repetitions: 20 +- 9 expected)."""
    from benchmarks.hotelling import one_sample, two_sample

    g = torch.Generator().manual_seed(0)
    idx = torch.arange(60, dtype=torch.float64)
    chol = torch.linalg.cholesky(0.9 ** (idx[:, None] - idx[None, :]).abs())

    def draw(n, scale):
        return (torch.randn(n, 60, generator=g, dtype=torch.float64) @ chol.T) * scale

    one = [one_sample(draw(24, 1.0), torch.zeros(60)) for _ in range(400)]
    two = [two_sample(draw(24, 1.0), draw(96, 0.2)) for _ in range(400)]
    assert one[0]["projected"] and one[0]["dims"] == 6
    for results in (one, two):
        assert 8 <= sum(r["p_value"] < 0.05 for r in results) <= 34


def test_hotelling_flags_a_5_percent_bias_and_passes_an_unbiased_estimator():
    """On the analytic chain (exact gradient known): RLR's estimates pass, against the exact gradient and
    against full-backprop estimates (as the UNet suite tests them); the same estimates shifted by 5% of the
    gradient fail, and so does truncated backprop."""
    from benchmarks.hotelling import one_sample, two_sample
    from rlr_backend.estimators import (FullBPConfig, RLRConfig, TruncatedBPConfig, full_bp_estimate, rlr_estimate,
                                        truncated_bp_estimate)
    from rlr_backend.estimators.analytic_chain import collect_estimates, make_analytic_chain

    chain = make_analytic_chain(d=3, num_steps=8, seed=0)
    exact = chain.per_step_gradient().sum(0)
    rlr = collect_estimates(chain, rlr_estimate, n_calls=400, batch=256, seed=3, config=RLRConfig(h=2))
    full = collect_estimates(chain, full_bp_estimate, n_calls=100, batch=64, seed=13, config=FullBPConfig())
    truncated = collect_estimates(chain, truncated_bp_estimate, n_calls=100, batch=64, seed=14,
                                  config=TruncatedBPConfig(k=2))
    assert one_sample(rlr, exact)["p_value"] > 0.05 and two_sample(rlr, full)["p_value"] > 0.05
    assert one_sample(full, exact)["p_value"] > 0.05
    shifted = rlr + 0.05 * exact
    assert one_sample(shifted, exact)["p_value"] < 1e-6 and two_sample(shifted, full)["p_value"] < 1e-6
    assert two_sample(truncated, full)["p_value"] < 1e-6
