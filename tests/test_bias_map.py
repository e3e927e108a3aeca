"""The truncation-bias map (benchmarks/bias_map.py) on a tiny budget: a cell's statistics, its page section and
the summary over chain lengths. Real figures: `python -m benchmarks.run --only bias` (docs/benchmarks.md)."""

import math

import pytest

from benchmarks import bias_map


def test_bias_map_cell_and_page(tmp_path):
    """One tiny cell of the truncation-bias map: every estimator row has its statistics, the per-step shares
    add up to the full gradient along its own direction, and the page renders its tables and plot."""
    cell = bias_map.measure(dict(reward="position:left", T=6, state="base"), batches=3, batch=2, train_updates=1)
    names = [row["estimator"] for row in cell["rows"]]
    assert names == ["truncated_bp K=1", "truncated_bp K=2", "truncated_bp K=3", "truncated_bp K=4",
                     *bias_map.RLR_VARIANTS]
    assert sum(cell["step_share"]) == pytest.approx(1.0)
    for row in cell["rows"]:
        assert all(math.isfinite(row[k][0]) for k in ("cos", "norm_ratio", "along"))
    jpeg = bias_map.measure(dict(reward="jpeg_compressibility", T=6, state="base"), batches=1, batch=2,
                            train_updates=1)
    page = "\n".join(bias_map.section({"cells": [cell, jpeg], "budget": "quick", "seconds": 1}, tmp_path))
    assert "| `position:left` | 6 | base |" in page and "n/a: not differentiable" in page
    assert (tmp_path / "bench_bias_map.png").is_file()


def test_bias_map_lists_truncations_share_at_each_chain_length():
    def cell(t, along, state="base"):
        return dict(reward="brightness", T=t, state=state, differentiable=True,
                    rows=[dict(estimator="truncated_bp K=1", along=[0.9, 0.1]),
                          dict(estimator="truncated_bp K=2", along=[along, 0.01])])

    lines = bias_map._with_t([cell(50, 0.06), cell(10, 0.15), cell(20, 0.5, state="trained")])
    assert any("0.15 ± 0.01 at T=10, 0.06 ± 0.01 at T=50" in line for line in lines), lines
    assert bias_map._with_t([cell(20, 0.1)]) == []


def test_a_recheck_is_listed_beside_its_cell_and_says_when_the_error_bar_was_too_small(tmp_path):
    """A recheck with 4x the batches whose error bar did not halve: the line names both results and says the map's
    error was too small; one whose error bar halved says nothing of the kind."""
    import json

    def cell(batches, rlr, seed=None):
        rows = [{"estimator": name, "along": along} for name, along in
                [("truncated_bp K=2", (0.05, 0.02)), (next(iter(bias_map.RLR_VARIANTS)), rlr),
                 (list(bias_map.RLR_VARIANTS)[1], (0.3, 1.0))]]
        return dict(reward="prompt_alignment", T=20, state="trained", differentiable=True, batches=batches, batch=8,
                    rows=rows, seconds=60.0, **({"seed": seed} if seed is not None else {}))

    first = cell(16, (0.12, 0.18))
    for rlr, flagged in (((0.6, 0.42), True), ((0.9, 0.09), False)):
        path = tmp_path / "rechecks.json"
        path.write_text(json.dumps({"cells": [cell(64, rlr, seed=1)]}))
        lines = bias_map._rechecks(path, [first])
        text = "\n".join(lines)
        assert "64 batches of 8, seed 1" in text and "RLR 0.12 ± 0.18, 4.9 errors from 1" in text
        assert ("error was most likely too small" in text) is flagged
