"""docs/memory.md's renderer (benchmarks/memory_model/report.py, plots.py) on a small fixed input: measurements
drawn from known linear laws, so every figure on the page can be recomputed here from the model."""

import json

import pytest

from benchmarks import memory_model as mm

MB, G = 1e6, 1e9
#: family -> per-sample bytes at 64x64 latents of (peak, retained, no-grad peak), linear in n x pixels
LAWS = {("unet", "sd15", "plain"): (0.8, 0.7, 0.05), ("unet", "sd15", "ckpt"): (0.2, 0.1, 0.05),
        ("unet", "sdxl", "plain"): (1.6, 1.4, 0.1), ("unet", "sdxl", "ckpt"): (0.4, 0.2, 0.1),
        ("vae", "sd-vae", "plain"): (2.5, 2.0, 0.3), ("vae", "sd-vae", "ckpt"): (1.2, 0.5, 0.3)}
COUNTS = {"vae": 84_000_000, "reward": 430_000_000, "reward_vision_only": 305_000_000, "vae_decoder": 50_000_000,
          "unet_sd15": 860_000_000, "text_sd15": 123_000_000, "lora_sd15_r4": 800_000,
          "unet_sdxl": 2_570_000_000, "text_sdxl": 818_000_000, "lora_sdxl_r4": 5_800_000}


def _row(comp, arch, var, n, lat, peak, retained, nograd):
    return {"component": comp, "arch": arch, "variant": var, "n": n, "lat": lat, "pixels": lat * lat, "peak": peak,
            "retained": retained, "nograd_peak": nograd, "seconds": 3.0, "key": f"{comp}/{arch}/{var}/n{n}/lat{lat}"}


def _data() -> dict:
    rows = [_row("reward", "clip-vit-l14", "plain", n, 64, 0.2 * G * n + 50 * MB, 0.1 * G * n, 0.05 * G * n)
            for n in (1, 2)]
    for (comp, arch, var), (peak, kept, nograd) in LAWS.items():
        for n, lat in ((1, 16), (2, 16), (1, 24), (2, 32), (1, 48)):
            scale = n * lat * lat / (64 * 64)
            rows.append(_row(comp, arch, var, n, lat, 10 * MB + peak * G * scale, kept * G * scale, nograd * G * scale))
    vals = [{"model": "sd-small", "estimator": "rlr", "T": 6, "h": 2, "fo_steps": 1, "batch": 2, "pixels": 64,
             "measured": 100 * MB, "predicted": 103 * MB, "rel_error": 0.03, "binding_phase": "half_order"}]
    return {"budget": "full", "started": "2026-01-01T00:00:00+00:00", "command": "python -m benchmarks.memory_model",
            "commands": ["python -m benchmarks.memory_model", "python -m benchmarks.memory_model --budget-minutes 5"],
            "machine": {"cpu": "x86_64", "cores": 2, "torch": "t", "diffusers": "d", "transformers": "tr",
                        "peft": "p", "commit": "abc1234"},
            "points": rows, "validation": vals, "counts": COUNTS}


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("memory-page")
    data = _data()
    analysis = mm.analyse(data)
    text = mm.render(data, analysis, tmp / "docs" / "memory.md", [], results_dir=tmp / "results")
    return data, analysis, text, tmp


def test_page_has_its_sections_in_order_and_writes_what_it_returns(page):
    data, analysis, text, tmp = page
    assert (tmp / "docs" / "memory.md").read_text() == text
    heads = [line for line in text.splitlines() if line.startswith("#")]
    assert heads == ["# Memory model", "## Predictions", "## The model",
                     "## Measurements (bf16 on CPU) against the fit", "## Validation against whole updates",
                     "## Measured on a GPU", "## Caveats"]
    assert "(resumed: `python -m benchmarks.memory_model --budget-minutes 5`)" in text
    assert "commit abc1234" in text and "SD1.5 UNet 860 M parameters, SDXL UNet 2570 M" in text
    assert "Not measured on a GPU yet" in text  # no gpu-check result in results_dir
    assert "Checked at full size" not in text  # nor a full-size check
    assert "The code is `benchmarks/memory_model/`." in text


def test_prediction_rows_carry_the_model_figures(page):
    data, analysis, text, _ = page
    fits = mm.fit_components(data["points"])
    s = mm.Scenario("sd15", 512, 1, fo_steps=1)
    for opts in mm.OPTION_SETS:
        p = mm.predict(fits, s, opts, COUNTS, "rlr")
        row = next(line for line in text.splitlines() if line.startswith(f"| SD1.5 512 px | 1 | 1 | {opts.label} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[9] == f"{p['bytes'] / G:.2f}" and cells[10] == "-"  # no GPU check: no correction
        assert cells[11] == f"{mm.with_margin(p['bytes']) / G:.2f}"
        assert cells[12] == f"**{mm.smallest_card(p['bytes'])}**"
        assert cells[8].endswith(f"({p['binding_phase'].replace('_', '-')})")
    # one table row per prediction: rlr (2 archs x 2 batches x 2 FO windows x 5 option sets) and the other
    # estimators (FO 1 only, without 8-bit Adam or an fp32 reward: 3 option sets)
    rows = [line for line in text.splitlines() if line.startswith(("| SD1.5 ", "| SDXL "))]
    assert len(rows) == len(analysis["predictions"]) == 2 * 2 * 2 * 5 + 2 * 2 * 3 * 4


def test_verdicts_name_the_first_option_set_that_fits(page):
    _, analysis, text, _ = page
    line = next(line for line in text.splitlines() if line.startswith("- SD1.5 512x512 in 8 GB"))
    by = {p["options"]["label"]: p for p in analysis["predictions"] if p["estimator"] == "rlr"
          and p["scenario"]["arch"] == "sd15" and p["scenario"]["batch"] == 1 and p["scenario"]["fo_steps"] == 1}
    first = next(o.label for o in mm.OPTION_SETS if mm.with_margin(by[o.label]["bytes"]) <= 8 * G)
    assert "batch 1: **yes**" in line and first in line.split(";")[0]


def test_fit_measurement_and_validation_tables(page):
    data, analysis, text, _ = page
    lines = text.splitlines()
    for key, f in analysis["fits"].items():
        row = next(line for line in lines if line.startswith(f"| {key} |"))
        assert row.endswith(f"| {f['points']} | {f['max_rel_error']:.1%} |")
    assert sum(line.startswith(("| unet |", "| vae |", "| reward |")) for line in lines) == len(data["points"])
    # linear laws: the fits are exact, so every measured point's error is +0.0% and the P^2 share is 0
    row = next(line for line in lines if line.startswith("| unet | sd15 | plain | 2 | 32x32 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5] == f"{0.01 + 0.8 * 0.5:.2f}" and cells[7] == f"{0.7 * 0.5:.2f}"  # 2 x 32 x 32 = half of 64 x 64
    assert {cells[6], cells[8], cells[10]} <= {"+0.0%", "-0.0%"}
    assert "| unet/sd15/plain | 0.0% | 0.0% |" in text
    assert "| sd-small | rlr | 6 | 2 | 1 | 2 | 64 | 100.0 | 103.0 | +3.0% | half-order |" in text
    assert "Largest error: 3.0%." in text


def test_full_size_and_gpu_sections_come_from_results_dir(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    gpu = {"started": "2026-01-02T00:00:00", "environment": {"gpu": "Test GPU"}, "checks": [
        {"group": "update", "variant": "rlr fo=1", "model": "sd15", "batch": 1, "measured_bytes": 5 * G,
         "predicted_bytes": 4 * G, "status": "pass", "composed_ratio": 1.02}]}
    (results / "gpu-check.json").write_text(json.dumps(gpu))
    data = {**_data(), "validation": []}
    text = mm.render(data, mm.analyse(data), tmp_path / "memory.md", [], results_dir=results)
    assert "## Validation against whole updates" not in text  # no stack validation in the data
    assert "2026-01-02, Test GPU" in text and "Not measured on a GPU yet" not in text
    assert "| sd15 | 1 | rlr fo=1 | 5.00 | 4.00 | +25.0% | pass |" in text and "- sd15, rlr fo=1: +25.0%" in text


def test_gpu_correction_rescales_the_parts_the_gpu_measured_and_sets_the_verdicts(tmp_path):
    """A GPU check whose SD1.5 parts are the CPU fits x known factors: the model recovers the factors, recomputes
    every SD1.5 prediction with its parts scaled (not SDXL's: not measured) and the page's cards follow it."""
    from benchmarks.memory_model.model import decode_and_reward, unet_call

    data = {**_data(), "validation": []}
    fits = mm.fit_components(data["points"])
    px = 64 * 64
    parts = {}
    for var, ckpt, f_step, f_dec in (("plain", False, 1.5, 2.0), ("ckpt", True, 1.25, 3.0)):
        step, dec = unet_call(fits, "sd15", 8, px, ckpt), decode_and_reward(fits, 4, px, ckpt)
        plain_step, plain_dec = unet_call(fits, "sd15", 8, px, False), decode_and_reward(fits, 4, px, False)
        parts[var] = {"step_peak": f_step * step.peak, "step_retained": f_step * step.retained,
                      "step_nograd": 1.1 * plain_step.nograd, "reward_peak": f_dec * dec.peak,
                      "reward_retained": f_dec * dec.retained, "reward_nograd": 1.2 * plain_dec.nograd}
    build = {"group": "update", "name": "SD1.5 512 px fp16: build", "model": "SD1.5 512 px fp16", "batch": 4,
             "parts": parts}
    analysis = mm.analyse(data, {"checks": [build]})
    assert set(analysis["gpu_scales"]) == {"sd15/plain", "sd15/ckpt"}
    ck = analysis["gpu_scales"]["sd15/ckpt"]
    assert ck["step"] == pytest.approx([1.25, 1.25, 1.1]) and ck["decode"] == pytest.approx([3.0, 3.0, 1.2])
    scale = mm.PartScale(step=(1.25, 1.25, 1.1), decode=(3.0, 3.0, 1.2))
    for p in analysis["predictions"]:
        if p["scenario"]["arch"] == "sdxl":
            assert p["gpu_bytes"] is None
        elif p["options"]["checkpointing"]:
            want = mm.predict(fits, mm.Scenario(**p["scenario"]), mm.Options(**p["options"]), COUNTS, p["estimator"],
                              scale)["bytes"]
            assert p["gpu_bytes"] == pytest.approx(want) and p["gpu_bytes"] > p["bytes"]
    text = mm.render(data, analysis, tmp_path / "memory.md", [], results_dir=tmp_path)
    assert "SD1.5 checkpointed: denoiser call x1.25 (peak) / x1.25 (kept), decode + reward x3.00 / x3.00" in text
    p = next(p for p in analysis["predictions"] if p["estimator"] == "rlr" and p["scenario"]["arch"] == "sd15"
             and p["scenario"]["batch"] == 1 and p["scenario"]["fo_steps"] == 1
             and p["options"]["label"] == mm.OPTION_SETS[1].label)
    head = f"| SD1.5 512 px | 1 | 1 | {p['options']['label']} |"
    cells = [c.strip() for c in next(x for x in text.splitlines() if x.startswith(head)).strip("|").split("|")]
    assert cells[10] == f"{p['gpu_bytes'] / G:.2f}" and cells[12] == f"**{mm.smallest_card(p['gpu_bytes'])}**"
    assert next(line for line in text.splitlines() if line.startswith("- SD1.5 512x512 in 8 GB")).startswith(
        "- SD1.5 512x512 in 8 GB (RLR, FO 1 step, GPU-corrected)")
    assert next(line for line in text.splitlines() if line.startswith("- SDXL 1024x1024 in 16 GB")).startswith(
        "- SDXL 1024x1024 in 16 GB (RLR, FO 1 step, CPU fits)")


def test_missing_fits_say_so_instead_of_predicting(tmp_path):
    data = {**_data(), "validation": []}
    data["points"] = [r for r in data["points"] if r["component"] != "vae"]
    analysis = mm.analyse(data)
    assert analysis["predictions"] == []
    text = mm.render(data, analysis, tmp_path / "memory.md", [], results_dir=tmp_path)
    assert "**Predictions**: not available (missing fits: vae/sd-vae/plain/peak" in text
    assert "## Predictions" not in text


def test_plots_are_written(page, tmp_path):
    data, analysis, _, _ = page
    paths = mm.plot(data, analysis, tmp_path)
    assert [p.name for p in paths] == ["memory_fit.png", "memory_predictions.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
