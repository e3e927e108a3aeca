"""Estimator quality: bias and variance of the gradient, and variance x cost.

Two problems: the linear-Gaussian chain with a closed-form gradient (benchmarks.analytic_chain),
and the embedded default model's UNet with a LoRA, where the "true" gradient is the mean of full
backprop over many seeds. Cost is the measured seconds per update on the UNet (forward-equivalents
on the chain), so Var x cost compares estimators at equal compute. Bias is tested with Hotelling's
T^2 (``benchmarks.hotelling``): against the exact gradient on the chain, against the full-backprop
estimates on the UNet (two-sample, on a fixed random subspace of the LoRA parameters).
"""

from __future__ import annotations

import logging
import time

import torch

from rlr_backend.estimators import (BaselineState, CodeCompatConfig, DDPOConfig, FullBPConfig, RLRConfig,
                                    TruncatedBPConfig, ZOConfig, code_compat_estimate, ddpo_estimate,
                                    full_bp_estimate, rlr_estimate, truncated_bp_estimate, zo_estimate)

from . import analytic_chain
from .hotelling import two_sample
from .stacks import build_stack

logger = logging.getLogger(__name__)

UNET_CASES = {
    "full_bp": (full_bp_estimate, {"config": FullBPConfig()}),
    "rlr latent_lr h=2": (rlr_estimate, {"config": RLRConfig(h=2)}),
    "rlr latent_lr h=2 fo_steps=4": (rlr_estimate, {"config": RLRConfig(h=2, fo_steps=4)}),
    "rlr param_2pt h=2": (rlr_estimate, {"config": RLRConfig(h=2, zo_mode="param_2pt")}),
    "rlr param_1pt h=2": (rlr_estimate, {"config": RLRConfig(h=2, zo_mode="param_1pt", baseline="ema")}),
    "ddpo (ratio 1, sums, LOO)": (ddpo_estimate, {"config": DDPOConfig(clip_range=1.0, adv_clip=None, baseline="loo",
                                                                       step_reduction="sum")}),
    "zo": (zo_estimate, {"config": ZOConfig()}),
    "truncated_bp K=2": (truncated_bp_estimate, {"config": TruncatedBPConfig(k=2)}),
    "code_compat": (code_compat_estimate, {"config": CodeCompatConfig()}),
}


#: first noise seed of the estimators under test, and of the full-backprop reference: disjoint ranges, so the
#: two samples of the two-sample T^2 test are independent, as the test assumes
TEST_SEED, TRUTH_SEED = 1000, 100_000


def gradients(stack, fn, kw: dict, seeds: int, first_seed: int = TEST_SEED) -> tuple[torch.Tensor, float]:
    """(seeds, n_params) gradient estimates of the reward (ascent direction) and seconds per update."""
    p = stack.problem
    out, state, t0 = [], BaselineState(), time.perf_counter()
    for s in range(seeds):
        for q in p.params:
            q.grad = None
        g = torch.Generator().manual_seed(first_seed + s)
        fn(p, torch.randn(stack.latent_shape, generator=g), generator=g, baseline_state=state, **kw)
        out.append(-torch.cat([q.grad.flatten() if q.grad is not None else torch.zeros(q.numel()) for q in p.params]))
    return torch.stack(out).double(), (time.perf_counter() - t0) / seeds


def unet_quality(num_steps: int, batch: int, seeds: int) -> list[dict]:
    logging.getLogger("rlr_backend.estimators.rlr").setLevel(logging.ERROR)
    stack = build_stack("default", num_steps=num_steps, batch=batch)
    truth_est, _ = gradients(stack, *UNET_CASES["full_bp"], seeds=4 * seeds, first_seed=TRUTH_SEED)
    truth = truth_est.mean(0)
    rows = []
    for name, (fn, kw) in UNET_CASES.items():
        est, secs = gradients(stack, fn, kw, seeds)
        mean, var = est.mean(0), est.var(0)
        trace_var = float(var.sum())
        # Hotelling's two-sample T^2 against the full-backprop reference (its own seeds), calibrated p-value;
        # full_bp itself is tested too: its p-value is the test's null case
        test = two_sample(est, truth_est, seed=0)
        rows.append({"estimator": name, "trace_var": trace_var, "seconds": secs, "var_x_seconds": trace_var * secs,
                     "cos_to_truth": float(torch.nn.functional.cosine_similarity(mean, truth, dim=0)),
                     "t2": test["t2"], "t2_dims": test["dims"], "t2_p_value": test["p_value"],
                     "relative_bias": float((mean - truth).norm() / truth.norm())})
        logger.info("%s: var %.3g, %.2fs, T^2 p-value %s", name, trace_var, secs, rows[-1]["t2_p_value"])
    return rows


def run_suite(quick: bool) -> dict:
    calls, batch = (200, 16) if quick else (1000, 64)
    truth_norm, chain_rows = analytic_chain.measure(calls, batch)
    T, B, seeds = (10, 4, 12) if quick else (20, 4, 48)
    return {"analytic_chain": {"calls": calls, "batch": batch, "exact_gradient_norm": truth_norm, "rows": chain_rows},
            "unet": {"model": "default", "T": T, "batch": B, "seeds": seeds,
                     "truth": f"mean of full_bp over {4 * seeds} seeds disjoint from the estimators' seeds",
                     "rows": unet_quality(T, B, seeds)}}
