"""docs/benchmarks.md's "Which estimator wins where": every training task the suites measured, each estimator's
gain over the start as a share of the best estimator's gain on that task. Read off the suites' own summaries
(efficiency, long runs, flow runs, the default run), so it stays true when they are re-run."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .. import efficiency, long_run
from .common import _load, _plt, _save

#: the page's columns: RLR as the product trains it first
COLUMNS = ("RLR", "RLR, no step baseline", "RLR as in the paper", "truncated backprop", "full backprop + ckpt",
           "DDPO", "REINFORCE + step baseline")
#: each column's bar colour, fixed so a column keeps its colour when columns are added
COLOURS = dict(zip(COLUMNS, ("C0", "C1", "C8", "C2", "C3", "C4", "C5")))
#: a suite's estimator or variant name -> column (names not listed are left out: code_compat, the KL variants,
#: plain REINFORCE). "RLR as in the paper": fo_steps=1, no step baseline
NAMES = {"rlr_sb": "RLR", "rlr + step baseline": "RLR", "rlr": "RLR, no step baseline",
         "rlr, no step baseline": "RLR, no step baseline", "truncated_bp": "truncated backprop",
         "rlr paper": "RLR as in the paper", "full_bp + ckpt": "full backprop + ckpt", "ddpo": "DDPO",
         "zo_sb": "REINFORCE + step baseline"}
#: default_run's labels differ: there "rlr" is RLR as trained by default (with the step baseline)
DEFAULT_RUN_NAMES = {**NAMES, "rlr": "RLR"}


def _cell(final: float, start: float, seeds: int, lr) -> dict:
    return {"final": final, "start": start, "gain": final - start, "seeds": seeds, "lr": lr}


def tasks(results: Path) -> list[tuple[str, dict[str, dict]]]:
    """[(task label, {column: cell})] for every task with results; cell: final mean reward, start, gain, seeds."""
    out: list[tuple[str, dict[str, dict]]] = []
    eff = _load(results, "efficiency")
    if eff:
        n = eff["settings"]["updates"]
        labels = {"prompt_alignment": f"prompt alignment, {n} updates",
                  "jpeg_compressibility": f"JPEG compressibility (not differentiable), {n} updates"}
        for reward in labels:
            rows = [x for x in efficiency.summarize(eff) if x["reward"] == reward and x["estimator"] in NAMES]
            if rows:
                out.append((labels[reward], {NAMES[x["estimator"]]: _cell(x["final_mean"], x["start"], x["seeds"], x["lr"])
                                             for x in rows}))
    default = results / "default-run.json"
    if default.is_file():
        saved = json.loads(default.read_text())
        runs = saved["runs"]
        cells = {}
        for label in dict.fromkeys(r["estimator"] for r in runs):
            if label in DEFAULT_RUN_NAMES:
                mine = [r for r in runs if r["estimator"] == label]
                cells[DEFAULT_RUN_NAMES[label]] = _cell(statistics.mean(r["after"] for r in mine),
                                                        statistics.mean(r["before"] for r in mine), len(mine), None)
        if cells:
            out.append((f"default run: alignment + brightness, {saved['config']['steps']} updates", cells))
    for suite, prefix in (("longrun", ""), ("flowrun", "default-flow ")):
        r = _load(results, suite)
        if not r:
            continue
        rows = long_run.summarize(r)
        for reward, T in dict.fromkeys((x["reward"], x["T"]) for x in rows):
            mine = [x for x in rows if (x["reward"], x["T"]) == (reward, T) and x["variant"] in NAMES]
            if mine:
                out.append((f"{prefix}{reward}, T={T}, {mine[0]['updates']} updates",
                            {NAMES[x["variant"]]: _cell(x["final_mean"], x["start"], x["seeds"], x["lr"]) for x in mine}))
    return out


def overview_table(found: list[tuple[str, dict[str, dict]]]) -> list[str]:
    """The table of ``tasks``: final reward and share of the best gain, per task and estimator (also kept in
    docs/estimators.md, between markers, by ``report.render``)."""
    lines = ["| task | start | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for label, cells in found:
        best = max(c["gain"] for c in cells.values())
        row = []
        for col in COLUMNS:
            c = cells.get(col)
            if c is None:
                row.append("")
                continue
            share = c["gain"] / best if best > 0 else float("nan")
            text = f"{c['final']:.3f} ({share:.0%})" + ("" if c["seeds"] >= 3 else f", {c['seeds']} seed{'s' * (c['seeds'] > 1)}")
            row.append(f"**{text}**" if c["gain"] == best else text)
        start = statistics.mean(c["start"] for c in cells.values())
        lines.append(f"| {label} | {start:.3f} | " + " | ".join(row) + " |")
    return lines


def overview_section(found: list[tuple[str, dict[str, dict]]], images: Path) -> list[str]:
    """The page's section from :func:`tasks`' list (read once by ``render``, which shows the same table in
    docs/estimators.md)."""
    if not found:
        return []
    lines = ["## Which estimator wins where", "",
             "Every training task the suites below measured, on held-out or fixed evaluation seeds: the final reward "
             "(mean over seeds) and, in brackets, the gain over the start as a share of the best estimator's gain on "
             "that task (the best in bold). Each estimator at its chosen learning rate; fewer than 3 seeds are marked. "
             "Empty: not run on that task.", "", *overview_table(found)]
    lines += ["", f"![gain as a share of the best estimator's, per task]({images.name}/bench_overview.png)", "",
              "The plot leaves out tasks with one estimator so far; seed counts are in the table.", ""]
    _plot([t for t in found if len(t[1]) > 1], images / "bench_overview.png")
    return lines


def _plot(found: list[tuple[str, dict[str, dict]]], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 0.75 * len(found) + 2.2))
    height = 0.8 / len(COLUMNS)
    for i, col in enumerate(COLUMNS):
        ys, xs = [], []
        for t, (_, cells) in enumerate(found):
            best = max(c["gain"] for c in cells.values())
            if col in cells and best > 0:
                ys.append(t + (i - (len(COLUMNS) - 1) / 2) * height)
                xs.append(cells[col]["gain"] / best)
        ax.barh(ys, xs, height=height, label=col, color=COLOURS[col])
    ax.set_yticks(range(len(found)), [label for label, _ in found], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel("gain over the start, as a share of the best estimator's gain on the task")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.35, -0.09), ncol=3, frameon=False)
    fig.tight_layout()
    _save(fig, path)
