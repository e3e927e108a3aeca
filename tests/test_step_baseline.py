"""The step baseline's advantages: the leave-one-out scale and means, without a loop over rows."""

import pytest
import torch

from rlr_backend.estimators.step_baseline import scaled_advantages


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


def test_a_data_parallel_run_refuses_the_step_baseline_in_one_line(monkeypatch, tmp_path):
    """Its 2-process run drifts from the 1-process one (tests/test_distributed.py's check fails by 2e-2): refused."""
    from rlr_backend.choices import ConfigError
    from rlr_backend.train import TrainConfig, trainer

    two = trainer.DataParallel(rank=0, world_size=2)  # what process 0 of 2 gets (no process group needed here)
    monkeypatch.setattr(trainer.DataParallel, "from_environment", classmethod(lambda cls, *a: two))
    with pytest.raises(ConfigError, match="step-baseline does not yet give the 1-process result"):
        trainer.Trainer(TrainConfig(output_dir=tmp_path, reward="jpeg_compressibility"), progress=False)  # auto: rlr
    assert trainer.Trainer(TrainConfig(output_dir=tmp_path), progress=False).config.estimator == "truncated_bp"  # not RLR
