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
