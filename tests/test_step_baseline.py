"""The step baseline's advantages: the leave-one-out scale and means, without a loop over rows; a batch split
over processes gets the unsplit batch's."""

import threading

import pytest
import torch

from rlr_backend.estimators.problem import BatchShard, ChainProblem
from rlr_backend.estimators.step_baseline import scaled_advantages, step_advantages
from rlr_backend.sampling import DDIMSchedule, PromptSchedule, sample_chain


def _by_rows(r, b, groups, kind):
    """The definition, row by row: c from the other valid rows (least squares, clamped to [0, 1])."""
    valid = torch.isfinite(r)
    adv = torch.zeros_like(r)
    for i in valid.nonzero()[:, 0].tolist():
        others = valid.clone()
        others[i] = False
        c = 0.0
        if int(others.sum()) >= 2:
            ro, bo = r[others] - r[others].mean(), b[others] - b[others].mean()
            var = float((bo * bo).sum())
            c = min(max(float((ro * bo).sum()) / var, 0.0), 1.0) if var > 0 else 0.0
        adv[i] = r[i] - c * b[i]
        if kind == "loo" and bool(others.any()):
            mine = others & (groups == groups[i])
            pool = mine if bool(mine.any()) else others
            adv[i] -= (r[pool] - c * b[pool]).mean()
    return adv


@pytest.mark.parametrize("kind", ["loo", "none"])
def test_scaled_advantages_equal_their_row_by_row_definition(kind):
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        n = int(torch.randint(1, 12, (1,), generator=g))
        r = torch.randn(n, generator=g, dtype=torch.float64) + 3
        b = r * 2 * torch.rand(1, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
        if n > 3:
            r[1] = float("nan")  # a failed reward: A = 0, left out of every other row's statistics
        groups = torch.randint(0, 3, (n,), generator=g)
        assert torch.allclose(scaled_advantages(r, b, groups, kind), _by_rows(r, b, groups, kind), atol=1e-9)


def test_a_baseline_that_explains_the_reward_removes_it_and_a_useless_one_is_scaled_out():
    g = torch.Generator().manual_seed(1)
    r = torch.randn(16, generator=g, dtype=torch.float64)
    groups = torch.zeros(16, dtype=torch.long)
    assert scaled_advantages(r, r.clone(), groups).abs().max() < 1e-12  # b = R: nothing left to explain
    noise = 10 * torch.randn(16, generator=g, dtype=torch.float64)  # b unrelated to R, far larger
    plain = r - (r.sum() - r) / 15
    assert scaled_advantages(r, noise, groups).var() < 1.5 * plain.var()  # c near 0: not 100x the variance


class Collective:
    """``n`` shards run in threads; ``gather`` concatenates their tensors in rank order, as gloo's all_gather."""

    def __init__(self, n: int):
        self.slots, self.barrier = [None] * n, threading.Barrier(n, timeout=30)

    def gather(self, rank: int, t: torch.Tensor) -> torch.Tensor:
        self.slots[rank] = t
        self.barrier.wait()
        out = torch.cat(self.slots, 0)
        self.barrier.wait()  # nobody overwrites a slot before every shard has read it
        return out


class Scale(torch.nn.Module):
    def forward(self, x, t, cond):
        return 0.5 * x * (t + 1) / 1000 + cond


def test_shards_get_the_rows_of_the_whole_batch_step_advantages():
    """A batch split over 3 processes (threads here, gathering as the trainer's processes do) gets, at every
    step, the rows of the unsplit batch's advantages: the scale c and the means are fitted on the whole batch."""
    sched = DDIMSchedule.from_alphas_cumprod(torch.linspace(0.999, 0.01, 1000), 5, eta=1.0)
    prompts, x_T = PromptSchedule.constant(0.0, 5), torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    groups = torch.tensor([0, 0, 1, 1, 0, 0])  # prompt 0 in two shards

    def reward(x):
        return torch.tanh(x).sum(1) + x[:, 0] ** 2

    def problem(shard=None, rows=slice(None)):
        return ChainProblem(Scale(), sched, prompts, reward, [], groups=groups[rows], shard=shard)

    whole = problem()
    traj = sample_chain(whole.model, sched, prompts, x_T, generator=torch.Generator().manual_seed(3), keep_x0_hats=True)
    rewards = reward(traj.final)
    rewards[4] = float("nan")  # a failed reward is left out of every shard's statistics alike
    steps = [0, 2, 4]
    want, want_failed = step_advantages(whole, traj, rewards, steps, "loo")
    assert all(want[k].abs().max() > 1e-3 for k in steps)  # not trivially equal
    got, comm = {}, Collective(3)

    def run(rank: int) -> None:
        rows = slice(2 * rank, 2 * rank + 2)
        shard = BatchShard(rows.start, 2, 6, lambda t: comm.gather(rank, t), lambda t: t)
        part = sample_chain(whole.model, sched, prompts, x_T[rows], generator=torch.Generator().manual_seed(3),
                            noise_shard=(rows.start, 6), keep_x0_hats=True)
        got[rank] = step_advantages(problem(shard, rows), part, rewards[rows], steps, "loo")

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rank in range(3):
        adv, failed = got[rank]
        assert failed == want_failed
        for k in steps:
            torch.testing.assert_close(adv[k], want[k][2 * rank:2 * rank + 2], rtol=0, atol=1e-6)


def test_the_trainers_switch_reaches_rlr_and_zo_only():
    from rlr_backend.train import TrainConfig

    for est in ("rlr", "zo"):
        assert TrainConfig(estimator=est).estimator_config().step_baseline is True  # the trainer's default
        assert TrainConfig(estimator=est, step_baseline=False).estimator_config().step_baseline is False
    assert not hasattr(TrainConfig(estimator="ddpo").estimator_config(), "step_baseline")  # ddpo-pytorch's recipe
    with pytest.raises(ValueError, match="step_baseline needs baseline"):
        from rlr_backend.estimators import ZOConfig

        ZOConfig(baseline="batch_norm", step_baseline=True)


def test_the_sampler_keeps_x0_estimates_only_when_asked():
    """They cost as much memory as the latents: kept for the step baseline only, and it says when they are missing."""
    sched = DDIMSchedule.from_alphas_cumprod(torch.linspace(0.999, 0.01, 1000), 4, eta=1.0)
    prompts, x_T = PromptSchedule.constant(0.0, 4), torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    plain = sample_chain(Scale(), sched, prompts, x_T, generator=torch.Generator().manual_seed(1))
    kept = sample_chain(Scale(), sched, prompts, x_T, generator=torch.Generator().manual_seed(1), keep_x0_hats=True)
    assert plain.x0_hats == [] and len(kept.x0_hats) == 4
    for k in range(4):  # the estimate at step k's input, from the model's output there
        x = kept.latents[k]
        torch.testing.assert_close(kept.x0_hats[k], sched.predicted_x0(k, Scale()(x, sched.timesteps[k], 0.0), x))
    problem = ChainProblem(Scale(), sched, prompts, lambda x: x.sum(1), [])
    with pytest.raises(ValueError, match="keep_x0_hats=True"):
        step_advantages(problem, plain, plain.final.sum(1), [0], "loo")


def test_the_run_line_says_when_the_step_baseline_is_on(tmp_path, caplog):
    import logging

    from rlr_backend.train import TrainConfig, Trainer
    from rlr_backend.train.config import measured_lr

    tiny = dict(estimator="rlr", steps=1, batch_size=2, images_per_prompt=2, num_inference_steps=6, fo_steps=1,
                eval_every=0, output_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="rlr_backend.train.trainer"):
        for on in (True, False):
            Trainer(TrainConfig(**tiny, step_baseline=on, run_name=f"sb-{on}"), progress=False).run()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("run ")]
    sb_lr, plain_lr = measured_lr("rlr", True, True), measured_lr("rlr", False, True)  # each at its own default rate
    assert [f": rlr with the step baseline, lr {sb_lr:g}, 1 updates" in line for line in lines] == [True, False]
    assert f": rlr, lr {plain_lr:g}, 1 updates" in lines[1]
