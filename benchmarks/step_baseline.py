"""How much noise RLR's step baseline removes, and what it costs, on the embedded default model.

For each (reward, T) cell, ``batches`` batches of 8 (2 prompts x 4 images, drawn like the trainer's) are
estimated by RLR with and without ``step_baseline``, in the default recipe (fo_steps=4) and the paper's
(fo_steps=1), from the same x_T and noise seed (common random numbers), at the base LoRA. Reported: the trace
of the update's covariance over batches (its total variance), its ratio to plain RLR's, and the CPU seconds of
one estimate. Both estimators are unbiased (tests/test_estimators_analytic.py), so the variance is the whole
difference in what one update tells the optimizer.

    python -m benchmarks.step_baseline [--batches 10] [--cells position:left/20 jpeg_compressibility/20]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from rlr_backend.estimators import RLRConfig, rlr_estimate
from rlr_backend.estimators.advantages import BaselineState
from rlr_backend.safe_io import save_json
from rlr_backend.train import TrainConfig, Trainer

RESULTS = Path(__file__).parent / "results" / "step-baseline.json"
CELLS = ("position:left/20", "jpeg_compressibility/20", "brightness/20", "position:left/50")
CONFIGS = {"rlr": dict(fo_steps=4), "rlr + step baseline": dict(fo_steps=4, step_baseline=True),
           "rlr paper": dict(fo_steps=1), "rlr paper + step baseline": dict(fo_steps=1, step_baseline=True)}


def measure(reward: str, T: int, batches: int, seed: int = 0) -> dict:
    """One cell: per config, the trace of the estimates' covariance and the mean CPU seconds of an estimate."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(reward=reward, num_inference_steps=T, batch_size=8, eval_every=0, output_dir=Path(tmp),
                          run_name="sb")
        trainer = Trainer(cfg, progress=False)
        g = torch.Generator().manual_seed(seed)
        est: dict[str, list[torch.Tensor]] = {name: [] for name in CONFIGS}
        cpu = dict.fromkeys(CONFIGS, 0.0)
        for _ in range(batches):
            groups = cfg.batch_size // cfg.images_per_prompt
            ids = torch.randint(0, len(cfg.prompts), (groups,), generator=g).repeat_interleave(cfg.images_per_prompt)
            x_T = torch.randn((cfg.batch_size, *trainer.latent_shape), generator=g)
            noise_seed = int(torch.randint(0, 2**62, (1,), generator=g))
            problem = trainer.problem(ids.tolist())
            for name, knobs in CONFIGS.items():
                for p in trainer.params:
                    p.grad = None
                c0 = time.process_time()
                rlr_estimate(problem, x_T, config=RLRConfig(h=2, **knobs), baseline_state=BaselineState(),
                             generator=torch.Generator().manual_seed(noise_seed))
                cpu[name] += time.process_time() - c0
                est[name].append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                            for p in trainer.params]).double())
    trace = {name: float(torch.stack(v).var(0).sum()) for name, v in est.items()}
    return {"reward": reward, "T": T, "batches": batches,
            "rows": [{"config": name, "trace_var": trace[name], "ratio": trace[name] / trace["rlr"],
                      "cpu_s": cpu[name] / batches} for name in CONFIGS]}


def render(result: dict) -> list[str]:
    lines = [f"Embedded default model, base LoRA, batch 8, {result['cells'][0]['batches']} batches per cell from the "
             f"same x_T and noises; {result['threads']} thread, load {result['load']:.1f}; "
             "`python -m benchmarks.step_baseline`. *ratio*: total variance of the update against plain RLR's "
             "(default recipe) in the same cell; *CPU s*: one estimate.", "",
             "| reward | T | " + " | ".join(f"{c} (ratio, CPU s)" for c in CONFIGS) + " |",
             "|---|---|" + "---|" * len(CONFIGS)]
    for cell in result["cells"]:
        rows = {r["config"]: r for r in cell["rows"]}
        lines.append(f"| `{cell['reward']}` | {cell['T']} | " + " | ".join(
            f"{rows[c]['ratio']:.3g} ({rows[c]['cpu_s']:.2f} s)" for c in CONFIGS) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--cells", nargs="+", default=list(CELLS), metavar="REWARD/T")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    cells = []
    for spec in args.cells:
        reward, T = spec.rsplit("/", 1)
        cells.append(measure(reward, int(T), args.batches))
        result = {"cells": cells, "threads": torch.get_num_threads(), "load": os.getloadavg()[0]}
        save_json(result, args.out)  # after every cell: a killed run keeps what it measured
    print("\n".join(render(result)))


if __name__ == "__main__":
    main()
