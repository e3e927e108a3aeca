"""What the structure rewards and the KL guard add to an update's time, as ratios measured in one run.

Trainers on the embedded default model (T=20, batch 8), for RLR and for truncated backprop (what the
default ``--estimator auto`` picks for these differentiable rewards): reward ``brightness`` (the
reference), ``position:left``, ``size:0.4``, and ``brightness`` with ``--kl-weight``. Their updates are
timed in interleaved rounds (one update of each per round, CPU seconds of this process), so a busy
machine slows all alike; the ratio of medians to the same estimator's brightness update is reported.

    python -m benchmarks.guard_cost [--rounds 6] [--out benchmarks/results/guard-cost.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rlr_backend.safe_io import save_json
from rlr_backend.train import TrainConfig, Trainer

REFERENCE = "brightness (reference)"
_REWARDS = {REFERENCE: dict(reward="brightness"), "position:left": dict(reward="position:left"),
            "size:0.4": dict(reward="size:0.4"), "brightness + KL (2 steps)": dict(reward="brightness", kl_weight=1e-3)}
CASES = {f"{est}: {name}": {**kw, "estimator": est} for est in ("rlr", "truncated_bp") for name, kw in _REWARDS.items()}


def measure(rounds: int, **overrides) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: Trainer(TrainConfig(output_dir=Path(tmp), run_name=f"c{i}", **{**kw, **overrides}),
                                  progress=False) for i, (name, kw) in enumerate(CASES.items())}
        for t in trainers.values():  # warm-up: first-call allocations
            t.update()
        cpu = {name: [] for name in trainers}
        for _ in range(rounds):
            for name, t in trainers.items():
                c0 = time.process_time()
                t.update()
                cpu[name].append(time.process_time() - c0)
    ref = {name.split(":")[0]: statistics.median(v) for name, v in cpu.items() if name.endswith(REFERENCE)}
    return {"rounds": rounds, "load": os.getloadavg()[0], "threads": torch.get_num_threads(),
            "rows": [{"case": name, "median_cpu_s": statistics.median(v),
                      "ratio": statistics.median(v) / ref[name.split(":")[0]]} for name, v in cpu.items()]}


def render(result: dict) -> list[str]:
    lines = [f"Update time on the embedded default model (T=20, batch 8; median CPU seconds of {result['rounds']} "
             f"interleaved rounds, {result['threads']} thread, load {result['load']:.1f}; "
             "`python -m benchmarks.guard_cost`):", "", "| estimator: update | CPU s | ratio to the same estimator's "
             "brightness update |", "|---|---|---|"]
    lines += [f"| {r['case']} | {r['median_cpu_s']:.2f} | {r['ratio']:.3f} |" for r in result["rows"]]
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "guard-cost.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    result = measure(args.rounds)
    save_json(result, args.out)
    print("\n".join(render(result)))


if __name__ == "__main__":
    main()
