"""A per-step baseline for the likelihood-ratio terms: the reward of the model's own x_0 estimate at the
step's input, scaled by a factor fitted on the other samples.

A likelihood-ratio term at step k weighs the score of that step's noise, (d mu_k / d theta)^T eps_k / sigma_k,
by an advantage A. Any baseline that depends only on what was drawn before eps_k (the step's input x_k, the
other samples of the batch) keeps the term unbiased, since E[eps_k | x_k] = 0. The reward of the model's
estimate x0_hat(x_k), b_k = R(x0_hat(x_k)), is such a baseline, and from the middle of the chain on it tracks
the final reward closely: most of a sample's reward is decided by the noise drawn *before* step k, which the
score of eps_k cannot explain and a batch baseline cannot remove. Early, at high noise, x0_hat is a blur whose
reward can vary more than the final one (brightness: var(R - b_0) = 4 var(R) on the embedded model), so b_k
enters with the scale c that minimises var(R - c b_k), fitted by least squares on the batch's *other* valid
samples and clamped to [0, 1]:

    A_k,i = (R_i - c_-i b_k,i) - mean over the others j (of i's prompt when it has some) of (R_j - c_-i b_k,j)

(``kind="none"``: without the second term). Everything but R_i depends on other samples or on x_k,i only, so
the term stays unbiased (tested on the analytic chain, where a baseline that sees eps_k is caught). The sampler
records x0_hat at every step (``keep_x0_hats``), so the baseline costs no model call: one decode + reward of the batch per
likelihood-ratio step, without grad. A row whose baseline reward is not finite gets b = 0; a row whose reward
is not finite keeps A = 0.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..sampling import Trajectory
from .problem import ChainProblem, evaluate_reward

#: the baseline kinds the residuals can take (no state carried across batches, no normalisation)
STEP_BASELINE_KINDS: tuple[str, ...] = ("loo", "none")


def step_advantages(problem: ChainProblem, traj: Trajectory, rewards: Tensor, steps: Sequence[int], kind: str,
                    clip: float | None = None) -> tuple[dict[int, Tensor], int]:
    """({step k: this shard's advantages A_k}, number of rows whose baseline reward was not finite)."""
    if kind not in STEP_BASELINE_KINDS:
        raise ValueError(f"the step baseline takes baseline kinds {list(STEP_BASELINE_KINDS)}, got {kind!r}")
    if len(traj.x0_hats) != traj.num_steps:
        raise ValueError("the trajectory has no x_0 estimates (sample it with sample_chain(..., keep_x0_hats=True))")
    r = problem.gather(rewards.detach()).double()
    groups = (problem.gather(problem.groups) if problem.groups is not None
              else torch.zeros(len(r), dtype=torch.long, device=r.device))
    out: dict[int, Tensor] = {}
    failed = 0
    with torch.no_grad():
        for k in sorted(set(steps)):
            b, ok = evaluate_reward(problem, traj.x0_hats[k])
            b = problem.gather(torch.where(ok, b.detach(), torch.zeros_like(b))).double()
            failed += int((1 - problem.gather(ok.to(r.dtype))).sum())  # a float all_gather: gloo and bool tensors
            adv = scaled_advantages(r, b, groups, kind)
            out[k] = problem.local((adv.clamp(-clip, clip) if clip is not None else adv).to(rewards.dtype))
    return out, failed


def scaled_advantages(r: Tensor, b: Tensor, groups: Tensor, kind: str = "loo") -> Tensor:
    """(B,) A_i = (r_i - c_-i b_i) - [kind "loo"] the others' mean of r_j - c_-i b_j, c_-i the least-squares
    scale of b for r on the other valid rows, clamped to [0, 1] (0 with fewer than 2 of them). Rows with a
    non-finite r get 0. Leave-one-out sums are the totals less the row's own terms (no loop over rows)."""
    valid = torch.isfinite(r)
    if not bool(valid.any()):
        return torch.zeros_like(r)
    v = valid.to(r.dtype)
    zero = torch.zeros_like(r)
    rc = torch.where(valid, r - r[valid].mean(), zero)  # centred: the scale and the differences are shift-free
    bc = torch.where(valid, b - b[valid].mean(), zero)
    m = v.sum() - v  # others per row
    s_r, s_b = rc.sum() - rc, bc.sum() - bc
    s_rb, s_bb = (rc * bc).sum() - rc * bc, (bc * bc).sum() - bc * bc
    safe_m = m.clamp_min(1)
    var = s_bb - s_b * s_b / safe_m
    cov = s_rb - s_r * s_b / safe_m
    ok = (m >= 2) & (var > 1e-12 * (s_bb.abs() + 1e-300))
    c = torch.where(ok, (cov / torch.where(ok, var, torch.ones_like(var))).clamp(0, 1), zero)
    rz, bz = torch.where(valid, r, zero), torch.where(valid, b, zero)
    adv = rz - c * bz  # "none"; and "loo" for a row with no other valid row (b = 0 there: c is 0)
    if kind == "loo":
        ids = torch.unique(groups.to(r.device), return_inverse=True)[1]  # prompt ids may live on the CPU
        sums = torch.zeros(int(ids.max()) + 1, dtype=r.dtype, device=r.device)
        g_n = sums.index_add(0, ids, v)[ids] - v  # same-prompt others
        g_r = sums.index_add(0, ids, rc)[ids] - rc
        g_b = sums.index_add(0, ids, bc)[ids] - bc
        use_g = g_n >= 1
        pool_n = torch.where(use_g, g_n, m).clamp_min(1)
        pool = torch.where(use_g, g_r - c * g_b, s_r - c * s_b)
        adv = torch.where(m >= 1, rc - c * bc - pool / pool_n, adv)
    return torch.where(valid, adv, zero)
