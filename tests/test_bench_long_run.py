"""The long-run suite's orchestration and page with a stand-in trainer: the sweep's choice of rate, resuming,
splitting the work between processes, and the order the page lists tasks in."""
import pytest

from benchmarks import long_run


def test_the_long_run_sweep_does_not_pick_a_rate_on_one_lucky_last_evaluation():
    """A seed-0 run that collapsed and half-recovered at its last evaluation (the size:0.4 T=50 RLR sweep)
    ends a hair above a steady one; the sweep scores the last three evaluations, so the steady rate wins."""
    def run(lr, evals, seed=0):
        return {"reward": "size:0.4", "T": 50, "variant": "rlr", "lr": lr, "seed": seed,
                "points": [{"eval_reward": e} for e in evals]}

    steady, collapsed = run(1e-3, [-0.09, -0.04, -0.03, -0.03, -0.032]), run(3e-3, [-0.09, -0.03, -0.12, -0.09, -0.030])
    assert collapsed["points"][-1]["eval_reward"] > steady["points"][-1]["eval_reward"]
    assert long_run.chosen_lr([collapsed, steady], "size:0.4", 50, "rlr") == 1e-3
    assert long_run.sweep_score(collapsed) == pytest.approx((-0.12 - 0.09 - 0.03) / 3)
    assert long_run.chosen_lr([run(1e-3, [-0.09, -0.2, -0.01], seed=1)], "size:0.4", 50, "rlr") is None  # seed 0 only


def test_long_run_suite_sweeps_then_seeds_resumes_and_reports(monkeypatch, tmp_path):
    """Orchestration with a stand-in trainer: every variant's rate is swept on seed 0, the other seeds train
    at the best rate, the guard variant borrows RLR's, a resumed suite trains nothing again, and the page
    reports the peak-gain share from the held-out set (which rises then falls for truncated_bp here)."""
    calls, models = [], []
    ends = {("rlr", 1e-3): 0.8, ("rlr", 3e-3): 0.9, ("truncated_bp", 1e-3): 0.7, ("truncated_bp", 3e-3): 0.6,
            ("rlr + kl", 3e-3): 0.85, ("rlr", 1e-2): 0.95}

    def curve(est, reward, seed, steps, every, batch, per_prompt, T, out, lr=1e-3, overrides=None, tag="",
              heldout_seed=None, eval_seeds=2):
        assert tag.endswith(f"-T{T}") == (T != 20)  # a T=50 run does not resume a T=20 run's folder
        variant = tag[1:].removesuffix(f"-T{T}")
        calls.append((variant, lr, seed))
        models.append((overrides or {}).get("model"))
        end = ends[(variant, lr)]
        shape = [0.0, 0.5, 1.0] if variant != "truncated_bp" else [0.0, 1.0, 0.5]  # truncated_bp peaks early
        return {"estimator": est, "reward": reward, "seed": seed, "lr": lr, "wall_seconds": 1.0, "run_name": "r",
                "points": [
            {"step": i, "samples": i * batch, "train_cpu_seconds": 10.0 * i, "eval_reward": 0.5 + (end - 0.5) * f,
             "heldout_reward": 0.5 + (end - 0.5) * f, "diversity": 0.3 - 0.05 * i} for i, f in enumerate(shape)]}

    monkeypatch.setattr(long_run, "train_curve", curve)
    monkeypatch.setenv("RLR_BENCH_WORK", str(tmp_path / "work"))
    result = long_run.run_suite(True)
    assert all("run_name" not in r for r in result["runs"])
    assert calls[:4] == [("rlr", 1e-3, 0), ("truncated_bp", 1e-3, 0), ("rlr", 3e-3, 0), ("truncated_bp", 3e-3, 0)]
    assert set(calls[4:]) == {("rlr", 3e-3, 0), ("truncated_bp", 1e-3, 0), ("rlr + kl", 3e-3, 0),
                              ("rlr", 3e-3, 1), ("truncated_bp", 1e-3, 1), ("rlr + kl", 3e-3, 1)} - {
                                  ("rlr", 3e-3, 0), ("truncated_bp", 1e-3, 0)}
    calls.clear()
    long_run.run_suite(True, done=result["runs"])
    assert calls == []
    split = [r for r in result["runs"] if r["variant"] == "rlr"]  # another process saved RLR's runs
    alone = long_run.run_suite(True, variants=["rlr + kl"], others=split)
    assert calls == [("rlr + kl", 3e-3, 0), ("rlr + kl", 3e-3, 1)] and len(alone["runs"]) == 2  # RLR's rate
    calls.clear()
    assert long_run.run_suite(True, variants=["rlr + kl"])["runs"] == [] and calls == []  # no sweep: waits
    one = long_run.run_suite(True, variants=["rlr"], lrs=[3e-3], seeds=[1], Ts=[6])  # a process's share of the work
    assert calls == [("rlr", 3e-3, 0)] and len(one["runs"]) == 1  # seed 1 waits for the rest of the sweep
    calls.clear()
    other = [r for r in split if (r["lr"], r["seed"]) == (1e-3, 0)]  # another process tried the other rate
    two = long_run.run_suite(True, variants=["rlr"], lrs=[3e-3], seeds=[1], Ts=[6], done=one["runs"], others=other)
    assert calls == [("rlr", 3e-3, 1)] and len(two["runs"]) == 2  # now seed 1 trains, at the sweep's choice
    calls.clear()
    beyond = long_run.run_suite(True, variants=["rlr"], lrs=[1e-2], seeds=[1], others=result["runs"])
    assert calls == [("rlr", 1e-2, 0), ("rlr", 1e-2, 1)]  # a rate past the grid's edge extends the sweep, and wins
    calls.clear()
    page = "\n".join(long_run.section({**result, "runs": result["runs"] + beyond["runs"], "budget": "quick",
                                       "seconds": 10}, tmp_path))
    assert "| `position:left` | 6 | rlr | 0.650 / 0.800 | 0.700 / 0.900 | **0.725 / 0.950** | 0.01 (edge: highest) |" in page
    with pytest.raises(ValueError, match=r"T \[7\] are not in the suite's \[6\]"):
        long_run.run_suite(True, variants=["rlr"], Ts=[6, 7])
    with pytest.raises(ValueError, match=r"rewards \['size:0.4'\] are not in the suite's \['position:left'\]"):
        long_run.run_suite(True, variants=["rlr"], rewards=["size:0.4"])
    rows = {x["variant"]: x for x in long_run.summarize(result)}
    assert rows["rlr"]["share_kept_min"] == pytest.approx(1.0)
    assert rows["truncated_bp"]["share_kept_mean"] == pytest.approx(0.5)
    assert rows["truncated_bp"]["kept_mean"] == pytest.approx(0.7)  # the guard keeps the early peak
    assert rows["truncated_bp"]["guard_share_min"] == pytest.approx(1.0)  # all of it, on every seed
    partial = [r for r in result["runs"] if not (r["variant"] == "rlr" and r["lr"] == 3e-3)]
    page = "\n".join(long_run.section({**result, "runs": partial, "budget": "quick", "seconds": 10}, tmp_path))
    assert "| `position:left` | 6 | rlr | 0.001 (1/2 tried) | 1 |" in page  # a sweep not finished says so
    assert "| `position:left` | 6 | rlr | **0.650 / 0.800** |  | 0.001, 1 of the grid not tried |" in page
    page = "\n".join(long_run.section({**result, "budget": "quick", "seconds": 10}, tmp_path))
    assert "| `position:left` | 6 | rlr | 0.003 | 2 |" in page
    assert "| reward | T | variant | lr 0.001 | lr 0.003 | chosen |" in page  # the sweeps: score / end per rate
    assert "| `position:left` | 6 | rlr | 0.650 / 0.800 | **0.700 / 0.900** | 0.003 (edge: highest) |" in page
    assert "| `position:left` | 6 | truncated_bp | **0.600 / 0.600** | 0.550 / 0.550 | 0.001 (edge: lowest) |" in page
    assert "| `position:left` | 6 | rlr + kl | 0." not in page.split("The sweeps")[1]  # it borrows RLR's rate
    assert (tmp_path / "bench_longrun_position_left_T6.png").is_file()
    assert set(models) == {None}
    flow = long_run.run_suite(True, flow=True)  # the same suite on default-flow: every run gets the model
    assert set(models[-len(flow["runs"]):]) == {"default-flow"} and len(flow["runs"]) == len(result["runs"])
    page = "\n".join(long_run.flow_section({**flow, "budget": "quick", "seconds": 10}, tmp_path))
    assert "flow-matching default" in page and (tmp_path / "bench_flowrun_position_left_T6.png").is_file()


def test_long_run_summary_keeps_the_suite_order_whatever_order_files_merge_in():
    """Result files merge in file-name order; the page lists tasks by T then the suite's reward order, and each
    task's variants in ``VARIANTS`` order, so a new file does not reshuffle the tables."""
    def run(reward, T, variant):
        return {"reward": reward, "T": T, "variant": variant, "lr": 1e-3, "seed": 0, "points": [
            {"step": i, "samples": 8 * i, "train_cpu_seconds": 1.0 + i, "eval_reward": 0.1 * i,
             "heldout_reward": 0.1 * i, "diversity": 0.3} for i in range(4)]}

    runs = [run("size:0.4", 20, "ddpo"), run("brightness", 50, "rlr paper"), run("position:left", 20, "ddpo"),
            run("size:0.4", 20, "truncated_bp"), run("brightness", 20, "rlr"), run("position:left", 20, "rlr")]
    rows = [(x["reward"], x["T"], x["variant"]) for x in long_run.summarize({"runs": runs})]
    assert rows == [("position:left", 20, "rlr"), ("position:left", 20, "ddpo"), ("brightness", 20, "rlr"),
                    ("size:0.4", 20, "ddpo"), ("size:0.4", 20, "truncated_bp"), ("brightness", 50, "rlr paper")]


def test_share_of_peak_kept_counts_only_seeds_that_rose_above_one_evaluations_noise():
    """A seed whose set-B peak is a hair above the start (the DDPO size:0.4 T=50 seed that collapsed) would
    report "-50 times its peak gain": its share is left out and the page says how many seeds rose."""
    def run(seed, heldout, wobble=0.01):
        return {"reward": "size:0.4", "T": 50, "variant": "ddpo", "lr": 3e-3, "seed": seed, "points": [
            {"step": 25 * i, "samples": 200 * i, "train_cpu_seconds": 100.0 * i, "diversity": 0.3,
             "heldout_reward": h, "eval_reward": h + (wobble if i % 2 else -wobble)} for i, h in enumerate(heldout)]}

    rose, flat = run(0, [-0.09, -0.05, -0.03, -0.06]), run(1, [-0.09, -0.089, -0.15, -0.26])
    assert long_run.eval_noise([rose, flat], "size:0.4", 50) > 0.001  # flat's peak gain is within the noise
    row = long_run.summarize({"runs": [rose, flat]})[0]
    assert row["seeds_rose"] == 1 and row["share_kept_mean"] == pytest.approx(0.5)  # seed 0: 0.03 of 0.06
    assert long_run._share(row) == "0.50 (0.50), 1 of 2 seeds rose"
    row = long_run.summarize({"runs": [{**flat, "seed": 0}]})[0]  # the sweep's choice needs a seed-0 run
    assert long_run._share(row, "guard_share") == "no seed rose above noise"
