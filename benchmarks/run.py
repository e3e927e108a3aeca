"""Run the benchmark suites and regenerate docs/benchmarks.md from their JSON results.

    python -m benchmarks.run --suite quick      # minutes: every suite on a small budget
    python -m benchmarks.run --suite full       # about six hours on 2 CPU cores (2.5 h: the memory model)
    python -m benchmarks.run --suite full --only cost scaling
    python -m benchmarks.run --report-only      # re-render the page from benchmarks/results/

The memory suite is the SD-size memory model (benchmarks/memory_model/, its page docs/memory.md);
the benchmarks page shows its out-of-memory table.

Each suite writes benchmarks/results/<suite>-<quick|full>.json with the machine, versions, seeds,
command and the measured rows; the page is rendered from the newest result of each suite. The
efficiency and collapse suites save after every training run and skip runs already saved (resumable).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from rlr_backend.safe_io import save_json

from . import bias_map, cost, efficiency, guard_check, long_run, quality, report, scaling
from .common import machine

RESULTS = Path(__file__).parent / "results"
SUITES = ("cost", "quality", "efficiency", "collapse", "scaling", "bias", "longrun", "flowrun", "guardrun", "flowguard", "memory")


def run_memory_model(budget: str, threads: int) -> Path:
    """The SD-size memory model (its own resumable results file and page, docs/memory.md)."""
    from . import memory_model

    args = ["--quick"] if budget == "quick" else ["--budget-minutes", "150"]
    memory_model.main(args + ["--threads", str(threads)])
    return memory_model.QUICK_RESULTS if budget == "quick" else memory_model.RESULTS


def run(suite: str, budget: str, rewards: tuple[str, ...] = efficiency.REWARDS,
        variants: tuple[str, ...] = (), lrs: tuple[float, ...] = (), seeds: tuple[int, ...] = (),
        Ts: tuple[int, ...] = (), long_rewards: tuple[str, ...] = ()) -> Path:
    """Run one suite and save its JSON; the efficiency suite saves one file per reward (two processes can
    share the work: ``--only efficiency --rewards prompt_alignment`` and ``... jpeg_compressibility``)."""
    if suite == "efficiency" and len(rewards) == 1:
        path = RESULTS / f"{suite}-{budget}-{rewards[0]}.json"
    elif suite in ("longrun", "flowrun", "guardrun", "flowguard") and (variants or suite in ("guardrun", "flowguard")):
        path = RESULTS / f"{suite}-{budget}.json"
        if variants:
            path = path.with_name(f"{path.stem}-{'-'.join(v.replace(' ', '').replace('+', '_') for v in variants)}.json")
        if lrs:
            path = path.with_name(path.stem + "-lr" + "-".join(f"{lr:g}" for lr in lrs) + ".json")
        if seeds:
            path = path.with_name(path.stem + "-seed" + "-".join(map(str, seeds)) + ".json")
        if Ts:
            path = path.with_name(path.stem + "-T" + "-".join(map(str, Ts)) + ".json")
        if long_rewards:
            path = path.with_name(path.stem + "-" + "-".join(r.replace(":", "_") for r in long_rewards) + ".json")
    else:
        path = RESULTS / f"{suite}-{budget}.json"
    meta = {"suite": suite, "budget": budget, "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine()}
    t0 = time.perf_counter()
    quick = budget == "quick"

    def save(data: dict) -> None:
        save_json({**meta, "seconds": time.perf_counter() - t0, "load_at_end": os.getloadavg()[0], **data}, path)

    if suite in ("efficiency", "collapse", "bias", "longrun", "flowrun", "guardrun", "flowguard"):  # resumable: saved runs are kept
        saved = json.loads(path.read_text()) if path.is_file() else {}
        if suite == "bias":
            data = bias_map.run_suite(quick, done=saved.get("cells", []), save=save)
        elif suite in ("guardrun", "flowguard"):
            source = "flowrun" if suite == "flowguard" else "longrun"
            longrun = [run for q in sorted(RESULTS.glob(f"{source}-{budget}*.json"))
                       for run in json.loads(q.read_text()).get("runs", [])]  # the rates come from its sweep
            data = guard_check.run_suite(quick, done=saved.get("runs", []), save=save, longrun=longrun,
                                         variants=list(variants), seeds=list(seeds), Ts=list(Ts),
                                         rewards=list(long_rewards), flow=suite == "flowguard")
        elif suite in ("longrun", "flowrun"):
            others = [run for q in sorted(RESULTS.glob(f"{suite}-{budget}*.json")) if q != path
                      for run in json.loads(q.read_text()).get("runs", [])]  # other processes' finished runs
            data = long_run.run_suite(quick, done=saved.get("runs", []), save=save, variants=list(variants),
                                      flow=suite == "flowrun", others=others, lrs=list(lrs),
                                      seeds=list(seeds), Ts=list(Ts), rewards=list(long_rewards))
        else:
            done = saved.get("runs", [])
            data = (efficiency.run_suite(quick, done=done, save=save, rewards=rewards) if suite == "efficiency"
                    else efficiency.run_collapse(quick, done=done, save=save))
    else:
        data = {"cost": cost.run_suite, "quality": quality.run_suite, "scaling": scaling.run_suite}[suite](quick)
    save(data)
    logging.info("%s (%s) done in %.0f s -> %s", suite, budget, time.perf_counter() - t0, path)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("quick", "full"), default="quick")
    ap.add_argument("--only", nargs="+", choices=SUITES, default=list(SUITES))
    ap.add_argument("--rewards", nargs="+", choices=efficiency.REWARDS, default=list(efficiency.REWARDS),
                    help="efficiency suite: the rewards to train on (one reward per process splits the work)")
    ap.add_argument("--variants", nargs="+", choices=tuple(long_run.VARIANTS), default=[],
                    help="longrun/guardrun/flowguard suites: only these variants (two processes can share the work; the page merges them)")
    ap.add_argument("--lrs", nargs="+", type=float, default=[],
                    help="longrun suite: only these rates of the sweep (with --variants; two processes can sweep in parallel); "
                         "a rate outside the grid extends the sweep for these variants, rewards and T")
    ap.add_argument("--seeds", nargs="+", type=int, default=[],
                    help="longrun/guardrun/flowguard suites: only these seeds after the sweep (with --variants; processes can split seeds)")
    ap.add_argument("--longrun-rewards", nargs="+", default=[],
                    help="longrun/flowrun/guardrun suites: only these rewards (with --variants)")
    ap.add_argument("--Ts", nargs="+", type=int, default=[],
                    help="longrun/guardrun suites: only these numbers of sampling steps (with --variants)")
    ap.add_argument("--report-only", action="store_true", help="only re-render docs/benchmarks.md")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("matplotlib", "PIL", "rlr_backend.train.trainer", "rlr_backend.estimators.rlr",
                  "transformers.utils.import_utils"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    if not args.report_only:
        for suite in args.only:
            if suite == "memory":
                run_memory_model(args.suite, args.threads)
            else:
                run(suite, args.suite, tuple(args.rewards), tuple(args.variants), tuple(args.lrs),
                    tuple(args.seeds), tuple(args.Ts), tuple(args.longrun_rewards))
    report.render(RESULTS, args.out)


if __name__ == "__main__":
    main()
