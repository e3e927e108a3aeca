"""The memory model's fitting and composition (benchmarks/memory_model/), on synthetic data and a tiny stack.

The real measurements (SD1.5 / SDXL on CPU) come from `python -m benchmarks.memory_model`; these tests
check that the fit recovers known coefficients, that the composition rules add up as stated, and that
the composed peak of a tiny stack's RLR update matches the measured one.
"""

import pytest
import torch

from benchmarks import memory_model as mm
from benchmarks.common import tiny_stack, weights_bytes

MB = 1e6


def test_fit_recovers_known_coefficients():
    true = mm.Fit(c=5 * MB, b=2 * MB, a=3000.0, q=0.25)
    pts = [(n, lat * lat, true(n, lat * lat)) for n in (1, 2, 4) for lat in (8, 16, 24, 32, 48)]
    f = mm.fit_bytes(pts)
    assert f.c == pytest.approx(true.c, rel=1e-6)
    assert f.b == pytest.approx(true.b, rel=1e-6)
    assert f.a == pytest.approx(true.a, rel=1e-6)
    assert f.q == pytest.approx(true.q, rel=1e-6)
    assert f.max_rel_error < 1e-9 and f.points == len(pts)
    assert f(2, 128 * 128) == pytest.approx(true(2, 128 * 128), rel=1e-6)  # extrapolates exactly


def test_fit_keeps_coefficients_non_negative_and_finds_a_linear_law():
    # a linear law with multiplicative noise: the unconstrained fit would give a small negative q
    noise = [1.01, 0.99, 1.02, 0.985, 1.0]
    pts = [(2, lat * lat, (1 * MB + 2 * 4000.0 * lat * lat) * e) for lat, e in zip((16, 24, 32, 48, 64), noise)]
    f = mm.fit_bytes(pts)
    assert min(f.c, f.b, f.a, f.q) >= 0
    assert f.quadratic_share(2, 128 * 128) < 0.05
    assert f.a == pytest.approx(4000.0, rel=0.05)
    assert f.max_rel_error < 0.03


def test_chain_peak_holds_earlier_segments():
    s = mm.SegmentMemory(peak=10.0, retained=8.0)
    r = mm.SegmentMemory(peak=30.0, retained=20.0)
    assert mm.chain_peak([s]) == 10.0
    assert mm.chain_peak([s, s, s]) == 8 + 8 + 10
    assert mm.chain_peak([s, s, r]) == 8 + 8 + 30
    assert mm.chain_peak([r, s]) == max(30, 20 + 10)
    assert mm.sequential(s, r) == mm.SegmentMemory(8 + 30, 28.0)
    # a checkpointed step keeps only its input until backward
    c = mm.checkpointed(s, input_bytes=1.0)
    assert mm.chain_peak([c] * 50 + [r]) == 50 * 1 + 30


def test_rlr_phases_grow_with_h_and_fo_steps_not_T():
    s = mm.SegmentMemory(peak=10.0, retained=8.0, nograd=2.0)
    d = mm.SegmentMemory(peak=5.0, retained=4.0, nograd=3.0)
    p = mm.rlr_phases(s, d, h=2, fo_steps=1)
    assert (p.sampling, p.first_order, p.half_order, p.zeroth_order) == (3.0, 8 + 5, 8 + 10, 10.0)
    assert p.peak() == (18.0, "half_order")
    assert mm.rlr_phases(s, d, h=4, fo_steps=1).half_order == 3 * 8 + 10
    assert mm.rlr_phases(s, d, h=2, fo_steps=4).first_order == max(3 * 8 + 10, 4 * 8 + 5)
    assert mm.full_bp_phases(s, d, T=50).first_order == 50 * 8 + 5
    assert mm.chain_store_bytes(50, 1, 64 * 64) == 4 * (101 * 4 * 4096 + 50)


def _synthetic_fits() -> mm.Fits:
    fits = mm.Fits()
    lin = mm.Fit(c=0.0, b=1 * MB, a=200_000.0, q=0.0)  # 0.8 GB per sample at 64x64 latents
    small = mm.Fit(c=0.0, b=0.0, a=20_000.0, q=0.0)
    for arch in mm.ARCHS:
        fits.table[("unet", arch, "plain", "peak")] = lin
        fits.table[("unet", arch, "plain", "retained")] = lin
        fits.table[("unet", arch, "plain", "nograd_peak")] = small
        fits.table[("unet", arch, "ckpt", "peak")] = small
        fits.table[("unet", arch, "ckpt", "retained")] = small
    for v in ("plain", "ckpt"):
        for q in ("peak", "retained", "nograd_peak"):
            fits.table[("vae", "sd-vae", v, q)] = lin if v == "plain" else small
    for q in ("peak", "retained", "nograd_peak"):
        fits.table[("reward", "clip-vit-l14", "plain", q)] = mm.Fit(c=0.0, b=200 * MB, a=0.0, q=0.0)
    return fits


COUNTS = {"vae": 84_000_000, "reward": 430_000_000, "unet_sd15": 860_000_000, "text_sd15": 123_000_000,
          "lora_sd15_r4": 800_000, "unet_sdxl": 2_570_000_000, "text_sdxl": 818_000_000, "lora_sdxl_r4": 5_800_000}


def test_predictions_respond_to_each_option():
    fits, s = _synthetic_fits(), mm.Scenario("sd15", 512, 1, eval_images=0)
    plain, ckpt, off, adam8, fp32_reward = (mm.predict(fits, s, o, COUNTS) for o in mm.OPTION_SETS)
    assert ckpt["bytes"] < plain["bytes"]
    assert ckpt["bytes"] - off["bytes"] == pytest.approx(2 * COUNTS["text_sd15"])
    assert off["bytes"] - adam8["bytes"] == pytest.approx(6 * COUNTS["lora_sd15_r4"])
    assert fp32_reward["bytes"] - off["bytes"] >= 2 * COUNTS["reward"]  # fp32 weights, plus its activations
    assert plain["persistent"]["unet weights"] == 2 * COUNTS["unet_sd15"]
    full = mm.predict(fits, s, mm.OPTION_SETS[0], COUNTS, "full_bp")
    assert full["bytes"] > plain["bytes"] + 40 * 2 * 0.8e9  # ~50 steps of activations
    bigger = mm.predict(fits, mm.Scenario("sd15", 512, 4, eval_images=0), mm.OPTION_SETS[0], COUNTS)
    assert bigger["activations"] == pytest.approx(4 * plain["activations"], rel=0.05)
    assert mm.with_margin(plain["bytes"]) > plain["bytes"]
    # the trainer's evaluation (8 images sampled and decoded together without grad) can bind; with
    # checkpointing its images are decoded one at a time, as DiffusersModel.decode does
    evaluated = mm.predict(fits, mm.Scenario("sd15", 512, 1, eval_images=8), mm.OPTION_SETS[0], COUNTS)
    assert evaluated["binding_phase"] == "evaluation" and evaluated["bytes"] > plain["bytes"]
    sliced = mm.predict(fits, mm.Scenario("sd15", 512, 1, eval_images=8), mm.OPTION_SETS[1], COUNTS)
    assert sliced["phases"]["evaluation"] < evaluated["phases"]["evaluation"] / 4


def test_lora_count_matches_add_lora():
    from rlr_backend.lora import add_lora
    from rlr_backend.models.tiny import build_tiny_unet

    unet = build_tiny_unet(sample_size=8, channels=4)
    expected = mm.lora_param_count(unet, rank=4)
    params = add_lora(unet, rank=4)
    assert expected == sum(p.numel() for p in params) > 0


def test_composed_peak_matches_a_measured_rlr_update():
    """The composition fed with a tiny stack's measured step and reward segments predicts the measured
    peak of a whole RLR update (FO window of 2 steps, h = 2) within 10%."""
    torch.manual_seed(0)
    stack = tiny_stack(num_steps=4, batch=2, pixels=16)
    r = mm.validate_problem(stack.problem, stack.latent_shape, weights_bytes(stack.unet, stack.vae), "rlr",
                            h=2, fo_steps=2)
    assert r["measured"] > r["weights"]
    assert abs(r["rel_error"]) < 0.10, r


def test_full_size_validation_corrects_resident_memory_from_its_largest_run():
    """benchmarks.memory_validation: the uncorrected prediction is libraries + the composition's tensor
    bytes; the corrected one scales the update's tensor bytes by the RSS growth of the largest run of the
    option (its error is then 0) and is checked on the smaller run."""
    from benchmarks import memory_validation as mv

    def point(comp, arch, lat, n, peak, retained, nograd):
        return {"component": comp, "arch": arch, "variant": "plain", "n": n, "lat": lat, "pixels": lat * lat,
                "peak": peak, "retained": retained, "nograd_peak": nograd}

    G = 1e9
    points = [point("unet", "sd15", 32, 4, 1.0 * G, 0.9 * G, 0.1 * G),
              point("vae", "sd-vae", 32, 2, 2.0 * G, 2.0 * G, 0.2 * G),
              point("unet", "sd15", 16, 4, 0.3 * G, 0.25 * G, 0.03 * G),
              point("vae", "sd-vae", 16, 2, 0.5 * G, 0.5 * G, 0.05 * G)]
    counts = {"unet_sd15": 1e9, "vae": 1e8, "text_sd15": 1e8, "lora_sd15_r4": 1e6, "reward": 4e8}
    persistent = 4.0 * (1e9 + 1e8 + 1e8) + 16.0 * 1e6  # fp32 weights, no reward model; LoRA + grad + Adam
    libs, extra = 0.3 * G, 0.1 * G
    act256 = 2.9 * G + 4.0 * (7 * 2 * 4 * 32 * 32 + 2 * 3)  # first-order: step retained + decode peak; the chain
    act128 = 0.75 * G + 4.0 * (7 * 2 * 4 * 16 * 16 + 2 * 3)
    built = libs + persistent + extra

    def run(growth):
        return {"rss_libraries": libs, "rss_built": built, "peak_update": built + growth, "peak_load": built,
                "update_seconds": 1.0}

    data = {"counts": counts, "points": points, "traced": {"no options, 128 px": {"tensor_peak": act128 / 1.02}},
            "runs": {"no options, 256 px": run(1.25 * act256), "no options, 128 px": run(1.5 * act128)}}
    rows = {r["case"]: r for r in mv.compare(data)}
    big, small = rows["no options, 256 px"], rows["no options, 128 px"]
    assert big["tensor_predicted"] == pytest.approx(act256) and small["tensor_predicted"] == pytest.approx(act128)
    assert big["predicted"] == pytest.approx(libs + persistent + act256)
    assert big["error"] == pytest.approx((libs + persistent + act256) / (built + 1.25 * act256) - 1)
    assert big["fitted_on"] and not small["fitted_on"]
    assert big["rss_growth_ratio"] == pytest.approx(1.25) and big["corrected_error"] == pytest.approx(0, abs=1e-12)
    assert small["corrected"] == pytest.approx(built + 1.25 * act128)
    assert small["corrected_error"] == pytest.approx((built + 1.25 * act128) / (built + 1.5 * act128) - 1)
    assert small["tensor_error"] == pytest.approx(0.02) and big["tensor_error"] is None
    text = "\n".join(mv.doc_section({**data, "date": "d", "machine": "m"}))
    assert "| no options, 128 px |" in text and "+2.0%" in text and "(sets the factor)" in text


def test_options_are_read_off_a_train_config():
    """The memory options are the trainer's own settings (TrainConfig), seen as bytes."""
    from rlr_backend.train.config import TrainConfig

    o = mm.Options.from_config(TrainConfig(precision="fp32", reward="brightness", gradient_checkpointing=True,
                                           optimizer="adam8bit"), "cpu")
    assert (o.checkpointing, o.offload_text, o.adam_8bit, o.weight_bytes, o.reward_model, o.reward_fp32, o.label) == \
        (True, True, True, 4.0, False, False, "cpu")  # offload_text_encoders is on by default
    o = mm.Options.from_config(TrainConfig(precision="bf16", reward="aesthetic=1,brightness=0.5"), reward_fp32=True)
    assert (o.checkpointing, o.adam_8bit, o.weight_bytes, o.reward_model, o.reward_fp32) == (False, False, 2.0, True, True)
    plain, ckpt, off, adam8, fp32_reward = mm.OPTION_SETS
    assert not plain.checkpointing and not plain.offload_text and plain.weight_bytes == 2.0 and plain.reward_model
    assert ckpt.checkpointing and off.offload_text and adam8.adam_8bit and fp32_reward.reward_fp32
