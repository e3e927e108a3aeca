"""The default training run with RLR, DDPO and truncated backprop, same samples budget, several seeds.

Trains the embedded default model on held-out caption combinations (never seen in pretraining,
so prompt alignment has room to improve) and reports the evaluation reward before and after, and
the wall time, per estimator and seed.

    python -m benchmarks.default_run [--steps 40] [--seeds 0 1 2] [--out docs/results/default_run.md]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rlr_backend.train import PromptSpec, TrainConfig, Trainer

from .common import machine_line

PROMPTS = ("a green circle on a black background", "a red square on a black background",
           "a white triangle on a red background", "a blue square on a yellow background")
ESTIMATORS = ("rlr", "ddpo", "truncated_bp")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--estimators", nargs="+", default=list(ESTIMATORS))
    ap.add_argument("--out", type=Path, default=Path("docs/results/default_run.md"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    header = machine_line()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for est in args.estimators:
            for seed in args.seeds:
                cfg = TrainConfig(prompts=tuple(PromptSpec(p) for p in PROMPTS), estimator=est, steps=args.steps,
                                  seed=seed, eval_every=0, eval_seeds=4, output_dir=Path(tmp), run_name=f"{est}-{seed}")
                t0 = time.perf_counter()
                result = Trainer(cfg, progress=False).run()
                secs = time.perf_counter() - t0
                before, after = result.eval_rewards[0], result.eval_rewards[args.steps]
                rows.append((est, seed, before, after, secs))
                print(f"{est} seed {seed}: {before:.4f} -> {after:.4f} in {secs:.0f}s", flush=True)
    lines = [f"# Default run: {args.steps} updates of batch 4 (T=20), held-out prompts, seeds {args.seeds}", "",
             f"Machine: {header}.", f"Command: `python -m benchmarks.default_run --steps {args.steps}`.",
             "Evaluation: 16 images (4 held-out prompts x 4 fixed seeds), mean prompt-alignment reward.", "",
             "| estimator | seed | eval reward before | after | change | wall time (s) |", "|---|---|---|---|---|---|"]
    for est, seed, b, a, s in rows:
        lines.append(f"| {est} | {seed} | {b:.4f} | {a:.4f} | {a - b:+.4f} | {s:.0f} |")
    lines += ["", "| estimator | mean change | mean wall time (s) |", "|---|---|---|"]
    for est in args.estimators:
        mine = [r for r in rows if r[0] == est]
        lines.append(f"| {est} | {statistics.mean(r[3] - r[2] for r in mine):+.4f} | "
                     f"{statistics.mean(r[4] for r in mine):.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
