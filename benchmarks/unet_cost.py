"""Time and peak memory of one update per estimator, as ratios to a no-grad sample of the same batch.

Tiny random-init UNet (~0.8M params) on 16x16x4 latents, VAE decoder to 32x32 px, batch 4, CFG 3,
DDIM eta 1, LoRA rank 4 on attention. Memory = weights + peak tensor allocations during the call.

    python -m benchmarks.unet_cost [--steps 50] [--out docs/results/unet_cost.md]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from rlr_backend.estimators import (BaselineState, CodeCompatConfig, DDPOConfig, FullBPConfig, RLRConfig,
                                    TruncatedBPConfig, code_compat_estimate, ddpo_estimate, full_bp_estimate,
                                    rlr_estimate, truncated_bp_estimate)
from rlr_backend.sampling import sample_chain

from .common import machine_line, peak_allocated, tiny_stack, timed, weights_bytes

CASES = {
    "rlr h=2 latent_lr": (rlr_estimate, {"config": RLRConfig(h=2, zo_mode="latent_lr")}),
    "rlr h=2 param_1pt": (rlr_estimate, {"config": RLRConfig(h=2, zo_mode="param_1pt", baseline="ema")}),
    "rlr h=2 param_2pt": (rlr_estimate, {"config": RLRConfig(h=2, zo_mode="param_2pt")}),
    "code_compat": (code_compat_estimate, {"config": CodeCompatConfig()}),
    "ddpo": (ddpo_estimate, {"config": DDPOConfig()}),
    "truncated_bp K=2": (truncated_bp_estimate, {"config": TruncatedBPConfig(k=2)}),
    "full_bp": (full_bp_estimate, {"config": FullBPConfig()}),
    "full_bp + checkpointing": (full_bp_estimate, {"config": FullBPConfig(use_checkpoint=True)}),
}


def measure(steps: int, batch: int, names: list[str], timing: bool = True) -> tuple[dict, dict]:
    stack = tiny_stack(num_steps=steps, batch=batch)
    p = stack.problem
    w = weights_bytes(stack.unet, stack.vae)
    x_T = torch.randn(stack.latent_shape, generator=torch.Generator().manual_seed(0))

    def sample():
        with torch.no_grad():
            t = sample_chain(p.model, p.schedule, p.prompts, x_T, generator=torch.Generator().manual_seed(1))
            p.reward(t.final)

    def update(fn, kw):
        def run():
            for q in p.params:
                q.grad = None
            fn(p, x_T, generator=torch.Generator().manual_seed(1), baseline_state=BaselineState(), **kw)
        return run

    sample()  # warm-up
    base_m = w + peak_allocated(sample)
    rows, base_times = {}, []
    for name in names:
        fn, kw = CASES[name]
        run = update(fn, kw)
        run()  # warm-up
        # the baseline is re-timed next to every case, so a change in machine load hits both alike
        base_t = timed(sample, 2)
        t = timed(run) if timing else float("nan")
        base_times.append(base_t)
        rows[name] = (t, w + peak_allocated(run), t / base_t)
        logging.info("%s: %.2fs (sample %.2fs) %.1f MB", name, t, base_t, rows[name][1] / 1e6)
    return {"time": min(base_times), "mem": base_m}, rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("docs/results/unet_cost.md"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    header = machine_line()
    base, rows = measure(args.steps, args.batch, list(CASES))
    lines = [f"# Cost of one update, tiny UNet, 32x32 px, batch {args.batch}, T={args.steps}", "",
             f"Machine: {header}.", f"Command: `python -m benchmarks.unet_cost --steps {args.steps}`.", "",
             f"Baseline: a no-grad sample of the same batch (+ reward): {base['time']:.2f} s (fastest of its "
             f"timings; each ratio uses the baseline timed right before that case), {base['mem'] / 1e6:.1f} MB "
             "(weights + peak tensor allocations, from the profiler's allocation events).", "",
             "| estimator | time (s) | time / sample | memory (MB) | memory / sample |", "|---|---|---|---|---|"]
    for name, (t, m, ratio) in rows.items():
        lines.append(f"| {name} | {t:.2f} | {ratio:.2f}x | {m / 1e6:.1f} | {m / base['mem']:.2f}x |")
    # memory must not grow with T for RLR: the same case at a shorter chain
    short = max(args.steps // 2, 4)
    base_s, rows_s = measure(short, args.batch, ["rlr h=2 latent_lr", "full_bp"], timing=False)
    lines += ["", f"Memory against chain length (T={short} vs T={args.steps}):", "",
              "| estimator | memory / sample at T=%d | at T=%d |" % (short, args.steps), "|---|---|---|"]
    for name in rows_s:
        lines.append(f"| {name} | {rows_s[name][1] / base_s['mem']:.2f}x | {rows[name][1] / base['mem']:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
