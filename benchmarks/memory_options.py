"""What each memory option of the trainer saves on this machine: peak tensor memory and time of one
training update of the default recipe (RLR h=2, fo_steps=4), per option, as ratios to fp32 without options.

    python -m benchmarks.memory_options [--model PATH] [--batch 4] [--steps 10] [--threads 1]

Peak memory = the frozen and trainable weights plus the peak of tensor allocations during the update
(``benchmarks.common.peak_allocated``). CPU only here: the ratios show what recomputation and half
precision remove; absolute GPU figures come from the memory model (docs/memory.md). Time is measured
for the fp32 options only: CPUs without native bf16/fp16 matrix units emulate them, so a CPU time
ratio of half precision says nothing about a GPU.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import torch

from rlr_backend.train import TrainConfig, Trainer

from .common import peak_allocated

logger = logging.getLogger(__name__)

OPTIONS = {
    "fp32": {},
    "bf16": {"precision": "bf16"},
    "gradient checkpointing": {"gradient_checkpointing": True},
    "bf16 + checkpointing": {"precision": "bf16", "gradient_checkpointing": True},
}


def weight_bytes(trainer: Trainer) -> int:
    mods = [trainer.t2i.unet, trainer.t2i.vae]
    return sum(t.numel() * t.element_size() for m in mods for t in list(m.parameters()) + list(m.buffers()))


def measure(model: str | None, batch: int, steps: int, repeats: int = 1) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for name, opts in OPTIONS.items():
            cfg = TrainConfig(model=model, batch_size=batch, num_inference_steps=steps, output_dir=out,
                              run_name=name.replace(" ", "_").replace("+", ""), **opts)
            trainer = Trainer(cfg, progress=False)
            if cfg.precision == "fp32":
                trainer.update()  # warm-up
            peak = peak_allocated(trainer.update)
            seconds = float("nan")
            if cfg.precision == "fp32":
                t0 = time.perf_counter()
                for _ in range(repeats):
                    trainer.update()
                seconds = (time.perf_counter() - t0) / repeats
            rows.append({"option": name, "bytes": weight_bytes(trainer) + peak, "activation_bytes": peak,
                         "seconds": seconds})
    base = rows[0]
    for r in rows:
        r["memory_ratio"], r["time_ratio"] = r["bytes"] / base["bytes"], r["seconds"] / base["seconds"]
        r["activation_ratio"] = r["activation_bytes"] / base["activation_bytes"]
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="local model (default: the embedded one)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="sampling steps T")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    torch.manual_seed(0)
    load0 = os.getloadavg()[0]
    rows = measure(args.model, args.batch, args.steps)
    logger.info("load average %.2f -> %.2f", load0, os.getloadavg()[0])
    logger.info("| option | peak memory (MB) | ratio | activations ratio | time per update (s) | ratio |")
    logger.info("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        timing = "not timed (a CPU emulates half precision) | -" if r["seconds"] != r["seconds"] else \
            f"{r['seconds']:.2f} | {r['time_ratio']:.2f}x"
        logger.info("| %s | %.1f | %.2fx | %.2fx | %s |", r["option"], r["bytes"] / 1e6, r["memory_ratio"],
                    r["activation_ratio"], timing)


if __name__ == "__main__":
    main()
