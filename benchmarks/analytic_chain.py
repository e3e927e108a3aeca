"""Bias, variance and cost of every estimator on a chain with a known gradient.

Runs the production estimators on ``rlr_backend.estimators.analytic_chain`` (``--chain ddim``: d=3, T=8,
DDIM eta=1, sigma growing with t as in SD) or on the flow-matching chain of ``analytic_flow`` (``--chain
flow_sde`` / ``cps``: Gaussian data with its exact velocity, T=8, 5 parameters, latents (B, 1, 2, 1, 2)) and
writes a table: bias (norm and largest per-coordinate z-score against the exact gradient), trace of the
covariance of one update at batch B, model calls (mean per update), and variance x cost, where cost =
forward-equivalents (no-grad forward 1, forward+backward 3).

    python -m benchmarks.analytic_chain [--chain ddim] [--calls 1000] [--batch 64] [--out docs/results/analytic_chain.md]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from rlr_backend.estimators import (CodeCompatConfig, DDPOConfig, FullBPConfig, RLRConfig, TruncatedBPConfig,
                                    ZOConfig, code_compat_estimate, ddpo_estimate, full_bp_estimate, rlr_estimate,
                                    truncated_bp_estimate, zo_estimate)
from rlr_backend.estimators.analytic_chain import collect_estimates, make_analytic_chain, z_scores
from rlr_backend.estimators.analytic_flow import make_analytic_flow_chain

from .common import machine_line
from .hotelling import one_sample


#: --chain -> (a description, the chain); the flow chains use each kind's usual eta
CHAINS = {
    "ddim": ("the analytic chain (d=3, T=8, DDIM eta=1)", lambda: make_analytic_chain(d=3, num_steps=8, eta=1.0, seed=0)),
    "flow_sde": ("the flow chain (Gaussian data, T=8, flow_sde eta=0.7)",
                 lambda: make_analytic_flow_chain(8, kind="flow_sde", eta=0.7)),
    "cps": ("the flow chain (Gaussian data, T=8, cps eta=0.8: last step deterministic)",
            lambda: make_analytic_flow_chain(8, kind="cps", eta=0.8)),
}


def cases(expected_reward: float, chain: str = "ddim") -> dict:
    c = {"full_bp": (full_bp_estimate, {"config": FullBPConfig()}, True)}
    for k in (1, 2, 4):
        c[f"truncated_bp K={k}"] = (truncated_bp_estimate, {"config": TruncatedBPConfig(k=k)}, False)
    c["ddpo (ratio 1, sums, LOO)"] = (ddpo_estimate, {"config": DDPOConfig(clip_range=1.0, adv_clip=None,
                                                                            baseline="loo", step_reduction="sum")}, True)
    c["zo (REINFORCE, all steps)"] = (zo_estimate, {"config": ZOConfig()}, True)
    for h in (1, 2, 3, 5):
        c[f"rlr latent_lr h={h}"] = (rlr_estimate, {"config": RLRConfig(h=h)}, True)
    for nu in (0.1, 0.03):
        c[f"rlr param_1pt h=2 nu={nu}"] = (rlr_estimate, {"config": RLRConfig(zo_mode="param_1pt", nu=nu,
                                                                             baseline="none"),
                                                         "reward_offset": expected_reward}, True)
    for nu in (0.1, 0.03, 0.01):
        c[f"rlr param_2pt h=2 nu={nu}"] = (rlr_estimate, {"config": RLRConfig(zo_mode="param_2pt", nu=nu)}, True)
    if chain == "ddim":  # it reproduces the official code's DDIM chain and refuses others
        c["code_compat (official code)"] = (code_compat_estimate, {"config": CodeCompatConfig()}, False)
    if chain == "cps":  # its last step is deterministic: DDPO and zo take a ratio at every step
        for name in ("ddpo (ratio 1, sums, LOO)", "zo (REINFORCE, all steps)"):
            del c[name]
        c["ddpo (ratio 1, sums, LOO) skip_deterministic"] = (ddpo_estimate, {"config": DDPOConfig(
            clip_range=1.0, adv_clip=None, baseline="loo", step_reduction="sum", skip_deterministic=True)}, False)
    return c


def measure(calls: int, batch: int, chain_name: str = "ddim") -> tuple[float, list[dict]]:
    """Exact gradient norm, and one row per estimator: bias, max z, trace Var, calls, cost, Var x cost."""
    chain = CHAINS[chain_name][1]()
    truth = chain.per_step_gradient().sum(0)
    rows = []
    for name, (fn, kw, claimed_unbiased) in cases(chain.expected_reward(), chain_name).items():
        kw = dict(kw)
        offset = kw.pop("reward_offset", 0.0)
        totals: dict[str, float] = {}

        def wrapped(problem, x_T, **k):
            est = fn(problem, x_T, **k)
            for key, value in est.metrics.items():  # summed over the calls: some vary (code_compat's dropped terms)
                totals[key] = totals.get(key, 0.0) + value
            return est

        t0 = time.perf_counter()
        est = collect_estimates(chain, wrapped, n_calls=calls, batch=batch, seed=1, reward_offset=offset, **kw)
        secs = time.perf_counter() - t0
        metrics = {key: value / calls for key, value in totals.items()}  # means per call
        var = float(est.var(0).sum())
        grad_calls = metrics.get("model_calls_with_grad", 0.0)
        cost = metrics.get("model_calls", 0.0) - grad_calls + 3 * grad_calls
        rows.append({"estimator": name, "meant_unbiased": claimed_unbiased, "bias_norm": float((est.mean(0) - truth).norm()),
                     "max_z": float(z_scores(est, truth).max()), "t2_p_value": one_sample(est, truth)["p_value"],
                     "trace_var": var,
                     "model_calls": metrics.get("model_calls", 0.0), "model_calls_with_grad": grad_calls,
                     "steps_in_memory": metrics.get("steps_in_memory", 0.0), "cost": cost, "var_x_cost": var * cost,
                     "seconds": secs})
        logging.info("%s: bias z %.1f, var %.3g, %.1fs", name, rows[-1]["max_z"], var, secs)
    return float(truth.norm()), rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chain", choices=sorted(CHAINS), default="ddim")
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None,
                    help="default: docs/results/analytic_chain.md (ddim), docs/results/flow_chain_<chain>.md")
    args = ap.parse_args(argv)
    out = args.out or Path("docs/results/" + ("analytic_chain.md" if args.chain == "ddim" else
                                              f"flow_chain_{args.chain}.md"))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    truth_norm, rows = measure(args.calls, args.batch, args.chain)
    n_coords = 4 if args.chain == "ddim" else 5
    chain_opt = "" if args.chain == "ddim" else f" --chain {args.chain}"
    lines = [f"# Estimators on {CHAINS[args.chain][0]}; h=2 unless named; {args.calls} updates x batch "
             f"{args.batch}", "", f"Machine: {machine_line()}.",
             f"Command: `python -m benchmarks.analytic_chain{chain_opt} --calls {args.calls} --batch {args.batch}`.",
             f"Exact gradient norm: {truth_norm:.3f}. z = largest |mean - exact| / standard error over "
             f"the {n_coords} coordinates (unbiased: z < 4 expected); p = Hotelling's T^2 p-value of mean = exact "
             "(benchmarks/hotelling.py; small when biased).", "",
             "| estimator | meant unbiased | bias norm | max z | T^2 p | trace Var per update | model calls (with grad) "
             "| steps in memory | cost (fwd-equiv.) | Var x cost |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['estimator']} | {'yes' if r['meant_unbiased'] else 'no'} | {r['bias_norm']:.3g} | "
                     f"{r['max_z']:.1f} | {r['t2_p_value']:.2g} | {r['trace_var']:.3g} | {r['model_calls']:.3g} ({r['model_calls_with_grad']:.3g}) "
                     f"| {r['steps_in_memory']:.3g} | {r['cost']:.3g} | {r['var_x_cost']:.3g} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
