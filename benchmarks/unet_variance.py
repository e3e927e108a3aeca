"""Per-term gradient variance on the tiny UNet at a fixed theta (spec decision 17).

Each RLR term is isolated by zeroing the other weights (FO, HO for several h, ZO in each mode) and
compared with DDPO and full backprop over the same seeds. Reported per update (batch B): the trace
of the covariance of the LoRA gradient, the squared norm of its mean (the signal), and model calls.

    python -m benchmarks.unet_variance [--steps 20] [--seeds 32] [--out docs/results/unet_variance.md]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from rlr_backend.estimators import (BaselineState, DDPOConfig, FullBPConfig, RLRConfig, ddpo_estimate,
                                    full_bp_estimate, rlr_estimate)

from .common import machine_line, tiny_stack


def collect(stack, fn, seeds: int, **kw) -> tuple[torch.Tensor, float, float]:
    p = stack.problem
    out, calls, t0 = [], 0.0, time.perf_counter()
    state = BaselineState()
    for s in range(seeds):
        for q in p.params:
            q.grad = None
        g = torch.Generator().manual_seed(1000 + s)
        x_T = torch.randn(stack.latent_shape, generator=g)
        est = fn(p, x_T, generator=g, baseline_state=state, **kw)
        calls = est.metrics.get("model_calls", 0.0)
        out.append(-torch.cat([q.grad.flatten() if q.grad is not None else torch.zeros(q.numel()) for q in p.params]))
    return torch.stack(out), calls, (time.perf_counter() - t0) / seeds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("docs/results/unet_variance.md"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("rlr_backend.estimators.rlr").setLevel(logging.ERROR)  # weight warnings are intended
    torch.set_num_threads(1)
    header = machine_line()
    stack = tiny_stack(num_steps=args.steps, batch=args.batch)
    n, j = args.steps, args.steps // 2
    cases = {
        "full_bp (reference)": (full_bp_estimate, {"config": FullBPConfig()}),
        "FO (last step)": (rlr_estimate, {"config": RLRConfig(weights=(1, 0, 0)), "j": j}),
    }
    for h in (1, 2, 4):
        cases[f"HO h={h} (j={j})"] = (rlr_estimate, {"config": RLRConfig(h=h, weights=(0, 1, 0)), "j": j})
    for mode, extra in [("latent_lr", {}), ("param_1pt", {"baseline": "ema"}), ("param_2pt", {})]:
        cases[f"ZO {mode} (h=2, j={j})"] = (rlr_estimate, {"config": RLRConfig(zo_mode=mode, weights=(0, 0, 1),
                                                                               **extra), "j": j})
    for mode, extra in [("latent_lr", {}), ("param_2pt", {})]:
        cases[f"RLR {mode} (all terms, j uniform)"] = (rlr_estimate, {"config": RLRConfig(zo_mode=mode, **extra)})
    cases["DDPO (ratio 1, sums, LOO)"] = (ddpo_estimate, {"config": DDPOConfig(clip_range=1.0, adv_clip=None,
                                                                                  baseline="loo", step_reduction="sum")})
    rows, ref_mean = [], None
    for name, (fn, kw) in cases.items():
        est, calls, secs = collect(stack, fn, args.seeds, **kw)
        mean = est.mean(0)
        if ref_mean is None:
            ref_mean = mean
        var = float(est.var(0).sum())
        cos = float(torch.nn.functional.cosine_similarity(mean, ref_mean, dim=0))
        rows.append((name, var, float(mean.norm() ** 2), cos, calls, secs))
        logging.info("%s: trace var %.3g, |mean|^2 %.3g, %.1fs/update", name, var, float(mean.norm() ** 2), secs)
    lines = [f"# Per-term gradient variance, tiny UNet, 32x32 px, batch {args.batch}, T={n}, {args.seeds} seeds", "",
             f"Machine: {header}.", f"Command: `python -m benchmarks.unet_variance --steps {n} --seeds {args.seeds}`.",
             "LoRA rank 4 on attention (to_q/k/v/out), B of the adapter ~N(0, 0.02); reward = brightness of the "
             "decoded image; DDIM eta = 1, CFG 3. Gradient vectors are over all LoRA parameters.", "",
             "| term / estimator | trace Var per update | squared norm of mean | cos(mean, full_bp mean) "
             "| model calls | s / update |", "|---|---|---|---|---|---|"]
    for name, var, m2, cos, calls, secs in rows:
        lines.append(f"| {name} | {var:.3g} | {m2:.3g} | {cos:.2f} | {calls:.0f} | {secs:.2f} |")
    lines += ["", "With this many seeds, a squared norm of the mean below roughly trace Var / seeds is noise."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
