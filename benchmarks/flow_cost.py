"""An update's cost on the flow-matching default next to the UNet default, measured in one run.

Time: trainers on the embedded UNet default and on ``default-flow`` (the README's main job: T=20, batch 8,
reward prompt_alignment + brightness, CFG 4), one per estimator, and a no-grad sample (+ decode and reward) of
the same batch as each model's baseline. Timed in interleaved rounds (one call of each per round, CPU seconds of
this process on one thread), so a busy machine slows all alike; reported: the median update over the median
no-grad sample of the same model.

Memory: the peak tensor memory of one update beyond what was live before it (the profiler's allocation
events, ``train.memory.peak_allocated``) at T = 10, 20, 40 on ``default-flow``: RLR's should not grow with T
(its graph holds h + fo_steps steps), truncated backprop's neither, full backprop's grows linearly.

    python -m benchmarks.flow_cost [--rounds 4] [--out benchmarks/results/flow-cost.json]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rlr_backend.safe_io import save_json
from rlr_backend.sampling import sample_chain
from rlr_backend.train import TrainConfig, Trainer
from rlr_backend.train.memory import peak_allocated

MODELS = {"UNet default": None, "default-flow": "default-flow"}
ESTIMATORS = {"truncated_bp (K=2)": dict(estimator="truncated_bp"), "rlr (h=2, fo_steps=4)": dict(estimator="rlr"),
              "ddpo": dict(estimator="ddpo")}
MEMORY_T = (10, 20, 40)
MEMORY_ESTIMATORS = {**{k: v for k, v in ESTIMATORS.items() if k != "ddpo"}, "full_bp": dict(estimator="full_bp")}


def _sample(trainer: Trainer, generator: torch.Generator) -> None:
    """A no-grad sample of one training batch, decoded and scored: what every update starts with."""
    cfg = trainer.config
    ids = torch.randint(0, len(cfg.prompts), (cfg.batch_size,), generator=generator).tolist()
    x_T = torch.randn((cfg.batch_size, *trainer.latent_shape), generator=generator)
    problem = trainer.problem(ids)
    with torch.no_grad():
        traj = sample_chain(problem.model, problem.schedule, problem.prompts, x_T, generator=generator)
        problem.reward(traj.final)


def measure_time(rounds: int, tmp: Path) -> list[dict]:
    trainers = {(m, e): Trainer(TrainConfig(model=path, output_dir=tmp, run_name=f"t{i}", **kw), progress=False)
                for i, ((m, path), (e, kw)) in enumerate(((mp, ek) for mp in MODELS.items() for ek in ESTIMATORS.items()))}
    samplers = {m: next(t for (mm, _), t in trainers.items() if mm == m) for m in MODELS}
    g = torch.Generator().manual_seed(0)
    calls = {**{("sample", m): (lambda t=t: _sample(t, g)) for m, t in samplers.items()},
             **{k: t.update for k, t in trainers.items()}}
    for fn in calls.values():  # warm-up: first-call allocations
        fn()
    cpu: dict = {k: [] for k in calls}
    for _ in range(rounds):
        for k, fn in calls.items():
            c0 = time.process_time()
            fn()
            cpu[k].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    return [{"model": m, "estimator": e, "sample_cpu_s": med[("sample", m)], "update_cpu_s": med[(m, e)],
             "ratio": med[(m, e)] / med[("sample", m)]} for m in MODELS for e in ESTIMATORS]


def measure_memory(tmp: Path) -> list[dict]:
    rows = []
    for e, kw in MEMORY_ESTIMATORS.items():
        for t in MEMORY_T:
            trainer = Trainer(TrainConfig(model="default-flow", num_inference_steps=t, output_dir=tmp,
                                          run_name=f"m{t}", **kw), progress=False)
            trainer.update()  # warm-up
            rows.append({"estimator": e, "T": t, "peak_bytes": peak_allocated(trainer.update)})
    return rows


def render(result: dict) -> list[str]:
    lines = [f"One update over a no-grad sample (+ decode and reward) of the same batch, T=20, batch 8 (median CPU "
             f"seconds of {result['rounds']} interleaved rounds, {result['threads']} thread, load "
             f"{result['load']:.1f}; `python -m benchmarks.flow_cost`):", "",
             "| model | estimator | no-grad sample, CPU s | update, CPU s | ratio |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['estimator']} | {r['sample_cpu_s']:.2f} | {r['update_cpu_s']:.2f} | "
              f"{r['ratio']:.2f} |" for r in result["time"]]
    lines += ["", "Peak tensor memory of one update on `default-flow` (batch 8, MB beyond what was live before it):", "",
              "| estimator | " + " | ".join(f"T={t}" for t in MEMORY_T) + " |", "|---|" + "---|" * len(MEMORY_T)]
    for e in MEMORY_ESTIMATORS:
        peaks = {r["T"]: r["peak_bytes"] for r in result["memory"] if r["estimator"] == e}
        lines.append(f"| {e} | " + " | ".join(f"{peaks[t] / 2**20:.1f}" for t in MEMORY_T) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "flow-cost.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"rounds": args.rounds, "threads": torch.get_num_threads(), "time": measure_time(args.rounds, Path(tmp)),
                  "memory": measure_memory(Path(tmp))}
    result["load"] = os.getloadavg()[0]
    save_json(result, args.out)
    print("\n".join(render(result)))


if __name__ == "__main__":
    main()
