"""``python -m benchmarks.memory_model``: measure what is missing, validate on stacks, fit, write the page."""

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

from ..gpu_check.report import load_result
from .analysis import analyse
from .measure import plan, run_measurements
from .model import model_counts, with_margin
from .plots import plot
from .report import render
from .store import DOC, GB, QUICK_RESULTS, RESULTS, load
from .validation import validate, validation_cases

logger = logging.getLogger(__name__)


def machine() -> dict:
    from benchmarks.common import machine as common_machine

    return common_machine()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.memory_model", description=sys.modules[__package__].__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small points only; writes memory-model-quick.json")
    ap.add_argument("--report-only", action="store_true", help="re-fit and re-render from the saved measurements")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-minutes", type=float, default=120.0, help="stop measuring new points after this")
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="the page (default docs/memory.md; quick: none)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("matplotlib", "PIL", "rlr_backend.lora.inject", "rlr_backend.estimators.rlr"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    path = args.results or (QUICK_RESULTS if args.quick else RESULTS)
    data = load(path)
    if not args.report_only:
        command = "python -m benchmarks.memory_model " + " ".join(sys.argv[1:] if argv is None else argv)
        data["commands"] = data.get("commands", []) + [command]
        data.update({"budget": "quick" if args.quick else "full", "command": data["commands"][0],
                     "started": data.get("started") or datetime.datetime.now(datetime.timezone.utc).isoformat(
                         timespec="seconds"), "machine": machine()})
        data.setdefault("points", [])
        data.setdefault("validation", [])
        data["counts"] = model_counts()

        def save() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(path)

        deadline = time.time() + 60 * args.budget_minutes
        points = plan(args.quick)
        n_small = len(points) if args.quick else \
            next(i for i, p in enumerate(points) if p.component != "reward" and p.lat >= 48)
        run_measurements(points[:n_small], data["points"], save, deadline)
        done = {v["key"] for v in data["validation"]}
        for case in validation_cases(args.quick):
            if case.key not in done:
                v = validate(case)
                data["validation"].append(v)
                save()
                logger.info("%-58s measured %7.1f MB predicted %7.1f MB (%+.1f%%)", case.key, v["measured"] / 1e6,
                            v["predicted"] / 1e6, 100 * v["rel_error"])
        run_measurements(points[n_small:], data["points"], save, deadline)
    analysis = analyse(data, load_result(path.parent))
    data["analysis"] = analysis
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    out = args.out or (None if args.quick else DOC)
    if out is not None:
        images_dir = out.parent / "images"
        images_dir.mkdir(parents=True, exist_ok=True)
        images = plot(data, analysis, images_dir)
        render(data, analysis, out, images)
        logger.info("wrote %s and %s", out, ", ".join(map(str, images)))
    summary(analysis)


def summary(analysis: dict) -> None:
    """Log the predictions table (the CLI's final output)."""
    logger.info("%-6s %-5s %-3s %-3s %-40s %-8s %9s %9s", "model", "px", "B", "FO", "options", "estim.", "peak GB",
                "+margin")
    for p in analysis["predictions"]:
        s, o = p["scenario"], p["options"]
        logger.info("%-6s %-5d %-3d %-3d %-40s %-8s %9.2f %9.2f", s["arch"], s["resolution"], s["batch"],
                    s["fo_steps"], o["label"], p["estimator"], p["bytes"] / GB, with_margin(p["bytes"]) / GB)
