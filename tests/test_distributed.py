"""Data-parallel training: 2 CPU processes (gloo, `accelerate launch`) train the LoRA that 1 process trains
with the same total batch and seed; the pieces (noise shards, whole-batch baselines, the batch split check).

The figures of docs/training.md come from `python -m pytest -s tests/test_distributed.py`.
"""

import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlr_backend.cli import train_main
from rlr_backend.estimators import BaselineState, compute_advantages
from rlr_backend.estimators.problem import BatchShard, ChainProblem, batch_advantages
from rlr_backend.safe_io import load_tensors
from rlr_backend.sampling import DDIMSchedule, PromptSchedule, sample_chain
from rlr_backend.train import TrainConfig, Trainer
from rlr_backend.train.distributed import check_batch_split

REPO = Path(__file__).resolve().parents[1]
# the TINY settings of test_trainer.py with a batch of two prompt groups, one per process
TINY = dict(batch_size=4, images_per_prompt=2, fo_steps=1, num_inference_steps=4, eval_every=0, eval_seeds=1,
            ckpt_every=2, lr=1e-2, step_baseline=False)  # the step baseline: its own run (see SB_SHARE)
STEPS = 3
# 3 updates of lr 1e-2 move the LoRA by ~3e-2; a wrong split (noise, prompts or baselines not those of the
# 1-process batch) moves it differently by about that much. Float rounding differs (the UNet's kernels on a
# batch of 2 vs 4 differ by ~1e-6) and Adam enlarges it on elements whose gradient is near 0: ~1e-5 measured.
TOLERANCE = 1e-3
# RLR with the step baseline, 1 update: its gradient is ~10x smaller than without it (0.49 vs 5.0 in norm)
# while the 2-process rounding is the same (~3e-5 on that norm), and Adam's first step is lr * sign(grad):
# an element whose gradient is within rounding of 0 moves by +-lr either way (4 of 15360 measured, by 2e-2).
# So the gradient norms must agree (relative 5e-5 measured; 3e-4 allowed) and all but SB_SHARE of the elements
# as above.
SB_SHARE = 1e-3


def cli_args(config: dict, **extra) -> list[str]:
    merged = {**config, **extra}
    flags = [("--" if v else "--no-") + k.replace("_", "-") for k, v in merged.items() if isinstance(v, bool)]
    return [a for k, v in merged.items() if not isinstance(v, bool) for a in ("--" + k.replace("_", "-"), str(v))] + \
        flags + ["--quiet", "--threads", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"))  # no accelerate config file of the machine's user
    return env


def accelerate_launch(script_args: list[str], tmp_path: Path, processes: int = 2) -> subprocess.Popen:
    """Start `accelerate launch --multi_gpu --num_processes N SCRIPT_ARGS` (N CPU processes, gloo)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), *script_args]
    return subprocess.Popen(cmd, env=child_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait(proc: subprocess.Popen, timeout: float = 300) -> None:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its worker processes
        out, _ = proc.communicate()
        pytest.fail(f"accelerate launch did not finish in {timeout} s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]


def checkpoint_lora(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The fp32 LoRA of a checkpoint (lora.safetensors of the run is the fp16 export)."""
    return load_tensors(run_dir / "ckpt" / f"step-{step:06d}" / "lora.safetensors")[0]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def metric(run_dir: Path, name: str) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[name] for r in rows if r["step"] > 0]  # step 0: the first evaluation only


def test_two_processes_train_the_lora_of_one(tmp_path):
    """rlr (run 2 updates, then resume to 3) and ddpo (3 updates) with 2 processes, against 1 process."""
    two = tmp_path / "two"
    runs = [cli_args(dict(TINY, estimator="rlr"), steps=2, output_dir=two, run_name="rlr"),
            cli_args(dict(TINY, estimator="rlr"), steps=STEPS, output_dir=two, run_name="rlr") + ["--resume"],
            cli_args(dict(TINY, estimator="ddpo"), steps=STEPS, output_dir=two, run_name="ddpo"),
            cli_args(dict(TINY, estimator="rlr", step_baseline=True), steps=1, output_dir=two, run_name="rlr-sb")]
    t0 = time.perf_counter()
    launch = accelerate_launch([str(REPO / "tests" / "distributed_worker.py"), json.dumps(runs)], tmp_path)
    one_seconds = {}
    try:  # the 1-process references meanwhile, in this process (one thread; the machine may have 2 cores)
        for estimator in ("rlr", "ddpo"):
            t1 = time.perf_counter()
            Trainer(TrainConfig(steps=STEPS, estimator=estimator, output_dir=tmp_path / "one", run_name=estimator,
                                **TINY), progress=False).run()
            one_seconds[estimator] = time.perf_counter() - t1
        Trainer(TrainConfig(steps=1, estimator="rlr", output_dir=tmp_path / "one", run_name="rlr-sb",
                            **dict(TINY, step_baseline=True)), progress=False).run()
    finally:
        wait(launch)
    two_seconds = time.perf_counter() - t0

    print(f"\nwall time: 2 processes (3 runs, one launch, incl. start-up) {two_seconds:.1f} s; 1 process in pytest, "
          f"alongside: rlr {one_seconds['rlr']:.1f} s, ddpo {one_seconds['ddpo']:.1f} s")
    for estimator in ("rlr", "ddpo"):
        ref_dir, got_dir = tmp_path / "one" / estimator, two / estimator
        ref, got = checkpoint_lora(ref_dir, STEPS), checkpoint_lora(got_dir, STEPS)
        diff = max_difference(ref, got)
        moved = max(float(v.abs().max()) for k, v in ref.items() if "lora_B" in k)  # lora_B starts at 0
        print(f"{estimator}: 2 processes vs 1, max |LoRA difference| after {STEPS} updates = {diff:.2g} "
              f"(largest lora_B value {moved:.2g})")
        assert moved > 10 * TOLERANCE  # the runs trained: the tolerance is far below what they changed
        assert diff < TOLERANCE, estimator
        # the rewards of both shards were gathered: the logged batch rewards are the 1-process ones
        torch.testing.assert_close(metric(got_dir, "reward_mean"), metric(ref_dir, "reward_mean"), rtol=0, atol=1e-4)
        assert metric(got_dir, "step") == list(range(1, STEPS + 1))
        same = {**json.loads((ref_dir / "config.json").read_text()), "output_dir": str(two),
                "steps": 2 if estimator == "rlr" else STEPS}
        assert json.loads((got_dir / "config.json").read_text()) == same  # the CLI options are the reference's
        assert (got_dir / "lora.safetensors").is_file() and (got_dir / "grids" / f"step-{STEPS:06d}.png").is_file()
    ref_dir, got_dir = tmp_path / "one" / "rlr-sb", two / "rlr-sb"  # the step baseline, whole-batch statistics
    assert metric(got_dir, "step_baseline_rewards") == metric(ref_dir, "step_baseline_rewards") != [0.0]
    torch.testing.assert_close(metric(got_dir, "grad_norm"), metric(ref_dir, "grad_norm"), rtol=3e-4, atol=0)
    ref, got = checkpoint_lora(ref_dir, 1), checkpoint_lora(got_dir, 1)
    off = sum(int(((ref[k] - got[k]).abs() > TOLERANCE).sum()) for k in ref)
    total = sum(v.numel() for v in ref.values())
    print(f"rlr + step baseline: 2 processes vs 1 after 1 update, {off} of {total} LoRA elements differ by more "
          f"than {TOLERANCE:g}; gradient norm {metric(got_dir, 'grad_norm')[0]:.6g} vs {metric(ref_dir, 'grad_norm')[0]:.6g}")
    assert off <= SB_SHARE * total


def test_python_m_cli_is_rlr_train(monkeypatch, capsys):
    # the form `accelerate launch -m rlr_backend.cli` runs
    monkeypatch.setattr(sys, "argv", ["rlr_backend.cli", "--help"])
    monkeypatch.delitem(sys.modules, "rlr_backend.cli")  # run it afresh as __main__, as `python -m` does
    with pytest.raises(SystemExit) as stop:
        runpy.run_module("rlr_backend.cli", run_name="__main__")
    assert stop.value.code == 0 and "usage: rlr-train" in capsys.readouterr().out


def test_a_batch_that_cannot_be_split_fails_before_loading(monkeypatch, capsys, tmp_path):
    # one prompt group cannot be split over 2 processes; the check runs before the process group and the model
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    args = cli_args(dict(TINY, batch_size=2), steps=1, output_dir=tmp_path, run_name="r")
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "1 prompt groups cannot be split evenly over 2 processes" in err and "--batch-size 4" in err
    assert not (tmp_path / "r").exists()


def test_check_batch_split():
    assert check_batch_split(8, 2, 4) == 2
    assert check_batch_split(8, 4, 1) == 8
    with pytest.raises(ValueError, match="3 prompt groups cannot be split evenly over 2 processes"):
        check_batch_split(6, 2, 2)


class Scale(torch.nn.Module):
    def forward(self, x, t, cond):
        return 0.5 * x * (t + 1) / 1000 + cond


def test_noise_shards_are_rows_of_the_full_batch_draw():
    sched = DDIMSchedule.from_alphas_cumprod(torch.linspace(0.999, 0.01, 1000), 5, eta=1.0)
    prompts, x_T = PromptSchedule.constant(0.0, 5), torch.randn(6, 3)
    g_full = torch.Generator().manual_seed(3)
    full = sample_chain(Scale(), sched, prompts, x_T, generator=g_full)
    for start, rows in [(0, 2), (2, 2), (4, 2), (0, 6)]:
        g = torch.Generator().manual_seed(3)
        part = sample_chain(Scale(), sched, prompts, x_T[start:start + rows], generator=g, noise_shard=(start, 6))
        for a, b in zip(part.latents, full.latents):
            assert torch.equal(a, b[start:start + rows])
        assert torch.equal(g.get_state(), g_full.get_state())  # every shard leaves the generator where 1 process does
    with pytest.raises(ValueError, match="noise_shard"):
        sample_chain(Scale(), sched, prompts, x_T[:4], generator=torch.Generator(), noise_shard=(4, 6))


@pytest.mark.parametrize("kind", ["loo", "ema", "batch_norm", "per_prompt_norm"])
def test_shard_advantages_are_rows_of_the_whole_batch(kind):
    rewards = torch.tensor([0.1, 0.7, 0.3, 0.2, 0.9, 0.4])
    groups = torch.tensor([0, 0, 1, 1, 0, 0])  # prompt 0 in both shards
    want_state = BaselineState(ema_value=0.5)
    want = compute_advantages(rewards, kind, groups=groups, state=want_state)
    for start in (0, 2, 4):  # every process of 3 computes the same statistics
        rows = slice(start, start + 2)

        def gather(t, rows=rows):
            full = groups if t.dtype == torch.long else rewards
            assert torch.equal(t, full[rows])  # gather is handed this shard's values
            return full

        shard = BatchShard(start, 2, 6, gather, lambda t: t)
        problem = ChainProblem(Scale(), None, None, lambda x: x, [], groups=groups[rows], shard=shard)
        state = BaselineState(ema_value=0.5)
        adv, all_rewards = batch_advantages(problem, rewards[rows], kind, state=state)
        assert torch.equal(adv, want[rows]) and torch.equal(all_rewards, rewards)
        assert state.state_dict() == want_state.state_dict()
