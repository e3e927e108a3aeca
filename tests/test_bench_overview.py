"""docs/benchmarks.md's "Which estimator wins where": the suites' names map to the right columns (the default
run's "rlr" is RLR with the step baseline, the long runs' "rlr" is RLR without it) and each gain is a share of
the task's best."""

import json

from benchmarks.report.overview import overview_section, tasks


def _default_run(path, rows):
    runs = [{"estimator": est, "seed": s, "before": 1.0, "after": 1.0 + gain} for est, gain in rows for s in (0, 1, 2)]
    path.write_text(json.dumps({"config": {"steps": 60}, "machine": "", "runs": runs}))


def _long_run(path, rows):
    runs = []
    for variant, lr, end in rows:
        for seed in (0, 1, 2):
            points = [{"step": 0, "samples": 0, "eval_reward": -0.2, "heldout_reward": -0.2, "diversity": 0.3,
                       "train_cpu_seconds": 0.0},
                      {"step": 300, "samples": 2400, "eval_reward": end, "heldout_reward": end, "diversity": 0.2,
                       "train_cpu_seconds": 100.0}]
            runs.append({"reward": "position:left", "T": 50, "variant": variant, "lr": lr, "seed": seed,
                         "points": points})
    path.write_text(json.dumps({"budget": "full", "seconds": 1.0, "command": "x", "settings": {}, "runs": runs}))


def test_columns_and_shares_of_the_best(tmp_path):
    _default_run(tmp_path / "default-run.json", [("rlr", 0.05), ("rlr lr 3e-3", 0.2), ("truncated_bp", 0.1),
                                                 ("rlr, no step baseline", 0.06), ("ddpo", -0.01)])
    _long_run(tmp_path / "longrun-full-a.json", [("rlr + step baseline", 1e-3, -0.02), ("rlr", 3e-3, -0.11),
                                                 ("truncated_bp", 3e-4, -0.029), ("rlr paper", 3e-4, -0.17)])
    found = dict(tasks(tmp_path))
    default = found["default run: alignment + brightness, 60 updates"]
    assert set(default) == {"RLR", "RLR, no step baseline", "truncated backprop", "DDPO"}  # "rlr lr 3e-3": out
    assert abs(default["RLR"]["gain"] - 0.05) < 1e-9 and abs(default["RLR, no step baseline"]["gain"] - 0.06) < 1e-9
    long = found["position:left, T=50, 300 updates"]
    assert abs(long["RLR"]["final"] + 0.02) < 1e-9 and abs(long["RLR, no step baseline"]["final"] + 0.11) < 1e-9
    assert abs(long["RLR as in the paper"]["final"] + 0.17) < 1e-9  # fo_steps=1: a column of its own
    lines = overview_section(tasks(tmp_path), tmp_path / "images")
    row = next(x for x in lines if x.startswith("| position:left, T=50"))
    assert "**-0.020 (100%)**" in row and "-0.029 (95%)" in row and "-0.110 (50%)" in row and "-0.170 (17%)" in row
    row = next(x for x in lines if x.startswith("| default run"))
    assert "**1.100 (100%)**" in row and "1.050 (50%)" in row and "0.990 (-10%)" in row
    assert (tmp_path / "images" / "bench_overview.png").stat().st_size > 1000


def test_efficiency_rows_map_rlr_sb_to_rlr_and_rlr_to_no_step_baseline(tmp_path):
    runs = []
    for est, end in (("rlr_sb", -1.09), ("rlr", -1.185), ("zo_sb", -1.12), ("code_compat", -1.0)):
        for seed in (0, 1, 2):
            runs.append({"reward": "jpeg_compressibility", "estimator": est, "lr": 3e-3, "seed": seed,
                         "wall_seconds": 1.0, "points": [{"samples": 0, "eval_reward": -1.2, "diversity": 0.3},
                                                         {"samples": 320, "eval_reward": end, "diversity": 0.3}]})
    (tmp_path / "efficiency-full.json").write_text(json.dumps(
        {"budget": "full", "settings": {"updates": 40, "lr_sweep": {}}, "runs": runs}))
    cells = dict(tasks(tmp_path))["JPEG compressibility (not differentiable), 40 updates"]
    assert set(cells) == {"RLR", "RLR, no step baseline", "REINFORCE + step baseline"}  # code_compat: out
    assert abs(cells["RLR"]["final"] + 1.09) < 1e-9 and abs(cells["RLR, no step baseline"]["final"] + 1.185) < 1e-9


def test_the_estimators_page_shows_the_same_generated_table(tmp_path):
    """``sync_block`` puts the generated table between a page's markers, leaves the rest alone, replaces it on the
    next render, and leaves a page without markers untouched."""
    from benchmarks.report.common import sync_block
    from benchmarks.report.overview import overview_table

    _long_run(tmp_path / "longrun-full-a.json", [("rlr + step baseline", 1e-3, -0.02), ("truncated_bp", 3e-4, -0.029)])
    page = tmp_path / "estimators.md"
    page.write_text("# Estimators\n\nbefore\n<!-- overview -->\n| stale |\n<!-- /overview -->\nafter\n")
    assert sync_block(page, "overview", overview_table(tasks(tmp_path)))
    text = page.read_text()
    assert "| stale |" not in text and text.startswith("# Estimators\n\nbefore\n<!-- overview -->\n| task | start |")
    assert "| position:left, T=50, 300 updates | -0.200 | **-0.020 (100%)** |" in text
    assert text.endswith("<!-- /overview -->\nafter\n")
    assert sync_block(page, "overview", ["| new |"]) and page.read_text().count("| new |") == 1
    plain = tmp_path / "plain.md"
    plain.write_text("no markers <!-- overview --> only one\n")
    assert not sync_block(plain, "overview", ["| x |"]) and plain.read_text() == "no markers <!-- overview --> only one\n"
