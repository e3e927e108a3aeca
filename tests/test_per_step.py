"""Per-step gradient shares (the truncation-bias map's and rlr-advise's measurement)."""

import pytest
import torch

from rlr_backend.estimators import ChainProblem, full_bp_estimate, truncated_bp_estimate
from rlr_backend.estimators.per_step import cosine_with_se, norm_ratio_with_se, per_step_gradients
from rlr_backend.estimators.analytic_chain import make_analytic_chain


def analytic_problem(chain):
    return ChainProblem(chain.model, chain.schedule, chain.prompts(), chain.reward, chain.params)


def test_shares_sum_to_full_backprop_and_their_tail_is_truncated_backprop():
    """Same noises: the sum of all shares is full_bp's gradient, the last K shares truncated_bp's (K = 1, 3)."""
    chain = make_analytic_chain(d=3, num_steps=6, seed=2)
    problem = analytic_problem(chain)
    x_T = chain.sample_x_T(16, torch.Generator().manual_seed(0))
    shares = per_step_gradients(problem, x_T, generator=torch.Generator().manual_seed(1))

    def grad_of(estimate, **kw) -> torch.Tensor:
        for p in chain.params:
            p.grad = None
        estimate(problem, x_T, generator=torch.Generator().manual_seed(1), **kw)
        return -torch.cat([p.grad.reshape(-1) for p in chain.params])

    assert torch.allclose(shares.full(), grad_of(full_bp_estimate), rtol=1e-9, atol=1e-10)
    from rlr_backend.estimators import TruncatedBPConfig

    for k in (1, 3):
        assert torch.allclose(shares.last(k), grad_of(truncated_bp_estimate, config=TruncatedBPConfig(k)),
                              rtol=1e-9, atol=1e-10)


def test_mean_shares_match_the_closed_form_per_step():
    chain = make_analytic_chain(d=3, num_steps=8, seed=0)
    problem, g = analytic_problem(chain), torch.Generator().manual_seed(3)
    runs = torch.stack([per_step_gradients(problem, chain.sample_x_T(64, g), generator=g).shares for _ in range(150)])
    exact = chain.per_step_gradient()
    z = (runs.mean(0) - exact).abs() / (runs.std(0) / runs.shape[0] ** 0.5)
    assert float(z.max()) < 4.5, z


def test_bias_map_shows_truncation_bias_and_none_for_full_backprop():
    """On the analytic chain the cosine and the norm ratio of truncated backprop's mean gradient to full
    backprop's are the known ones of (sum of the last K shares, sum of all) within their standard errors;
    full backprop's are exactly 1."""
    chain = make_analytic_chain(d=3, num_steps=8, seed=0)
    problem, g = analytic_problem(chain), torch.Generator().manual_seed(4)
    batches = [per_step_gradients(problem, chain.sample_x_T(64, g), generator=g) for _ in range(120)]
    exact = chain.per_step_gradient()
    full = torch.stack([b.full() for b in batches])
    for k in (1, 2, 4):
        trunc = torch.stack([b.last(k) for b in batches])
        cos, cos_se = cosine_with_se(trunc, full)
        ratio, ratio_se = norm_ratio_with_se(trunc, full)
        true_cos = float(torch.nn.functional.cosine_similarity(exact[-k:].sum(0), exact.sum(0), dim=0))
        true_ratio = float(exact[-k:].sum(0).norm() / exact.sum(0).norm())
        assert true_ratio < 0.8 and abs(ratio - true_ratio) < 4 * ratio_se, (k, ratio, true_ratio, ratio_se)
        assert abs(cos - true_cos) < 4 * cos_se + 1e-4, (k, cos, true_cos, cos_se)
    assert cosine_with_se(full, full)[0] == pytest.approx(1.0)
    assert norm_ratio_with_se(full, full) == pytest.approx((1.0, 0.0), abs=1e-9)
