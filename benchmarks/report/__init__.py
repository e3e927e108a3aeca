"""Render docs/benchmarks.md and its plots from the JSON results of benchmarks.run (one module per group of
sections: headline, costs, learning; bias_map and long_run render their own)."""

from __future__ import annotations

import json
from pathlib import Path

from rlr_backend.safe_io import atomic_path

from .. import bias_map, guard_check, long_run
from .common import _load, merged, sync_block
from .costs import _load_memory_model, cost_section, memory_model_section, scaling_section
from .headline import headline_section
from .learning import collapse_section, efficiency_section, quality_section
from .overview import overview_section, overview_table, tasks

__all__ = ["collapse_section", "cost_section", "efficiency_section", "headline_section", "memory_model_section",
           "overview_section", "quality_section", "render", "scaling_section"]


def render(results: Path, out: Path) -> None:
    images = out.parent / "images"
    lines = ["# Benchmarks", "", "Every figure on this page comes from `python -m benchmarks.run` "
             "(`--suite quick` in minutes, `--suite full` in about six hours on 2 CPU cores); the JSON behind it is in "
             "`benchmarks/results/`. Ratios are measured in one run, so load on a shared machine cancels out.", ""]
    lines += headline_section(results)
    found = tasks(results)  # the overview table, shown here and in docs/estimators.md
    lines += overview_section(found, images)
    sections = {"cost": cost_section, "quality": quality_section, "efficiency": efficiency_section,
                "collapse": collapse_section, "scaling": scaling_section, "bias": bias_map.section,
                "longrun": long_run.section, "flowrun": long_run.flow_section,
                "guardrun": lambda r, images: guard_check.section(r, images, (_load(results, "longrun") or {}).get("runs"),
                                                                  (_load(results, "flowrun") or {}).get("runs"))}
    for suite, fn in sections.items():
        r = _load(results, suite)
        if suite == "guardrun":  # the flow-matching suite's guard runs are rows of the same table
            both = [x for x in (r, _load(results, "flowguard")) if x]
            r = merged(both) if both else None
        lines += fn(r, images) if r else [f"## {suite}", "", f"(no results yet: `python -m benchmarks.run --only {suite}`)", ""]
    mem = _load_memory_model(results)
    lines += memory_model_section(mem, images) if mem else [
        "## memory", "", "(no results yet: `python -m benchmarks.run --only memory`)", ""]
    guard = results / "guard-cost.json"
    if guard.is_file():
        from ..guard_cost import render as guard_cost_lines

        lines += ["## What the structure rewards and the KL guard cost", "",
                  *guard_cost_lines(json.loads(guard.read_text())), ""]
    step = results / "step-baseline.json"
    if step.is_file():
        from ..step_baseline import render as step_baseline_lines

        lines += ["## RLR's step baseline: the noise it removes", "", *step_baseline_lines(json.loads(step.read_text())), ""]
    from ..gpu_check.report import benchmarks_doc_section

    lines += benchmarks_doc_section(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    estimators = out.parent / "estimators.md"  # its recommendation shows the same table, kept in step here
    if estimators.is_file():
        sync_block(estimators, "overview", overview_table(found))
