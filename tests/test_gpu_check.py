"""The GPU acceptance check (benchmarks/gpu_check) on the CPU: the command end to end with tiny configs, and
its parts (budget and time guards, out-of-memory and skip handling, the predictions it compares against,
the comparison of two training runs, the pages it renders). The real figures need a CUDA GPU:
`python -m benchmarks.gpu_check` (docs/gpu_check.md)."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import memory_model as mm
from benchmarks.common import live_bytes
from benchmarks.gpu_check import report, runner, training, updates

ROOT = Path(__file__).resolve().parents[1]


def test_the_command_runs_the_tiny_checks_on_the_cpu(tmp_path):
    """Without a GPU the command says so in one line, runs the tiny checks and exits 0 (on a GPU machine the
    test asks for the CPU explicitly); every check it ran passed, and the figures are self-consistent."""
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--out-dir", str(tmp_path), "--models", "sd15",
           "--variants", "rlr-ckpt", "full", "--train-steps", "1", "--threads", "1"]
    if torch.cuda.is_available():
        cmd += ["--tiny", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    if not torch.cuda.is_available():
        assert sum("no CUDA device" in line for line in out.splitlines()) == 1
    data = json.loads((tmp_path / "gpu-check-tiny.json").read_text())
    assert data["tiny"] and data["device"] == "cpu" and data["environment"]["torch"] == torch.__version__
    checks = {c["name"]: c for c in data["checks"]}
    statuses = [(c["name"], c["status"], c.get("reason")) for c in checks.values()]
    assert data["counts"]["fail"] == 0 and data["counts"]["pass"] == 5, statuses
    ckpt = checks["SD1.5-family tiny config: rlr default (fo_steps=4) + checkpointing"]
    full = checks["SD1.5-family tiny config: full_bp"]
    for c in (ckpt, full):
        assert c["status"] == "pass" and c["reference"] == "composed" and c["predicted_bytes"] is None
        assert c["memory_ratio"] == pytest.approx(c["measured_bytes"] / c["composed_bytes"])
        assert abs(c["memory_ratio"] - 1) <= data["memory_tolerance"]
        assert c["time_ratio"] == pytest.approx(c["seconds"] / c["sample_seconds"]) and c["predicted_time_ratio"] > 1
    # full backprop holds all T steps, checkpointed RLR about one: the measurement sees it
    assert full["measured_bytes"] > 2 * ckpt["measured_bytes"]
    assert full["predicted_time_ratio"] == pytest.approx((6 + 2 * 6) / 6)
    train = checks["default recipe, 1 update: cpu vs CPU"]
    assert train["status"] == "pass" and train["init_diff"] == 0 and train["lora_rel_diff"] < 1e-3
    assert checks["ComfyUI Trainer node on cpu"]["status"] == "pass"
    page = (tmp_path / "gpu-check-tiny.md").read_text()
    assert "| SD1.5-family tiny config | 4 | full_bp | pass |" in page and "5 passed, 0 failed, 0 skipped" in page
    assert data["cuda"] == torch.cuda.is_available()


def test_tiny_sdxl_stack_samples_with_its_added_conditioning():
    stack = updates.build_arch_stack("sdxl", tiny=True, batch=2, num_steps=3, dtype=torch.float32)
    p = stack.problem
    assert stack.latent_shape == (2, 4, 8, 8) and p.prompts.cond_at(0).time_ids.shape == (2, 6)
    from rlr_backend.sampling import sample_chain

    with torch.no_grad():
        traj = sample_chain(p.model, p.schedule, p.prompts, torch.randn(stack.latent_shape),
                            generator=torch.Generator().manual_seed(0))
        r = p.reward(traj.final)
    assert r.shape == (2,) and torch.isfinite(r).all()
    with pytest.raises(ValueError, match="unknown architecture 'sd3'"):
        updates.build_arch_stack("sd3", tiny=True)


def test_the_checks_checkpointing_is_the_trainers_the_decoder_included():
    """The first GPU run checkpointed the UNet only, so its checkpointed decode + reward kept a whole image's
    decoder graph (SDXL at batch 1: 20.3 GB against the 1.9 GB the trainer's setting predicts)."""
    stack = updates.build_arch_stack("sd15", tiny=True, batch=2, num_steps=3, dtype=torch.float32)
    decoder, unet = stack.vae.decoder, stack.unet
    batches = []
    decode = stack.vae.decode
    stack.vae.decode = lambda z, *a, **k: (batches.append(z.shape[0]), decode(z, *a, **k))[1]
    with stack.gradient_checkpointing():
        assert decoder.gradient_checkpointing and unet.is_gradient_checkpointing
        assert "forward" in decoder.up_blocks[0].resnets[0].__dict__  # the trainer's sub-block checkpoints
        with torch.no_grad():  # the trainer decodes one image at a time without grad too (the second GPU
            stack.problem.reward(torch.randn(stack.latent_shape))  # lease measured a batched no-grad decode)
        assert batches == [1, 1]
    assert not decoder.gradient_checkpointing and not unet.is_gradient_checkpointing
    assert "forward" not in decoder.up_blocks[0].resnets[0].__dict__
    with torch.no_grad():
        stack.problem.reward(torch.randn(stack.latent_shape))
    assert batches == [1, 1, 2]


def test_budget_guards_and_failures_are_recorded_and_the_run_goes_on(tmp_path):
    checks = runner.Checks(runner.Budget(100.0), {"x": 1}, tmp_path / "r.json", tmp_path / "r.md", report.render,
                           guard_min_s=0.5, guard_factor=1.0)
    assert checks.run("too long", "update", lambda: pytest.fail("must not run"), estimate_s=1000)["status"] == "skipped"

    def boom():
        raise RuntimeError("kernel exploded")

    rec = checks.run("boom", "update", boom, estimate_s=1)
    assert rec["status"] == "fail" and rec["reason"] == "RuntimeError: kernel exploded"

    def slow():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 10:
            pass
        return {"status": "pass"}

    rec = checks.run("slow", "update", slow, estimate_s=0.1)
    assert rec["status"] == "skipped" and "time guard" in rec["reason"] and rec["check_seconds"] < 5
    ok = checks.run("ok", "training", lambda: {"status": "pass", "gap": float("nan")}, estimate_s=1)
    assert ok["status"] == "pass"
    data = json.loads((tmp_path / "r.json").read_text())  # strict JSON after every check: NaN became null
    assert [c["name"] for c in data["checks"]] == ["too long", "boom", "slow", "ok"]
    assert data["checks"][3]["gap"] is None
    assert data["counts"] == {"pass": 1, "fail": 1, "skipped": 2} and data["x"] == 1
    assert "1 passed, 1 failed, 2 skipped" in (tmp_path / "r.md").read_text()
    assert [c["name"] for c in checks.failed()] == ["boom"]
    with pytest.raises(ValueError, match="status must be one of"):
        checks.add({"name": "bad", "status": "ok"})


def test_fit_decision():
    gb = 1e9
    assert updates.fit_decision(10 * gb, 2 * gb, 24 * gb, 20 * gb) is None
    assert "does not fit the card's 24.0 GB" in updates.fit_decision(21 * gb, 2 * gb, 24 * gb, 20 * gb)  # margin
    assert "free" in updates.fit_decision(10 * gb, 2 * gb, 80 * gb, 8 * gb)  # fits the card, not what is free now


def fake_bench(run, persistent=1e9, composed=2e9, predicted=None):
    plan = updates.MODELS["sd15"]
    return SimpleNamespace(
        label="fake", plan=plan, T=6, dtype=torch.float32, sample_seconds=0.5, persistent=persistent,
        device=torch.device("cpu"), optimizer=torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))]),
        predictions=lambda v: {"composed_bytes": composed, "composed_phase": "first_order",
                               "predicted_bytes": predicted, "binding_phase": None},
        update=lambda v: run)


def test_an_out_of_memory_error_is_a_failed_prediction_with_its_figures():
    def run():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert updates.measure_update(run, torch.device("cpu"))["oom"].startswith("CUDA out of memory")
    rec = updates.check_variant(fake_bench(run, predicted=3e9), updates.VARIANTS[0], 0.1)
    assert rec["status"] == "fail" and rec["oom"] and rec["measured_bytes"] is None
    assert "out of memory although predicted to fit: predicted 3.00 GB (docs)" in rec["reason"]


def test_updates_predicted_not_to_fit_are_skipped_and_bad_figures_fail():
    never = fake_bench(lambda: pytest.fail("must not run"), composed=1e18)
    rec = updates.check_variant(never, updates.VARIANTS[0], 0.1)
    assert rec["status"] == "skipped" and rec["reason"].startswith("predicted not to fit")

    def metrics(**m):
        def run():
            torch.zeros(1000)
            return {"model_calls": 6.0, "model_calls_with_grad": 6.0, **m}
        return run

    ok = updates.check_variant(fake_bench(metrics(), persistent=1e6, composed=1e6), updates.VARIANTS[0], 0.1)
    assert ok["status"] == "pass" and ok["predicted_time_ratio"] == 3.0 and ok["measured_bytes"] >= 1e6
    off = updates.check_variant(fake_bench(metrics(), persistent=1e6, composed=0.5e6), updates.VARIANTS[0], 0.1)
    assert off["status"] == "fail" and "off the composed prediction" in off["reason"]
    nan = updates.check_variant(fake_bench(metrics(nonfinite_rewards=2.0), persistent=1e6, composed=1e6),
                                updates.VARIANTS[0], 0.1)
    assert nan["status"] == "fail" and "non-finite" in nan["reason"]


def test_a_recomputation_mismatch_fails_the_check_and_the_update_is_measured_without_the_check():
    from rlr_backend.estimators import RecomputationMismatch

    calls = []

    def update(v, check_recomputation=True):
        def run():
            calls.append(check_recomputation)
            if check_recomputation:
                raise RecomputationMismatch("recomputing the half-order sub-chain gave latents 0.01 away")
            return {"model_calls": 6.0}
        return run

    bench = fake_bench(None, persistent=1e6, composed=1e6)
    bench.update = update
    rec = updates.check_variant(bench, updates.VARIANTS[0], 0.1)
    assert calls[0] and not any(calls[1:]) and rec["status"] == "fail" and rec["measured_bytes"] >= 1e6
    assert rec["reason"].startswith("RecomputationMismatch: recomputing") and "rerun without the check" in rec["reason"]
    cfg = updates.VARIANTS[0].config().estimator_config()
    assert cfg.recompute_atol < 1  # the check is on unless the GPU check turns it off for the rerun


def test_variants_are_configured_as_rlr_train_configures_them():
    by = {v.key: v for v in updates.VARIANTS}
    assert [v.key for v in updates.VARIANTS][:updates.KEY_VARIANTS] == ["rlr", "rlr-ckpt"]
    default = by["rlr"].config().estimator_config()
    assert default.fo_steps == 4 and default.h == 2 and not default.use_checkpoint
    assert by["rlr-paper-ckpt"].config().estimator_config().fo_steps == 1
    assert by["rlr-ckpt"].config().estimator_config().use_checkpoint
    assert by["full-ckpt"].config().estimator_config().use_checkpoint and by["truncated"].window() == 2


def test_docs_predictions_cover_every_variant_and_truncated_backprop_is_a_first_order_window():
    docs = updates.docs_fits()
    assert docs is not None  # benchmarks/results/memory-model.json is in the repository
    preds = {v.key: updates.docs_prediction(docs, "sd15", 512, 4, 50, v)["bytes"] for v in updates.VARIANTS}
    assert preds["full"] > 300e9 > preds["rlr"] > preds["rlr-paper"] > preds["ddpo"] > preds["rlr-ckpt"]
    assert preds["rlr-ckpt"] == pytest.approx(preds["full-ckpt"], rel=0.01)
    s = mm.SegmentMemory(peak=10.0, retained=8.0, nograd=2.0)
    d = mm.SegmentMemory(peak=5.0, retained=4.0, nograd=3.0)
    assert mm.update_phases("truncated_bp", s, d, T=50, fo_steps=2).first_order == \
        mm.rlr_phases(s, d, h=2, fo_steps=2).first_order
    assert mm.update_phases("zo", s, d, T=50) == mm.ddpo_phases(s, d)  # one likelihood-ratio step at a time
    with pytest.raises(ValueError, match="unknown estimator 'code_compat'"):
        mm.update_phases("code_compat", s, d, T=50)


def test_live_bytes_counts_a_transient_and_the_bytes_at_a_mark():
    from torch.profiler import record_function

    def fn():
        a = torch.ones(1_000_000)  # 4 MB, kept
        b = torch.ones(2_000_000)  # 8 MB transient
        del b
        with record_function("mark"):
            pass
        return a

    peak, at_mark = live_bytes(fn, mark="mark")
    assert 12e6 <= peak < 12.5e6 and 4e6 <= at_mark < 4.5e6
    assert math.isnan(live_bytes(fn)[1])


def save_run(path, init, final, rewards, curve, seconds=1.0, device="cpu"):
    from rlr_backend.safe_io import save_tensors

    save_tensors({"init/a": init, "final/a": final}, path)
    return {"lora_file": str(path), "eval_rewards": rewards, "reward_curve": curve, "seconds": seconds, "steps": 2,
            "threads": 1, "device": device}


def test_two_training_runs_are_compared_by_their_loras_and_reward_gains(tmp_path):
    init, final = torch.zeros(10), torch.ones(10)
    ref = save_run(tmp_path / "ref.safetensors", init, final, {"0": 1.0, "2": 1.1}, [1.0, 1.05])
    same = save_run(tmp_path / "a.safetensors", init, final + 1e-4, {"0": 1.0, "2": 1.1}, [1.0, 1.05], device="cuda:0")
    rec = training.compare(same, ref, require_rise=True)
    assert rec["status"] == "pass" and rec["lora_rel_diff"] == pytest.approx(1e-4, rel=1e-3)
    drifted = save_run(tmp_path / "b.safetensors", init, final * 1.2, {"0": 1.0, "2": 1.1}, [1.0, 1.05])
    assert "LoRAs differ by 20.00%" in training.compare(drifted, ref, require_rise=True)["reason"]
    other_start = save_run(tmp_path / "c.safetensors", init + 1, final, {"0": 1.0, "2": 1.1}, [1.0, 1.05])
    assert "different LoRAs" in training.compare(other_start, ref, require_rise=True)["reason"]
    flat = save_run(tmp_path / "d.safetensors", init, final, {"0": 1.0, "2": 1.0}, [1.0, 1.0])
    flat_ref = save_run(tmp_path / "e.safetensors", init, final, {"0": 1.0, "2": 1.0}, [1.0, 1.0])
    assert training.compare(flat, flat_ref, require_rise=False)["status"] == "pass"
    assert "did not rise" in training.compare(flat, flat_ref, require_rise=True)["reason"]
    lower = save_run(tmp_path / "f.safetensors", init, final, {"0": 1.0, "2": 1.05}, [1.0, 1.05])
    assert "eval reward gain +0.0500 vs +0.1000" in training.compare(lower, ref, require_rise=True)["reason"]


def test_docs_sections_say_not_measured_yet_or_show_the_gpu_figures(tmp_path):
    assert "Not measured on a GPU yet" in "\n".join(report.memory_doc_section(tmp_path))
    assert "Not measured on a GPU yet" in "\n".join(report.benchmarks_doc_section(tmp_path))
    rows = [{"name": "SD1.5: rlr", "group": "update", "status": "pass", "model": "SD1.5 512 px fp16", "batch": 4,
             "variant": "rlr default (fo_steps=4)", "measured_bytes": 48e9, "predicted_bytes": 44.6e9,
             "composed_ratio": 1.01, "seconds": 12.0, "sample_seconds": 3.0, "time_ratio": 4.0,
             "predicted_time_ratio": 4.0},
            {"name": "default recipe", "group": "training", "status": "pass", "summary": "LoRA differs by 0.01%"}]
    data = {"started": "2026-12-03T10:00:00+00:00", "command": "python -m benchmarks.gpu_check", "checks": rows,
            "environment": {"gpu": "NVIDIA H200", "driver": "570.1", "torch_cuda": "12.8", "torch": "2.13.0"}}
    (tmp_path / "gpu-check.json").write_text(json.dumps(data))
    memory = "\n".join(report.memory_doc_section(tmp_path))
    assert "2026-12-03, NVIDIA H200 (driver 570.1" in memory and "| 48.00 | 44.60 | +7.6% | pass |" in memory
    assert "No gap over 10%." in memory
    rows[0]["measured_bytes"] = 52e9
    (tmp_path / "gpu-check.json").write_text(json.dumps(data))
    assert "rlr default (fo_steps=4): +16.6% (composed from this GPU's own parts: +1.0%)" in \
        "\n".join(report.memory_doc_section(tmp_path))
    bench = "\n".join(report.benchmarks_doc_section(tmp_path))
    assert "| 12.00 | 3.00 | 4.00x | 4.00x |" in bench and "default recipe: **pass**" in bench


def test_bad_options_exit_2_and_the_cpu_runs_the_tiny_checks():
    from benchmarks.gpu_check import cli

    for bad in (["--budget-s", "0"], ["--variants", "sgd"], ["--memory-tolerance", "2"], ["--models", "sd3"]):
        with pytest.raises(SystemExit) as e:
            cli.parse(bad)
        assert e.value.code == 2
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="this torch has no CUDA GPU"):
            cli.choose_device(cli.parse(["--device", "cuda"]))
    args = cli.parse(["--device", "cpu"])
    assert cli.choose_device(args).type == "cpu" and args.tiny
