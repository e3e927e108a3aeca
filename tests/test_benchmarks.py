"""The benchmark pipeline on a tiny budget: each suite's measuring code runs and the page renders.

Real numbers come from `python -m benchmarks.run`; this only checks that the pipeline works and
that its figures are consistent (ratios are ratios, fits reproduce their points, summaries agree).
"""

import json
import math

import pytest
import torch

from benchmarks import cost, efficiency, report, scaling


@pytest.fixture(scope="module")
def cost_rows():
    return cost.measure_costs("default", 3, 1, ["truncated_bp K=1", "full_bp"])


def test_cost_rows_are_consistent(cost_rows):
    by = {r["estimator"]: r for r in cost_rows}
    for r in cost_rows:
        assert r["time_ratio"] == pytest.approx(r["seconds"] / r["sample_seconds"])
        assert r["memory_ratio"] == pytest.approx(r["bytes"] / r["sample_bytes"])
        assert r["bytes"] > r["sample_bytes"] * 0.5
    # full backprop keeps all 3 steps in memory, truncated 1: the cost model counts it
    assert by["full_bp"]["steps_in_memory"] == 3 and by["truncated_bp K=1"]["steps_in_memory"] == 1
    assert by["full_bp"]["bytes"] > by["truncated_bp K=1"]["bytes"]
    assert by["full_bp"]["predicted_time_ratio"] == pytest.approx((3 + 2 * 3) / 3)


def test_memory_fit_recovers_a_power_law():
    rows = [{"T": T, "batch": b, "pixels": 32, "activation_bytes": 3.0 * T ** 1.0 * b ** 0.5}
            for T in (5, 10, 20) for b in (1, 2, 4)]
    f = scaling.fit(rows)
    assert f["exponents"]["T"] == pytest.approx(1.0, abs=1e-9)
    assert f["exponents"]["batch"] == pytest.approx(0.5, abs=1e-9)
    assert scaling.predict(f, T=40, batch=8, pixels=32) == pytest.approx(3.0 * 40 * 8 ** 0.5)


def test_diversity_is_zero_for_identical_images():
    same = torch.rand(1, 3, 8, 8).expand(4, -1, -1, -1)
    assert efficiency.diversity(same, 4) == pytest.approx(0.0, abs=1e-6)
    assert efficiency.diversity(torch.rand(8, 3, 8, 8), 4) > 0.1


def test_efficiency_run_and_page(cost_rows, tmp_path):
    run = efficiency.train_curve("rlr", "brightness", 0, steps=2, eval_every=1, batch=2, per_prompt=2,
                                 num_steps=4, out=tmp_path)
    assert [p["samples"] for p in run["points"]] == [0, 2, 4]
    assert all(math.isfinite(p["eval_reward"]) for p in run["points"])
    meta = {"budget": "quick", "started": "now", "seconds": 1.0, "command": "test", "load_at_end": 0.0,
            "machine": {"cpu": "x", "cores": 2, "threads": 1, "load_at_start": 0.0, "torch": torch.__version__,
                        "diffusers": "-", "commit": "-"}}
    results = tmp_path / "results"
    results.mkdir()
    eff = {**meta, "settings": efficiency.settings(True), "runs": [run, {**run, "estimator": "ddpo"}]}
    (results / "efficiency-quick.json").write_text(json.dumps(eff))
    (results / "cost-quick.json").write_text(json.dumps({**meta, "rows": cost_rows}))
    summary = efficiency.summarize(eff)
    assert {s["estimator"] for s in summary} == {"rlr", "ddpo"}
    assert summary[0]["final_mean"] == pytest.approx(run["points"][-1]["eval_reward"])
    page = tmp_path / "docs" / "benchmarks.md"
    report.render(results, page)
    text = page.read_text()
    assert "## Cost of one update" in text and "## Sample efficiency" in text
    assert "no results yet" in text  # quality and scaling were not run
    assert (tmp_path / "docs" / "images" / "bench_cost_model.png").is_file()
    assert (tmp_path / "docs" / "images" / "bench_efficiency_brightness.png").is_file()
