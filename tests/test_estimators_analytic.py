"""Every estimator on the linear-Gaussian chain whose gradient is known in closed form (spec §5).

Unbiased estimators must match the exact gradient within 4 standard errors per coordinate; the
RLR checks enumerate every start j (stronger than sampling j). Biased ones must show their bias.
Seeds are fixed, so each test is deterministic.
"""

import pytest
import torch

from rlr_backend.estimators import (CodeCompatConfig, DDPOConfig, FullBPConfig, RLRConfig, TruncatedBPConfig,
                                    ZOConfig, code_compat_estimate, ddpo_estimate, full_bp_estimate, rlr_estimate,
                                    split_chain, truncated_bp_estimate, zo_estimate)
from rlr_backend.estimators.analytic_chain import collect_estimates, make_analytic_chain, z_scores

T, H = 8, 2


@pytest.fixture(scope="module")
def chain():
    return make_analytic_chain(d=3, num_steps=T, eta=1.0, seed=0)


@pytest.fixture(scope="module")
def exact(chain):
    return chain.per_step_gradient()  # (T, p) shares in sampler order


def test_closed_form_matches_monte_carlo_and_finite_differences(chain):
    from rlr_backend.sampling import sample_chain

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        traj = sample_chain(chain.model, chain.schedule, chain.prompts(), chain.sample_x_T(100_000, g), generator=g)
        mc = chain.reward(traj.final)
    assert abs(float(mc.mean()) - chain.expected_reward()) < 4 * float(mc.std()) / 100_000**0.5
    eps, total = 1e-5, chain.per_step_gradient().sum(0)
    with torch.no_grad():
        chain.model.u += eps
        up = chain.expected_reward()
        chain.model.u -= 2 * eps
        down = chain.expected_reward()
        chain.model.u += eps
    assert abs((up - down) / (2 * eps) - float(total[0])) < 1e-6


@pytest.mark.parametrize("j", range(2, T - H + 2))
def test_rlr_latent_lr_is_unbiased_for_every_j(chain, exact, j):
    est = collect_estimates(chain, rlr_estimate, n_calls=300, batch=128, seed=j, config=RLRConfig(h=H), j=j)
    assert z_scores(est, exact.sum(0)).max() < 4


@pytest.mark.parametrize("j", range(2, T - H + 2))
def test_rlr_param_2pt_is_unbiased_for_every_j(chain, exact, j):
    cfg = RLRConfig(h=H, zo_mode="param_2pt", nu=0.02)
    est = collect_estimates(chain, rlr_estimate, n_calls=400, batch=64, seed=j, config=cfg, j=j)
    assert z_scores(est, exact.sum(0)).max() < 4


@pytest.mark.parametrize("j", range(2, T - H + 2))
def test_rlr_param_1pt_is_unbiased_for_every_j(chain, exact, j):
    # batch-shared perturbations need a baseline independent of the batch: the constant J here
    cfg = RLRConfig(h=H, zo_mode="param_1pt", nu=0.02, baseline="none")
    est = collect_estimates(chain, rlr_estimate, n_calls=400, batch=64, seed=j, config=cfg, j=j,
                            reward_offset=chain.expected_reward())
    assert z_scores(est, exact.sum(0)).max() < 4


@pytest.mark.parametrize("h", [1, 3, 7])
def test_rlr_other_sub_chain_lengths_are_unbiased(chain, exact, h):
    est = collect_estimates(chain, rlr_estimate, n_calls=300, batch=128, seed=10 + h, config=RLRConfig(h=h))
    assert z_scores(est, exact.sum(0)).max() < 4


@pytest.mark.parametrize("j_dist,j_range", [("range", (4, 6)), ("softmax_gradnorm", None)])
def test_rlr_j_distributions_stay_unbiased(chain, exact, j_dist, j_range):
    cfg = RLRConfig(h=H, j_dist=j_dist, j_range=j_range)
    est = collect_estimates(chain, rlr_estimate, n_calls=300, batch=128, seed=3, config=cfg,
                            j_sampler=cfg.j_sampler())
    assert z_scores(est, exact.sum(0)).max() < 4


def test_rlr_with_non_differentiable_reward_moves_step_one_to_zo(chain, exact):
    from rlr_backend.estimators import ChainProblem

    split = split_chain(T, H, 3, reward_differentiable=False)
    assert split.fo == () and T - 1 in split.zo

    def est(problem, x_T, **kw):
        nd = ChainProblem(problem.model, problem.schedule, problem.prompts, problem.reward, problem.params,
                          reward_differentiable=False)
        return rlr_estimate(nd, x_T, **kw)

    out = collect_estimates(chain, est, n_calls=300, batch=128, seed=5, config=RLRConfig(h=H), j=3)
    assert z_scores(out, exact.sum(0)).max() < 4


@pytest.mark.parametrize("name,fn,cfg", [
    ("zo", zo_estimate, ZOConfig()),
    ("ddpo_ratio1", ddpo_estimate, DDPOConfig(clip_range=1.0, adv_clip=None, baseline="loo", step_reduction="sum")),
    ("full_bp", full_bp_estimate, FullBPConfig()),
    ("full_bp_ckpt", full_bp_estimate, FullBPConfig(use_checkpoint=True)),
])
def test_baselines_are_unbiased(chain, exact, name, fn, cfg):
    est = collect_estimates(chain, fn, n_calls=200, batch=128, seed=7, config=cfg)
    assert z_scores(est, exact.sum(0)).max() < 4


@pytest.mark.parametrize("k", [1, 2])
def test_truncated_backprop_estimates_only_the_last_k_shares(chain, exact, k):
    est = collect_estimates(chain, truncated_bp_estimate, n_calls=200, batch=128, seed=k,
                            config=TruncatedBPConfig(k=k))
    assert z_scores(est, exact[T - k:].sum(0)).max() < 4  # unbiased for what it keeps ...
    assert z_scores(est, exact.sum(0)).max() > 20  # ... and clearly biased for the gradient


def test_code_compat_is_biased(chain, exact):
    est = collect_estimates(chain, code_compat_estimate, n_calls=200, batch=128, seed=1, config=CodeCompatConfig())
    assert z_scores(est, exact.sum(0)).max() > 20


def test_rlr_terms_partition_the_chain():
    for n in (3, 8, 50):
        for h in range(1, n):
            for j in range(2, n - h + 2):
                s = split_chain(n, h, j)
                steps = sorted(s.fo + s.ho + s.zo)
                assert steps == list(range(n)) and len(s.ho) == h and s.fo == (n - 1,)


@pytest.mark.parametrize("zo_mode", ["latent_lr", "param_2pt"])
@pytest.mark.parametrize("j", [2, 4, T - H + 1])
def test_each_rlr_term_estimates_exactly_its_own_steps(chain, exact, j, zo_mode):
    """FO, HO and ZO alone (the others weighted 0) match the shares of their own step sets."""
    split = split_chain(T, H, j)
    for weights, steps in [((1.0, 0.0, 0.0), split.fo), ((0.0, 1.0, 0.0), split.ho), ((0.0, 0.0, 1.0), split.zo)]:
        cfg = RLRConfig(h=H, zo_mode=zo_mode, nu=0.02, weights=weights)
        est = collect_estimates(chain, rlr_estimate, n_calls=150, batch=256, seed=j, config=cfg, j=j)
        assert z_scores(est, exact[list(steps)].sum(0)).max() < 4, (weights, steps)


@pytest.mark.parametrize("j", range(4, T - H + 2))
def test_rlr_with_a_longer_first_order_part_is_unbiased_for_every_j(chain, exact, j):
    cfg = RLRConfig(h=H, fo_steps=3)
    est = collect_estimates(chain, rlr_estimate, n_calls=300, batch=128, seed=20 + j, config=cfg, j=j)
    assert z_scores(est, exact.sum(0)).max() < 4
    fo_only = collect_estimates(chain, rlr_estimate, n_calls=100, batch=128, seed=j,
                                config=RLRConfig(h=H, fo_steps=3, weights=(1.0, 0.0, 0.0)), j=j)
    assert z_scores(fo_only, exact[T - 3:].sum(0)).max() < 4


def test_rlr_at_batch_size_one_is_unbiased(chain, exact):
    """No leave-one-out partner: the running mean of earlier batches is the baseline (independent of the sample)."""
    from rlr_backend.estimators import BaselineState

    est = collect_estimates(chain, rlr_estimate, n_calls=300, batch=1, seed=31, config=RLRConfig(h=H),
                            baseline_state=BaselineState())
    assert z_scores(est, exact.sum(0)).max() < 4


@pytest.mark.parametrize("name,fn,cfg", [
    ("rlr", rlr_estimate, RLRConfig(h=H)),
    ("zo", zo_estimate, ZOConfig()),
    ("full_bp", full_bp_estimate, FullBPConfig()),
])
def test_nan_rewards_leave_every_term_on_one_scale(chain, exact, name, fn, cfg):
    """A third of the rows fail (rows independent of everything): every term averages over the valid rows
    alone, so the first-order and likelihood-ratio terms keep their relative weights and the sum its mean."""
    def holey(x):
        r = chain.reward(x)
        return torch.where(torch.arange(len(r)) % 3 == 0, torch.full_like(r, float("nan")), r)

    est = collect_estimates(chain, fn, n_calls=200, batch=96, seed=41, config=cfg, reward=holey)
    assert z_scores(est, exact.sum(0)).max() < 4


@pytest.mark.parametrize("j", [2, 4, T - H + 1])
def test_rlr_step_baseline_is_unbiased(chain, exact, j):
    """The per-step baseline c R(x0_hat(x_k)) depends only on the step's input and the other samples, so RLR
    stays unbiased (first, middle and last start j)."""
    est = collect_estimates(chain, rlr_estimate, n_calls=300, batch=128, seed=j,
                            config=RLRConfig(h=H, step_baseline=True), j=j)
    assert z_scores(est, exact.sum(0)).max() < 4
    if j == 2:  # it explains the reward that earlier steps' noise decided: the variance falls (0.50x here;
        # 50x on the embedded model, docs/estimators.md)
        plain = collect_estimates(chain, rlr_estimate, n_calls=300, batch=128, seed=j, config=RLRConfig(h=H), j=j)
        assert float(est.var(0).sum()) < 0.7 * float(plain.var(0).sum())


def test_zo_step_baseline_is_unbiased_and_lowers_the_variance(chain, exact):
    """REINFORCE on every step with each step's own baseline (as RLR's likelihood-ratio terms)."""
    est = collect_estimates(chain, zo_estimate, n_calls=200, batch=128, seed=7, config=ZOConfig(step_baseline=True))
    assert z_scores(est, exact.sum(0)).max() < 4
    plain = collect_estimates(chain, zo_estimate, n_calls=200, batch=128, seed=7, config=ZOConfig())
    assert float(est.var(0).sum()) < 0.7 * float(plain.var(0).sum())


def test_a_step_baseline_that_sees_the_steps_own_noise_is_caught(chain, exact, monkeypatch):
    """The check above can fail: a baseline from the step's *output* x_{k+1} (it depends on eps_k) is biased."""
    from rlr_backend.estimators import rlr as rlr_module
    from rlr_backend.estimators import step_baseline

    def leaky(problem, traj, rewards, steps, kind, clip=None):
        shifted = type(traj)(traj.latents, traj.noises, traj.log_probs, traj.schedule, traj.prompts, traj.final,
                             traj.x0_hats[1:] + [traj.final])  # x0_hat at step k+1's input
        return step_baseline.step_advantages(problem, shifted, rewards, steps, kind, clip)

    monkeypatch.setattr(rlr_module, "step_advantages", leaky)
    est = collect_estimates(chain, rlr_estimate, n_calls=300, batch=128, seed=2,
                            config=RLRConfig(h=H, step_baseline=True), j=4)
    assert z_scores(est, exact.sum(0)).max() > 4
