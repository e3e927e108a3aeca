"""Bad settings fail early with errors that say what to change; NaNs are counted, never applied."""

import pytest
import torch

from rlr_backend.estimators import (ChainProblem, DDPOConfig, JSampler, RecomputationMismatch, RewardOutputError,
                                    RLRConfig, compute_advantages, ddpo_estimate, get_estimator, rlr_estimate)
from rlr_backend.estimators.analytic_chain import make_analytic_chain


@pytest.fixture
def chain():
    return make_analytic_chain(num_steps=8)


def problem_for(chain, reward=None, schedule=None, model=None):
    return ChainProblem(model or chain.model, schedule or chain.schedule, chain.prompts(), reward or chain.reward,
                        chain.params)


def x_T(chain, b=4):
    return chain.sample_x_T(b, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("h,match", [(0, "h must be >= 1"), (8, "h <= T-fo_steps = 7"), (12, "h <= T-fo_steps")])
def test_sub_chain_length_is_checked(chain, h, match):
    with pytest.raises(ValueError, match=match):
        cfg = RLRConfig(h=h)
        rlr_estimate(problem_for(chain), x_T(chain), config=cfg)


def test_j_range_outside_the_chain_is_refused(chain):
    cfg = RLRConfig(h=2, j_dist="range", j_range=(1, 5))
    with pytest.raises(ValueError, match=r"must lie inside 2\.\.7"):
        cfg.check(problem_for(chain))
    with pytest.raises(ValueError, match="needs j_range"):
        JSampler("range").support(8, 2)


def test_deterministic_sampler_is_refused_for_likelihood_ratio_terms(chain):
    det = chain.schedule.with_eta(0.0)
    with pytest.raises(ValueError, match="set eta > 0"):
        RLRConfig().check(problem_for(chain, schedule=det))
    with pytest.raises(ValueError, match="set eta > 0"):
        ddpo_estimate(problem_for(chain, schedule=det), x_T(chain))


def test_param_1pt_with_batch_baseline_is_refused():
    with pytest.raises(ValueError, match="baseline='ema'"):
        RLRConfig(zo_mode="param_1pt", baseline="loo")


@pytest.mark.parametrize("bad", [
    {"zo_mode": "latent"}, {"baseline": "mean"}, {"nu": 0.0}, {"weights": (1.0, -1.0, 1.0)},
    {"j_dist": "softmax"}, {"j_dist": "range"}, {"fo_steps": 0}])
def test_unknown_or_invalid_options(bad):
    with pytest.raises(ValueError):
        RLRConfig(**bad)


def test_unknown_estimator_lists_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        get_estimator("ppo")


def test_reward_with_wrong_shape_is_refused(chain):
    with pytest.raises(RewardOutputError, match=r"shape \(4,\)"):
        rlr_estimate(problem_for(chain, reward=lambda x: chain.reward(x)[:, None]), x_T(chain))


def test_nan_rewards_are_counted_and_never_reach_the_gradient(chain):
    def flaky(x):
        r = chain.reward(x)
        return torch.where(torch.arange(len(r)) == 0, torch.full_like(r, float("nan")), r)

    for p in chain.params:
        p.grad = None
    est = rlr_estimate(problem_for(chain, reward=flaky), x_T(chain, 6), generator=torch.Generator().manual_seed(1))
    assert est.metrics["nonfinite_rewards"] == 1
    assert all(torch.isfinite(p.grad).all() for p in chain.params)
    assert any(p.grad.abs().sum() > 0 for p in chain.params)


def test_nonfinite_loss_is_skipped_and_counted(chain):
    for p in chain.params:
        p.grad = None
    est = rlr_estimate(problem_for(chain, reward=lambda x: chain.reward(x) * float("inf")), x_T(chain),
                       generator=torch.Generator().manual_seed(1))
    assert est.metrics["nonfinite_rewards"] == 4
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in chain.params)


class Noisy(torch.nn.Module):  # nondeterministic like dropout left on
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, t, cond):
        return self.inner(x, t, cond) + 0.01 * torch.randn_like(x)


def test_recomputation_mismatch_is_detected(chain):
    with pytest.raises(RecomputationMismatch, match="not deterministic"):
        rlr_estimate(problem_for(chain, model=Noisy(chain.model)), x_T(chain), config=RLRConfig(h=3), j=3)


@pytest.mark.parametrize("name,kw", [
    ("rlr h=1", {"config": RLRConfig(h=1)}),  # the half-order term is one likelihood ratio: nothing recomputed before it
    ("rlr zo only", {"config": RLRConfig(h=2, weights=(0.0, 0.0, 1.0))}),
    ("rlr ho only", {"config": RLRConfig(h=2, weights=(0.0, 1.0, 0.0)), "j": 7}),
    ("zo", {}),
    ("ddpo", {}),
    ("code_compat", {}),
])
def test_every_likelihood_ratio_term_checks_its_recomputed_step(chain, name, kw):
    """A likelihood ratio taken at a recomputed mean that does not reproduce the sampled step would
    score the wrong noise: every such term checks it, not only the half-order sub-chain with h > 1."""
    fn = get_estimator(name.split()[0]).fn
    problem = problem_for(chain, model=Noisy(chain.model))
    with pytest.raises(RecomputationMismatch, match="not deterministic"):
        fn(problem, x_T(chain), generator=torch.Generator().manual_seed(0), **kw)


def test_leave_one_out_is_per_prompt_and_ignores_nan():
    r = torch.tensor([1.0, 3.0, 10.0, 20.0, float("nan")])
    groups = torch.tensor([0, 0, 1, 1, 1])
    adv = compute_advantages(r, "loo", groups=groups)
    torch.testing.assert_close(adv, torch.tensor([-2.0, 2.0, -10.0, 10.0, 0.0]))


def test_a_lone_sample_is_compared_with_earlier_batches_not_given_zero():
    """One valid sample (batch size 1, or the rest NaN) has no leave-one-out partner: its baseline is the
    running mean of earlier batches (its prompt's when known), 0 before the first, never its own reward."""
    from rlr_backend.estimators import BaselineState

    state = BaselineState()
    first = compute_advantages(torch.tensor([2.0]), "loo", groups=torch.tensor([0]), state=state)
    torch.testing.assert_close(first, torch.tensor([2.0]))  # no history yet: b = 0
    second = compute_advantages(torch.tensor([5.0, float("nan")]), "loo", groups=torch.tensor([0, 1]), state=state)
    torch.testing.assert_close(second, torch.tensor([3.0, 0.0]))  # b = prompt 0's earlier mean, 2
    other = compute_advantages(torch.tensor([1.0]), "loo", groups=torch.tensor([7]), state=state)
    assert float(other) == pytest.approx(1.0 - state_mean_before(2.0, 5.0, state.ema_decay))  # unseen prompt: all prompts
    torch.testing.assert_close(compute_advantages(torch.tensor([4.0]), "loo"), torch.tensor([4.0]))  # no state: b = 0


def state_mean_before(a: float, b: float, decay: float) -> float:
    return decay * a + (1 - decay) * b


def test_batch_of_one_keeps_its_likelihood_ratio_terms(chain):
    from rlr_backend.estimators import BaselineState

    state, g = BaselineState(), torch.Generator().manual_seed(3)
    cfg = RLRConfig(h=2, weights=(0.0, 1.0, 1.0))  # HO and ZO only: all of them use the advantage
    norms = []
    for _ in range(3):
        for p in chain.params:
            p.grad = None
        rlr_estimate(problem_for(chain), chain.sample_x_T(1, g), config=cfg, generator=g, baseline_state=state)
        norms.append(sum(float(p.grad.norm()) for p in chain.params if p.grad is not None))
    assert all(n > 0 for n in norms), norms


class _InfGradOnRowZero(torch.autograd.Function):
    """Identity whose backward overflows on row 0 (a reward whose value is fine but whose gradient is not)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[0] = grad[0] * float("inf")
        return grad


BACKPROP = [("full_bp", {}), ("truncated_bp", {}), ("code_compat", {}), ("rlr", {"config": RLRConfig(h=2)})]


def _grads_after(chain, name, reward, kw):
    for p in chain.params:
        p.grad = None
    est = get_estimator(name).fn(problem_for(chain, reward=reward), x_T(chain, 6),
                                 generator=torch.Generator().manual_seed(2), **kw)
    return [p.grad for p in chain.params], est.metrics


@pytest.mark.parametrize("name,kw", BACKPROP)
def test_rows_with_a_nan_reward_are_detached_from_the_reward_gradient(chain, name, kw):
    """Row 0's reward is NaN and so is its derivative (sqrt of a negative number): the other rows still train."""
    def broken_row(x):
        shift = torch.where(torch.arange(len(x)) == 0, -1.0, 1.0).to(x.dtype)
        return chain.reward(x) + torch.sqrt(shift + 0 * x[:, 0])

    grads, metrics = _grads_after(chain, name, broken_row, kw)
    assert metrics["nonfinite_rewards"] == 1
    assert all(g is not None and torch.isfinite(g).all() for g in grads), grads
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name,kw", BACKPROP)
def test_a_term_whose_gradient_overflows_is_dropped_and_counted(chain, name, kw):
    """The reward is finite but its backward pass is not for one row: the loss is finite, the gradient
    is not. The term is dropped (never written into .grad) and counted in nonfinite_terms."""
    grads, metrics = _grads_after(chain, name, lambda x: chain.reward(_InfGradOnRowZero.apply(x)), kw)
    assert all(g is None or torch.isfinite(g).all() for g in grads), grads
    assert metrics.get("nonfinite_terms", 0) >= 1


class _Counting(torch.nn.Module):
    """Counts model calls, and those whose output is back-propagated."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.forwards, self.backwards = inner, 0, 0

    def forward(self, x, t, cond):
        out = self.inner(x, t, cond)
        self.forwards += 1
        if out.requires_grad:
            out.register_hook(self._count_backward)
        return out

    def _count_backward(self, grad):
        self.backwards += 1


@pytest.mark.parametrize("name,kw", [
    ("rlr", {"config": RLRConfig(h=2)}), ("rlr", {"config": RLRConfig(h=3, fo_steps=2)}),
    ("rlr", {"config": RLRConfig(h=2, zo_mode="param_2pt")}), ("ddpo", {}), ("zo", {}), ("full_bp", {}),
    ("truncated_bp", {}), ("code_compat", {}),
])
def test_reported_model_calls_are_the_calls_made(chain, name, kw):
    """model_calls and model_calls_with_grad (the cost figures of the benchmarks) count what ran: every
    forward, and the forwards whose output was back-propagated. code_compat drops its PPO terms when a
    draw hits its deterministic last step (about a quarter of the calls at T=8, chain_len=2)."""
    model = _Counting(chain.model)
    problem = problem_for(chain, model=model)
    g = torch.Generator().manual_seed(5)
    calls = with_grad = 0.0
    for _ in range(24):
        for p in chain.params:
            p.grad = None
        m = get_estimator(name).fn(problem, x_T(chain), generator=g, **kw).metrics
        calls, with_grad = calls + m["model_calls"], with_grad + m["model_calls_with_grad"]
    assert (calls, with_grad) == (model.forwards, model.backwards)


@pytest.mark.parametrize("config,reason", [
    (RLRConfig(), None), (RLRConfig(baseline="ema"), None), (RLRConfig(h=1, fo_steps=3), None),
    (get_estimator("full_bp").config_cls(), None), (get_estimator("zo").config_cls(), None),
    (RLRConfig(baseline="batch_norm"), "batch's reward std"), (RLRConfig(baseline="per_prompt_norm"), "each prompt's"),
    (RLRConfig(adv_clip=2.0), "clipped to +-2"), (RLRConfig(weights=(1.0, 0.5, 1.0)), "unequal term weights"),
    (RLRConfig(zo_mode="param_2pt"), "O(nu^2)"),
    (DDPOConfig(), "each prompt's"), (DDPOConfig(baseline="loo", adv_clip=None), None),
    (get_estimator("truncated_bp").config_cls(k=2), "last 2 step"),
    (get_estimator("code_compat").config_cls(), "official code"),
])
def test_options_that_bias_the_estimator_are_named(config, reason):
    from rlr_backend.estimators import describe_estimator

    notes = describe_estimator(config)
    assert notes.unbiased == (reason is None)
    assert notes.metadata()["rlr_unbiased"] == ("true" if reason is None else "false")
    if reason is not None:
        assert reason in notes.metadata()["rlr_bias"]


def test_a_biased_estimator_says_so_once(chain, caplog):
    from rlr_backend.estimators.notes import forget_notices

    forget_notices()
    g = torch.Generator().manual_seed(0)
    with caplog.at_level("WARNING", logger="rlr_backend.estimators"):
        for _ in range(3):
            rlr_estimate(problem_for(chain), x_T(chain), config=RLRConfig(adv_clip=1.0), generator=g)
    lines = [r.getMessage() for r in caplog.records if "biased" in r.getMessage()]
    assert len(lines) == 1 and "clipped to +-1" in lines[0]


def test_a_non_differentiable_reward_dropping_the_first_order_part_is_said_once(chain, caplog):
    from rlr_backend.estimators import describe_estimator
    from rlr_backend.estimators.notes import forget_notices

    forget_notices()
    problem = ChainProblem(chain.model, chain.schedule, chain.prompts(), chain.reward, chain.params,
                           reward_differentiable=False)
    g = torch.Generator().manual_seed(0)
    with caplog.at_level("WARNING", logger="rlr_backend.estimators"):
        for _ in range(2):
            rlr_estimate(problem, x_T(chain), config=RLRConfig(fo_steps=3), generator=g)
    lines = [r.getMessage() for r in caplog.records if "fo_steps=3 is ignored" in r.getMessage()]
    assert len(lines) == 1
    assert "fo_steps=3" in describe_estimator(RLRConfig(fo_steps=3), False).metadata()["rlr_overrides"]
    assert "rlr_overrides" not in describe_estimator(RLRConfig(fo_steps=3), True).metadata()
