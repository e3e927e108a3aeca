"""Every estimator on a flow-matching chain whose expected-reward gradient is known in closed form.

The flow counterpart of test_estimators_analytic.py: Gaussian data N(mu, tau^2) with the exact velocity as the
model, run through ``FlowSchedule`` (rlr_backend/estimators/analytic_flow.py). Unbiased estimators must match
the exact gradient within 4 standard errors per coordinate (RLR for every j and every ZO mode); biased ones
must show their bias; a chain with deterministic (ODE) steps is refused where a likelihood ratio is needed
there. Latents are 5-D (B, C, F, H, W). Seeds are fixed, so each test is deterministic.
"""

import pytest
import torch

from rlr_backend.estimators import (ChainProblem, DDPOConfig, FullBPConfig, RLRConfig, TruncatedBPConfig, ZOConfig,
                                    ddpo_estimate, full_bp_estimate, rlr_estimate, split_chain, truncated_bp_estimate,
                                    zo_estimate)
from rlr_backend.estimators.analytic_chain import collect_estimates, z_scores
from rlr_backend.estimators.analytic_flow import make_analytic_flow_chain
from rlr_backend.estimators.partition import likelihood_ratio_steps
from rlr_backend.sampling import sample_chain

T, H = 6, 2
JS = range(2, T - H + 2)  # every half-order start j (paper order)
RATIO_ONE = DDPOConfig(clip_range=1.0, adv_clip=None, baseline="loo", step_reduction="sum")  # REINFORCE


@pytest.fixture(scope="module")
def sde():
    return make_analytic_flow_chain(T, kind="flow_sde", eta=0.7)


@pytest.fixture(scope="module")
def cps():
    return make_analytic_flow_chain(T, kind="cps", eta=0.8)  # its last step (to sigma = 0) is deterministic


@pytest.fixture(scope="module")
def window():
    return make_analytic_flow_chain(T, kind="flow_sde", eta=0.7, sde_window=(1, 3))  # SDE on steps 1..3 only


def problem_for(chain):
    return ChainProblem(chain.model, chain.schedule, chain.prompts(), chain.reward, chain.params)


@pytest.mark.parametrize("name", ["sde", "cps", "window"])
def test_closed_form_matches_monte_carlo_and_finite_differences(name, request):
    chain = request.getfixturevalue(name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        traj = sample_chain(chain.model, chain.schedule, chain.prompts(), chain.sample_x_T(100_000, g), generator=g)
        mc = chain.reward(traj.final)
    assert traj.final.dim() == 5
    assert abs(float(mc.mean()) - chain.expected_reward()) < 4 * float(mc.std()) / 100_000**0.5
    total, eps = chain.per_step_gradient().sum(0), 1e-5
    for p, i, col in [(chain.model.tau, (), 0), (chain.model.mu, (0, 1, 0, 1), 4)]:
        with torch.no_grad():
            p[i] += eps
            up = chain.expected_reward()
            p[i] -= 2 * eps
            down = chain.expected_reward()
            p[i] += eps
        assert abs((up - down) / (2 * eps) - float(total[col])) < 1e-6


def test_flow_chain_spreads_the_gradient_over_its_steps(sde, cps, window):
    """The premise of the tests below: every step but the first carries a share that the tests resolve, so a
    term that drops or doubles a step shows (the first step's tau-share is 0 exactly: v does not depend on tau
    at sigma = 1)."""
    for chain in (sde, cps):
        norms = chain.per_step_gradient().norm(dim=1)
        assert bool((norms[1:] > 0.1).all()) and float(norms[0]) > 0.01
    assert window.schedule.sde_steps == (1, 2, 3) and cps.schedule.sde_steps == tuple(range(T - 1))


# --- RLR: every j, every ZO mode --------------------------------------------------------------------------------

ZO_CASES = {  # zo_mode -> (config, calls, batch, subtract the exact J as a constant baseline)
    "latent_lr": (RLRConfig(h=H), 60, 512, False),
    # the parameter-space modes' noise comes from the random directions, not the batch: average directions
    "param_2pt": (RLRConfig(h=H, zo_mode="param_2pt", nu=0.02, zo_directions=4), 60, 128, False),
    # batch-shared perturbations need a baseline independent of the batch: the constant J here
    "param_1pt": (RLRConfig(h=H, zo_mode="param_1pt", nu=0.05, baseline="none"), 150, 1024, True),
}


@pytest.mark.parametrize("zo_mode", list(ZO_CASES))
@pytest.mark.parametrize("j", JS)
def test_rlr_is_unbiased_on_the_flow_sde_chain_for_every_j(sde, j, zo_mode):
    cfg, calls, batch, offset = ZO_CASES[zo_mode]
    exact = sde.per_step_gradient().sum(0)
    est = collect_estimates(sde, rlr_estimate, n_calls=calls, batch=batch, seed=100 * j, config=cfg, j=j,
                            reward_offset=sde.expected_reward() if offset else 0.0)
    assert z_scores(est, exact).max() < 4


@pytest.mark.parametrize("j", JS)
def test_rlr_is_unbiased_on_the_cps_chain_whose_last_step_is_deterministic(cps, j):
    """The first-order term backpropagates through the deterministic last step; no likelihood ratio is taken there."""
    est = collect_estimates(cps, rlr_estimate, n_calls=60, batch=512, seed=j, config=RLRConfig(h=H), j=j)
    assert z_scores(est, cps.per_step_gradient().sum(0)).max() < 4


def test_each_rlr_term_estimates_exactly_its_own_flow_steps(sde):
    """FO, HO and ZO alone (the others weighted 0) match the shares of their own step sets: a term that borrows
    the wrong noise or step shows here even where the sum would hide it."""
    j, exact = 3, sde.per_step_gradient()
    split = split_chain(T, H, j)
    for weights, steps in [((1.0, 0.0, 0.0), split.fo), ((0.0, 1.0, 0.0), split.ho), ((0.0, 0.0, 1.0), split.zo)]:
        est = collect_estimates(sde, rlr_estimate, n_calls=60, batch=512, seed=7, j=j,
                                config=RLRConfig(h=H, weights=weights))
        assert z_scores(est, exact[list(steps)].sum(0)).max() < 4, (weights, steps)


# --- baselines ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,fn,cfg", [
    ("ddpo_ratio1", ddpo_estimate, RATIO_ONE),
    ("zo", zo_estimate, ZOConfig()),
    ("full_bp", full_bp_estimate, FullBPConfig()),
])
def test_baselines_are_unbiased_on_the_flow_sde_chain(sde, name, fn, cfg):
    est = collect_estimates(sde, fn, n_calls=60, batch=512, seed=11, config=cfg)
    assert z_scores(est, sde.per_step_gradient().sum(0)).max() < 4


@pytest.mark.parametrize("k", [1, 2])
def test_truncated_backprop_keeps_only_the_last_k_flow_steps(sde, k):
    exact = sde.per_step_gradient()
    est = collect_estimates(sde, truncated_bp_estimate, n_calls=60, batch=512, seed=k, config=TruncatedBPConfig(k=k))
    assert z_scores(est, exact[T - k:].sum(0)).max() < 4  # unbiased for what it keeps ...
    assert z_scores(est, exact.sum(0)).max() > 20  # ... and clearly biased for the gradient


# --- deterministic steps: a window of SDE steps, cps's last step ------------------------------------------------

def test_likelihood_ratio_steps_are_those_of_the_chain_split():
    """The steps RLR's check requires to be stochastic are exactly those where some j's split takes a ratio."""
    for n in (3, 6, 9):
        for h in range(1, n):
            for fo in range(1, n - h + 1):
                js = range(fo + 1, n - h + 2)
                for latent in (True, False):
                    for diff in (True, False):
                        f = fo if diff else 1
                        want = set()
                        for j in range(f + 1, n - h + 2):
                            s = split_chain(n, h, j, reward_differentiable=diff, fo_steps=f)
                            want |= {s.ho[-1], *(s.zo if latent else ())}
                        got = likelihood_ratio_steps(n, h, range(f + 1, n - h + 2), latent_zo=latent,
                                                     reward_differentiable=diff, fo_steps=f)
                        assert got == want, (n, h, fo, latent, diff, js)


def test_estimators_refuse_a_likelihood_ratio_at_a_deterministic_step(window, cps):
    p = problem_for(window)
    with pytest.raises(ValueError, match=r"sampler steps \[0, 4\].*deterministic.*j values \[3, 4, 5\]"):
        RLRConfig(h=H).check(p)  # latent ZO needs every zeroth-order step stochastic
    with pytest.raises(ValueError, match=r"sampler steps \[4\] \(the half-order term's last step for each j\)"):
        RLRConfig(h=H, zo_mode="param_2pt").check(p)  # j = 2 ends S on step 4, an ODE step
    RLRConfig(h=H, zo_mode="param_2pt", j_dist="range", j_range=(3, 5)).check(p)  # S ends inside the window
    for fn, cfg in [(ddpo_estimate, DDPOConfig()), (zo_estimate, ZOConfig())]:
        with pytest.raises(ValueError, match="deterministic"):
            fn(p, window.sample_x_T(4, torch.Generator().manual_seed(0)), config=cfg)
    with pytest.raises(ValueError, match=r"steps \[5\] are deterministic.*skip_deterministic"):
        DDPOConfig().check(problem_for(cps))
    with pytest.raises(ValueError, match="every step of the chain is deterministic"):
        ode = ChainProblem(cps.model, cps.schedule.with_eta(0.0), cps.prompts(), cps.reward, cps.params)
        DDPOConfig(skip_deterministic=True).check(ode)


def test_rlr_with_likelihood_ratios_inside_the_sde_window_is_unbiased(window):
    """Parameter-space ZO needs no likelihood ratio; j in 3..5 ends the half-order sub-chain inside the window, and
    the first-order term runs through the ODE steps: the full gradient, ODE steps' shares included."""
    cfg = RLRConfig(h=H, zo_mode="param_2pt", nu=0.02, j_dist="range", j_range=(3, 5))
    est = collect_estimates(window, rlr_estimate, n_calls=90, batch=512, seed=5, config=cfg,
                            j_sampler=cfg.j_sampler())
    assert z_scores(est, window.per_step_gradient().sum(0)).max() < 4


@pytest.mark.parametrize("name,trained", [("window", [1, 2, 3]), ("cps", list(range(T - 1)))])
def test_ddpo_skipping_deterministic_steps_estimates_the_stochastic_steps_shares(name, trained, request):
    """MixGRPO-style window training: unbiased for the stochastic steps' shares, and it shows its bias (measured:
    47 standard errors off the gradient on the window chain, 10 on cps, whose dropped last step carries 10 % of
    the gradient)."""
    chain = request.getfixturevalue(name)
    exact = chain.per_step_gradient()
    cfg = DDPOConfig(clip_range=1.0, adv_clip=None, baseline="loo", step_reduction="sum", skip_deterministic=True)
    est = collect_estimates(chain, ddpo_estimate, n_calls=60, batch=512, seed=13, config=cfg)
    assert z_scores(est, exact[trained].sum(0)).max() < 4
    assert z_scores(est, exact.sum(0)).max() > 6
