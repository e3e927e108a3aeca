"""The benchmark pipeline on a tiny budget: each suite's measuring code runs and the page renders.

Real numbers come from `python -m benchmarks.run`; this only checks that the pipeline works and
that its figures are consistent (ratios are ratios, fits reproduce their points, summaries agree).
"""

import contextlib
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
                                 num_steps=4, out=tmp_path, heldout_seed=7, check=(11, 3))
    assert all(math.isfinite(p["check_reward"]) for p in run["points"])  # a third, larger seed set
    assert run["guard_step"] in {p["step"] for p in run["points"]}  # lora_best's update after the final check
    other_rate = efficiency.train_curve("rlr", "brightness", 0, steps=1, eval_every=1, batch=2, per_prompt=2,
                                        num_steps=4, out=tmp_path, lr=1e-4)  # a sweep: same folder, new run
    assert other_rate["lr"] == 1e-4 and run["lr"] == efficiency.DEFAULT_LR
    assert [p["samples"] for p in run["points"]] == [0, 2, 4]
    assert all(math.isfinite(p["eval_reward"]) for p in run["points"])
    # killed after update 1 (a run of 1 update stands in), then called again: resumes, the same curve
    efficiency.train_curve("rlr", "brightness", 0, steps=1, eval_every=1, batch=2, per_prompt=2, num_steps=4,
                           out=tmp_path / "killed", heldout_seed=7)
    resumed = efficiency.train_curve("rlr", "brightness", 0, steps=2, eval_every=1, batch=2, per_prompt=2,
                                     num_steps=4, out=tmp_path / "killed", heldout_seed=7)
    whole = run  # the same options, uninterrupted (its extra set-C evaluations leave training as it is)
    same = ("step", "samples", "eval_reward", "heldout_reward", "diversity")
    assert [{k: p[k] for k in same} for p in resumed["points"]] == [{k: p[k] for k in same} for p in whole["points"]]
    cpu = [p["train_cpu_seconds"] for p in resumed["points"]]
    assert cpu[0] == 0.0 < cpu[1] < cpu[2]  # update 1's time counted before the resume
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


def test_checkpointed_cost_case_saves_memory_and_keeps_the_gradient():
    names = ["rlr latent_lr h=2", "rlr latent_lr h=2 + checkpointing"]
    plain, ckpt = cost.measure_costs("default", 4, 2, names, timing=False)
    assert ckpt["bytes"] < 0.8 * plain["bytes"]
    stack = cost.build_stack("default", num_steps=4, batch=2)
    fn, kw = cost.estimator_cases()["rlr latent_lr h=2"]
    x_T = torch.randn(stack.latent_shape, generator=torch.Generator().manual_seed(0))
    grads = []
    for on in (False, True):
        for q in stack.problem.params:
            q.grad = None
        with stack.gradient_checkpointing() if on else contextlib.nullcontext():
            fn(stack.problem, x_T, generator=torch.Generator().manual_seed(1),
               baseline_state=cost.BaselineState(), **kw)
        grads.append(torch.cat([q.grad.flatten() for q in stack.problem.params]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    assert not stack.unet.is_gradient_checkpointing and not stack.decode["one_at_a_time"]


def _fake_curve(finals: dict):
    """A train_curve stand-in: a straight line to ``finals[(estimator, lr)]`` from 0.5, in 4 evaluations."""
    calls = []

    def curve(est, reward, seed, steps, every, batch, per_prompt, T, out, lr=efficiency.DEFAULT_LR, overrides=None,
              tag=""):
        est = tag[1:] or est  # a variant row (``efficiency.VARIANTS``) trains its estimator under its own name
        calls.append((est, lr, seed))
        end = finals[(est, lr)] + 0.001 * seed
        return {"estimator": est, "reward": reward, "seed": seed, "lr": lr, "wall_seconds": 1.0, "run_name": "r",
                "points": [{"step": i, "samples": i * batch, "eval_reward": 0.5 + (end - 0.5) * i / 3,
                            "diversity": 0.3} for i in range(4)]}
    return curve, calls


def test_swept_estimators_train_their_other_seeds_at_the_best_rate(monkeypatch, tmp_path):
    monkeypatch.setenv("RLR_BENCH_WORK", str(tmp_path))
    lr0 = efficiency.DEFAULT_LR
    finals = {("rlr", lr0): 0.9, ("ddpo", 3e-4): 0.6, ("ddpo", 1e-3): 0.7, ("ddpo", lr0): 0.4,
              ("zo", 3e-4): 0.55, ("zo", 1e-3): 0.52, ("zo", lr0): 0.3}
    curve, calls = _fake_curve(finals)
    monkeypatch.setattr(efficiency, "train_curve", curve)
    finals.update({("rlr_sb", 3e-4): 0.5, ("rlr_sb", 1e-3): 0.97, ("rlr_sb", lr0): 0.95})
    monkeypatch.setattr(efficiency, "ESTIMATORS", ("rlr", "ddpo", "zo", "rlr_sb"))
    result = efficiency.run_suite(False, done=[], rewards=("jpeg_compressibility",))
    assert ("ddpo", 1e-3, 1) in calls and ("ddpo", 1e-3, 2) in calls and ("zo", 3e-4, 2) in calls
    assert not any(est == "ddpo" and lr != 1e-3 and seed > 0 for est, lr, seed in calls)
    assert len(calls) == 3 + (3 + 2) * 3  # rlr: 3 seeds; ddpo, zo, rlr_sb: 3 rates on seed 0 + 2 more seeds
    assert {r["estimator"] for r in result["runs"]} == {"rlr", "ddpo", "zo", "rlr_sb"}  # the variant keeps its name
    summary = {s["estimator"]: s for s in efficiency.summarize(result)}
    assert summary["ddpo"]["lr"] == 1e-3 and summary["zo"]["lr"] == 3e-4 and summary["rlr_sb"]["lr"] == 1e-3
    assert summary["ddpo"]["final_mean"] == pytest.approx(0.701)
    # rlr's straight line from 0.5 to 0.901 crosses ddpo's 0.701 at the third of four evaluations
    assert summary["rlr"]["samples_to_ddpo_final"] == 2 * 8
    # resuming runs nothing again
    calls.clear()
    efficiency.run_suite(False, done=result["runs"], rewards=("jpeg_compressibility",))
    assert calls == []


def test_no_samples_to_ddpo_final_when_ddpo_ended_below_its_start(monkeypatch):
    curve, _ = _fake_curve({("rlr", efficiency.DEFAULT_LR): 0.9, ("ddpo", efficiency.DEFAULT_LR): 0.4})
    runs = [curve(est, "r", 0, 3, 1, 8, 4, 4, None) for est in ("rlr", "ddpo")]
    summary = efficiency.summarize({"settings": {"lr_sweep": {}}, "runs": runs})
    assert all(s["samples_to_ddpo_final"] is None and not s["ddpo_improved"] for s in summary)


def test_out_of_memory_table_from_the_memory_model(tmp_path):
    from benchmarks.memory_model import with_margin

    def pred(est, label, gb):
        return {"scenario": {"arch": "sd15", "resolution": 512, "batch": 1, "fo_steps": 1}, "estimator": est,
                "options": {"label": label}, "bytes": gb * 1e9}
    preds = [pred("rlr", "no options", 8.0), pred("rlr", "gradient checkpointing", 4.6),
             pred("full_bp", "no options", 98.0), pred("full_bp", "gradient checkpointing", 4.6)]
    mem = {"budget": "full", "started": "now", "command": "test", "analysis": {"predictions": preds},
           "machine": {"cpu": "x", "cores": 2, "torch": torch.__version__, "commit": "-"}}
    results = tmp_path / "results"
    results.mkdir()
    (results / "memory-model.json").write_text(json.dumps(mem))
    page = tmp_path / "benchmarks.md"
    report.render(results, page)
    rows = {line.split(" | ")[2]: line for line in page.read_text().splitlines() if line.startswith("| SD1.5")}
    assert f"**{with_margin(8e9) / 1e9:.1f}**" in rows["rlr h=2"]
    assert f"| {with_margin(98e9) / 1e9:.1f} |" in rows["full_bp (T=50 steps)"]  # over 24 GB: not bold
    assert "ddpo" not in rows  # no prediction, no row


def test_headline_reads_the_targets_off_the_results(tmp_path):
    meta = {"budget": "quick", "started": "now", "seconds": 1.0, "command": "test", "load_at_end": 0.0,
            "machine": {"cpu": "x", "cores": 2, "threads": 1, "load_at_start": 0.0, "torch": "-", "diffusers": "-",
                        "commit": "-"}}

    def cost_row(name, t, m):
        return {"model": "sd-small", "pixels": 64, "T": 50, "batch": 2, "estimator": name, "time_ratio": t,
                "memory_ratio": m, "predicted_time_ratio": 1.0, "bytes": 1e6, "sample_bytes": 1e6,
                "sample_seconds": 1.0, "seconds": t, "steps_in_memory": 1}
    results = tmp_path / "results"
    results.mkdir()
    (results / "cost-full.json").write_text(json.dumps({**meta, "rows": [
        cost_row("rlr latent_lr h=2", 3.5, 2.1), cost_row("rlr param_1pt h=2 + checkpointing", 1.25, 1.2),
        cost_row("rlr param_1pt h=2", 1.2, 2.0),
        cost_row("full_bp", 2.0, 9.0)]}))
    curve, _ = _fake_curve({("rlr", efficiency.DEFAULT_LR): 0.9, ("ddpo", efficiency.DEFAULT_LR): 0.7})
    runs = [curve(est, "prompt_alignment", 0, 3, 1, 8, 4, 4, None) for est in ("rlr", "ddpo")]
    (results / "efficiency-full.json").write_text(json.dumps({**meta, "settings": {"lr_sweep": {}}, "runs": runs}))
    text = "\n".join(report.headline_section(results))
    assert "time 3.50x, memory 2.10x (full backprop: memory 9.0x) | no |" in text
    assert "rlr param_1pt h=2 + checkpointing) | time 1.25x, memory 1.20x (full backprop: memory 9.0x) | yes |" in text
    assert "rlr param_1pt h=2) | time 1.20x, memory 2.00x (full backprop: memory 9.0x) | time only |" in text
    # rlr crosses ddpo's 0.7 at the third of four evaluations: 16 of 24 samples, more than 1/5
    assert "after 16 of 24 samples (0.67) | no |" in text


def test_run_py_hands_the_memory_suite_to_the_memory_model(monkeypatch, tmp_path):
    from benchmarks import memory_model, run

    seen = []
    monkeypatch.setattr(memory_model, "main", lambda argv: seen.append(argv))
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    run.main(["--suite", "quick", "--only", "memory", "--out", str(tmp_path / "page.md")])
    assert seen == [["--quick", "--threads", "1"]]
    assert "## memory" in (tmp_path / "page.md").read_text()  # no results in tmp_path yet


def test_collapse_suite_resumes_and_renders_every_seed(monkeypatch, tmp_path):
    curve, calls = _fake_curve({("rlr", efficiency.DEFAULT_LR): 0.9, ("truncated_bp", efficiency.DEFAULT_LR): 0.95})
    monkeypatch.setattr(efficiency, "train_curve", curve)
    seed0 = [curve(est, "prompt_alignment", 0, 3, 1, 8, 4, 4, None) for est in ("truncated_bp", "rlr")]
    calls.clear()
    result = efficiency.run_collapse(False, done=seed0)
    assert sorted(calls) == [(est, efficiency.DEFAULT_LR, seed) for est in ("rlr", "truncated_bp") for seed in (1, 2)]
    meta = {"budget": "full", "started": "now", "seconds": 1.0, "command": "test", "load_at_end": 0.0,
            "machine": {"cpu": "x", "cores": 2, "threads": 1, "load_at_start": 0.0, "torch": "-", "diffusers": "-",
                        "commit": "-"}}
    lines = report.collapse_section({**meta, **result}, tmp_path)
    assert sum(line.startswith("| rlr |") for line in lines) == 3
    assert sum(line.startswith("- truncated_bp, seed") for line in lines) == 3


def test_readme_timings_measure_a_command_and_render(tmp_path):
    """The README-timings wrapper reports a child's CPU seconds and peak memory (not this process's)."""
    from benchmarks import readme_timings as rt

    burn = ["python3", "-c", "import time; b = bytearray(200 * 2**20); t = time.process_time()\n"
                             "while time.process_time() - t < 0.5: pass"]
    out = rt.time_command(burn, tmp_path)
    assert out["code"] == 0 and out["cpu_s"] >= 0.45 and out["wall_s"] >= out["cpu_s"] * 0.5
    assert 200 <= out["peak_rss_mb"] < 400
    row = {"command": "x", "name": "x", **out, "reference_s": 0.5, "wall_in_references": out["wall_s"] / 0.5,
           "cpu_in_references": 1.0, "load_before": 1.0, "load_after": 1.0}
    page = rt.render({"date": "d", "cores": 2, "torch_threads": 1, "python": "3", "torch": "t", "reference": "r",
                      "reference_s_all": [0.5], "rows": [row]})
    assert f"| `x` | {out['wall_s']:.0f} s |" in page


def test_default_run_keeps_saved_runs_when_only_new_options_appeared():
    import json

    from benchmarks.default_run import RESULTS, shared_settings
    from rlr_backend.train import TrainConfig

    now = TrainConfig(steps=60).to_json()
    saved = json.loads(RESULTS.read_text())["config"]
    assert shared_settings(saved) == shared_settings(now)  # the committed results resume
    older = {k: v for k, v in now.items() if k not in ("flow_eta", "text_encoders")}  # saved before those existed
    assert shared_settings(older) == shared_settings(now)
    assert shared_settings({**now, "lr": 1e-4}) != shared_settings(now)  # another setting: start over


def test_default_run_background_colour_and_page():
    """The background measure reads a shape's surroundings, not the shape, and the page reports the drift."""
    from benchmarks.default_run import border_colour, render
    from rlr_backend.train import TrainConfig

    img = torch.zeros(1, 3, 32, 32)
    img[:, 1] = 0.2  # a dark green background ...
    img[:, :, 0:12, 0:20] = 1.0  # ... and a white shape touching the top-left border
    assert torch.allclose(border_colour(img), torch.tensor([[0.0, 0.2, 0.0]]))
    parts = lambda g: {"alignment": 0.9, "brightness": 0.5, "background": {"black": [0.05, g, 0.05]}}  # noqa: E731
    run = {"estimator": "rlr", "seed": 0, "before": 1.0, "after": 1.1, "eval_images": 8, "parts_before": parts(0.06),
           "parts_after": parts(0.16), "wall_s": 10.0, "cpu_s": 9.0, "load": 1.0}
    page = render({"config": TrainConfig().to_json(), "machine": "m", "runs": [run]})
    assert "(0.05, 0.06, 0.05) -> (0.05, 0.16, 0.05)" in page and "the 8 fixed-seed images" in page


def test_quality_page_names_its_bias_statistic(tmp_path):
    """New results show Hotelling's p-value; results measured before it keep mean z^2, marked as the old statistic."""
    row = {"estimator": "rlr", "trace_var": 1.0, "seconds": 1.0, "var_x_seconds": 1.0, "cos_to_truth": 0.5}
    chain = {"calls": 1, "batch": 1, "exact_gradient_norm": 1.0, "rows": []}
    meta = {"budget": "quick", "started": "now", "seconds": 1.0, "command": "test", "load_at_end": 0.0,
            "machine": {"cpu": "x", "cores": 2, "threads": 1, "load_at_start": 0.0, "torch": "-", "diffusers": "-",
                        "commit": "-"}}

    def page(extra):
        unet = {"T": 2, "batch": 2, "seeds": 2, "truth": "t", "rows": [{**row, **extra}]}
        return "\n".join(report.quality_section({**meta, "analytic_chain": chain, "unet": unet}, tmp_path))

    new = page({"t2": 3.0, "t2_dims": 12, "t2_p_value": 0.25})
    assert "Hotelling's two-sample T^2" in new and "| 0.25 |" in new and "12-dimensional" in new
    old = page({"mean_sq_z": 1.25})
    assert "predate the switch to Hotelling's T^2" in old and "| 1.25 |" in old


def test_guard_cost_measures_every_case(tmp_path):
    from benchmarks import guard_cost

    result = guard_cost.measure(1, batch_size=2, images_per_prompt=2, num_inference_steps=4, fo_steps=1,
                                prompts=guard_cost.TrainConfig().prompts[:1])
    rows = {r["case"]: r for r in result["rows"]}
    assert set(rows) == set(guard_cost.CASES) and len(rows) == 8
    assert rows["rlr: brightness (reference)"]["ratio"] == rows["truncated_bp: brightness (reference)"]["ratio"] == 1.0
    assert all(r["median_cpu_s"] > 0 for r in rows.values())
    assert "| truncated_bp: position:left |" in "\n".join(guard_cost.render(result))
    (tmp_path / "results").mkdir()  # the benchmarks page shows the saved table
    (tmp_path / "results" / "guard-cost.json").write_text(json.dumps(result))
    report.render(tmp_path / "results", tmp_path / "docs" / "benchmarks.md")
    page = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "## What the structure rewards and the KL guard cost" in page and "| rlr: size:0.4 |" in page

