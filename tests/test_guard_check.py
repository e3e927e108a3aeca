"""The guard suite (benchmarks/guard_check.py) and the long-run page's evaluation-noise figure."""

from __future__ import annotations

import math

import pytest


def test_guard_check_retrains_the_long_run_rates_and_measures_the_guard_on_set_c(monkeypatch, tmp_path):
    """The guard suite trains each cell at the long-run sweep's rate (skipping a cell with no sweep), records a
    set-C reward at every evaluation, resumes without training again, and measures the share of the peak gain
    the guard's pick keeps on set C (and on set B, as the long-run table does)."""
    from benchmarks import guard_check

    calls = []

    def curve(est, reward, seed, steps, every, batch, per_prompt, T, out, lr=1e-3, overrides=None, tag="",
              heldout_seed=None, eval_seeds=2, check=None):
        calls.append((tag[1:], lr, seed, check))
        a = [0.0, 0.9, 0.6, 0.7]  # set A: noisy, its best is update 1
        b = [0.0, 1.0, 0.5, 0.8]  # set B: noisier still
        c = [0.0, 0.5, 0.8, 1.0]  # set C: the LoRA keeps improving
        return {"estimator": est, "reward": reward, "seed": seed, "lr": lr, "wall_seconds": 1.0, "run_name": "r",
                "points": [{"step": i, "samples": i * batch, "train_cpu_seconds": i, "eval_reward": a[i],
                            "heldout_reward": b[i], "check_reward": c[i], "diversity": 0.3} for i in range(4)]}

    monkeypatch.setattr(guard_check, "train_curve", curve)
    monkeypatch.setenv("RLR_BENCH_WORK", str(tmp_path / "work"))
    sweep = [{"reward": "position:left", "T": 6, "variant": "rlr", "lr": lr, "seed": 0,
              "points": [{"eval_reward": e, "heldout_reward": 0.0}] * 3} for lr, e in ((1e-3, 0.1), (3e-3, 0.2))]
    result = guard_check.run_suite(True, longrun=sweep)
    assert calls == [("rlr-T6", 3e-3, 0, (guard_check.CHECK_SEED, 4)),  # rlr's sweep chose 3e-3
                     ("rlr + kl-T6", 3e-3, 0, (guard_check.CHECK_SEED, 4))]  # borrows it; truncated_bp: no sweep
    calls.clear()
    assert guard_check.run_suite(True, done=result["runs"], longrun=sweep)["runs"] == result["runs"] and calls == []
    row = guard_check.run_row(result["runs"][0], sweep)
    assert row["pick_step"] == 1 and row["kept_c"] == 0.5 and row["guard_c"] == pytest.approx(0.5)
    assert row["guard_b"] == pytest.approx(1.0) and row["end_share_c"] == pytest.approx(1.0)
    assert row["longrun_diff"] == math.inf  # the long-run stand-in of that key has 3 evaluations, not 4
    assert guard_check.run_row(result["runs"][0], sweep[:1])["longrun_diff"] is None  # no run of that key
    twin = {**result["runs"][0], "points": [{**p, "heldout_reward": p["heldout_reward"] + 0.25}
                                            for p in result["runs"][0]["points"]]}
    assert guard_check.run_row(result["runs"][0], [twin])["longrun_diff"] == pytest.approx(0.25)
    page = "\n".join(guard_check.section({**result, "budget": "quick", "seconds": 10}, tmp_path, [twin]))
    assert "| `position:left` | 6 | rlr | 0.003 | 0 | 1 | - | 0.0000 -> 0.5000 (1.0000 at 3) | 0.50 | 0.50 | 1.00 | 1.00 | 0.2 |" in page
    assert "(0 with the final check) the kept LoRA holds 0.50 of the peak gain on set C (min 0.50); the best on set A " \
           "alone 0.50 (min 0.50); measured on set B, as the long-run table does, the kept LoRA holds 1.00 (min 1.00)" in page
    checked = {**result["runs"][0], "guard_step": 3}  # the trainer's final check kept the last LoRA
    row = guard_check.run_row(checked)
    assert (row["best_a_step"], row["pick_step"], row["guard_a_c"], row["guard_c"]) == (1, 3, 0.5, 1.0)
    page = "\n".join(guard_check.section({**result, "runs": [checked], "budget": "quick", "seconds": 10}, tmp_path))
    assert "| 0 | 1 | 3 | 0.0000 -> 1.0000 (1.0000 at 3) | 0.50 | 1.00 | 1.00 | 0.80 | - |" in page
    with pytest.raises(ValueError, match=r"Ts \[7\] are not in the long-run suite's \[6\]"):
        guard_check.run_suite(True, longrun=sweep, Ts=[7])


def test_flow_guard_trains_on_default_flow_at_the_flow_sweeps_rate_and_shares_the_page_table(monkeypatch, tmp_path):
    """``flow=True``: the flow-matching suite's cells, trained on its model at the rate its sweep chose, the run
    marked with the model; on the page its row is labelled and its twin is looked up among the flow suite's runs
    (not the embedded model's run of the same key), and each model gets its own summary line."""
    from benchmarks import guard_check

    seen = []

    def curve(est, reward, seed, steps, every, batch, per_prompt, T, out, lr=1e-3, overrides=None, tag="",
              heldout_seed=None, eval_seeds=2, check=None):
        seen.append((tag[1:], lr, (overrides or {}).get("model"), out.name))
        return {"estimator": est, "reward": reward, "seed": seed, "lr": lr, "wall_seconds": 1.0, "run_name": "r",
                "points": [{"step": i, "samples": i, "eval_reward": x, "heldout_reward": x, "check_reward": x,
                            "diversity": 0.3} for i, x in enumerate((0.0, 0.5, 1.0))]}

    monkeypatch.setattr(guard_check, "train_curve", curve)
    monkeypatch.setenv("RLR_BENCH_WORK", str(tmp_path / "work"))
    sweep = [{"reward": "position:left", "T": 6, "variant": "truncated_bp", "lr": lr, "seed": 0,
              "points": [{"eval_reward": e, "heldout_reward": 0.0}] * 3} for lr, e in ((1e-3, 0.3), (3e-3, 0.2))]
    flow = guard_check.run_suite(True, longrun=sweep, flow=True)
    assert seen == [("truncated_bp-T6", 1e-3, "default-flow", "flowguard-quick")]
    assert flow["runs"][0]["model"] == "default-flow" and flow["settings"]["model"] == "default-flow"
    embedded = {**flow["runs"][0], "model": None}
    twin = {**flow["runs"][0], "points": [{**p, "heldout_reward": p["heldout_reward"] + 0.5} for p in flow["runs"][0]["points"]]}
    page = "\n".join(guard_check.section({**flow, "runs": [embedded, flow["runs"][0]], "budget": "quick", "seconds": 1},
                                         tmp_path, [], [twin]))
    assert "| `position:left` (default-flow) | 6 | truncated_bp | 0.001 | 0 | 2 | - |" in page
    assert page.count("| 0.5 |") == 1 and page.count("| - |\n") == 1  # the flow row found its flow twin only
    assert "Across the 1 runs on `default-flow`" in page and "Across the 1 runs on the embedded model" in page
    with pytest.raises(ValueError, match=r"Ts \[20\] are not in the flow-run suite's \[6\]"):
        guard_check.run_suite(True, longrun=sweep, Ts=[20], flow=True)


def test_eval_noise_is_the_spread_of_set_a_minus_set_b_without_each_runs_offset():
    """var(A - B) = 2 sigma^2 for two independent evaluations of one LoRA; a run's constant offset between
    the seed sets is not noise, and another (reward, T)'s runs do not count."""
    from benchmarks import long_run

    def run(offset, a, reward="size:0.4", T=20):
        d = [offset + a * (-1) ** i for i in range(4)]
        return {"reward": reward, "T": T, "points": [{"eval_reward": 0.0, "heldout_reward": 0.0}] +
                [{"eval_reward": 0.5 + x, "heldout_reward": 0.5} for x in d]}

    runs = [run(0.3, 0.02), run(-0.1, 0.02), run(0.0, 5.0, T=50)]
    assert long_run.eval_noise(runs, "size:0.4", 20) == pytest.approx(0.02 / math.sqrt(2))
    assert long_run.eval_noise(runs, "size:0.4", 50) == pytest.approx(5.0 / math.sqrt(2))
    assert math.isnan(long_run.eval_noise(runs, "brightness", 20))
