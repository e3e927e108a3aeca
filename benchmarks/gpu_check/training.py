"""`rlr-train` with its defaults (the embedded model) on the device and on the CPU from the same seed:
the LoRAs must agree and the device's reward curve must move as the CPU's does. Also the ComfyUI
Trainer node's training on the device.

The CPU reference runs in a subprocess started before the GPU checks (``start_reference``), so it
costs no device time:

    python -m benchmarks.gpu_check.training --out DIR [--steps 20] [--tiny] [--threads N]

Agreement: ``lora_rel_diff = |theta_dev - theta_cpu| / |theta_cpu - theta_0|`` (L2 over all LoRA
tensors: the disagreement relative to how far training moved the LoRA). Both runs draw their noise
from the same CPU generators; the device's kernels round differently (and TF32 is switched off for the
run, so the comparison is about the code, not the matmul precision), and 20 Adam steps amplify that.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from rlr_backend.safe_io import load_tensors, save_json, save_tensors
from rlr_backend.train import TrainConfig, Trainer

logger = logging.getLogger(__name__)

#: --tiny: the default recipe, smaller (2 updates of 4 images, 6 steps) so the CPU test runs in seconds
TINY_TRAIN = {"batch_size": 4, "images_per_prompt": 2, "num_inference_steps": 6, "eval_seeds": 1}
LORA_TOLERANCE = 0.05  # lora_rel_diff at most this
GAIN_TOLERANCE = 0.25  # |gain_dev - gain_cpu| at most this x |gain_cpu| (or GAIN_FLOOR)
GAIN_FLOOR = 0.005


def train_config(device: str, steps: int, out_dir: Path, tiny: bool, run_name: str) -> TrainConfig:
    return TrainConfig(steps=steps, eval_every=max(steps // 2, 1), ckpt_every=steps, device=device,
                       output_dir=out_dir, run_name=run_name, **(TINY_TRAIN if tiny else {}))


def train_default(device: str, steps: int, out_dir: Path, tiny: bool, run_name: str) -> dict:
    """Train the default recipe on ``device``; write the LoRA before and after (safetensors) and return
    the run's figures."""
    cfg = train_config(device, steps, out_dir, tiny, run_name)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        trainer = Trainer(cfg, progress=False)
        init = {n: p.detach().float().cpu().clone() for n, p in trainer.named_params}
        t0 = time.perf_counter()
        result = trainer.run()
        seconds = time.perf_counter() - t0
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    final = {n: p.detach().float().cpu() for n, p in trainer.named_params}
    lora = out_dir / f"{run_name}-lora.safetensors"
    save_tensors({**{f"init/{n}": t for n, t in init.items()}, **{f"final/{n}": t for n, t in final.items()}}, lora)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"device": str(trainer.device), "steps": result.steps_done, "seconds": seconds, "lora_file": str(lora),
            "eval_rewards": {str(k): v for k, v in sorted(result.eval_rewards.items())},
            "reward_curve": [r.get("reward_mean") for r in rows], "threads": torch.get_num_threads()}


def start_reference(out_dir: Path, steps: int, tiny: bool, threads: int) -> subprocess.Popen:
    """The CPU reference run in a subprocess (it writes ``out_dir/reference.json``)."""
    cmd = [sys.executable, "-m", "benchmarks.gpu_check.training", "--out", str(out_dir), "--steps", str(steps),
           "--threads", str(threads)] + (["--tiny"] if tiny else [])
    logger.info("CPU reference run started: %s", " ".join(cmd))
    with open(out_dir / "reference.log", "w") as log:  # the child keeps its own copy of the file
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2])


def wait_reference(proc: subprocess.Popen, out_dir: Path, timeout_s: float) -> dict:
    try:
        proc.wait(timeout=max(timeout_s, 1.0))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise TimeoutError(f"the CPU reference run did not finish within {timeout_s:.0f} s") from None
    path = out_dir / "reference.json"
    if proc.returncode != 0 or not path.is_file():
        tail = (out_dir / "reference.log").read_text()[-600:]
        raise RuntimeError(f"the CPU reference run failed (exit {proc.returncode}): {tail}")
    return json.loads(path.read_text())


def lora_rel_diff(run: dict, ref: dict) -> tuple[float, float]:
    """(|theta_run - theta_ref| / |theta_ref - theta_0|, |theta0_run - theta0_ref|) over all LoRA tensors."""
    a, _ = load_tensors(run["lora_file"])
    b, _ = load_tensors(ref["lora_file"])
    if a.keys() != b.keys():
        raise ValueError("the two runs' LoRAs have different tensors")
    final = [k for k in a if k.startswith("final/")]
    diff = math.sqrt(sum(float((a[k] - b[k]).pow(2).sum()) for k in final))
    moved = math.sqrt(sum(float((b[k] - b["init/" + k[6:]]).pow(2).sum()) for k in final))
    init = math.sqrt(sum(float((a[k] - b[k]).pow(2).sum()) for k in a if k.startswith("init/")))
    return diff / max(moved, 1e-12), init


def compare(run: dict, ref: dict, *, require_rise: bool, lora_tol: float = LORA_TOLERANCE) -> dict:
    """The record of the device run against the CPU reference."""
    rel, init = lora_rel_diff(run, ref)
    ev, er = run["eval_rewards"], ref["eval_rewards"]
    last = max(er, key=int)
    gain, gain_ref = ev[last] - ev["0"], er[last] - er["0"]
    curve = [abs(x - y) for x, y in zip(run["reward_curve"], ref["reward_curve"]) if x is not None and y is not None]
    rec = {"steps": run["steps"], "lora_rel_diff": rel, "lora_tolerance": lora_tol, "init_diff": init,
           "eval_rewards": ev, "eval_rewards_cpu": er, "gain": gain, "gain_cpu": gain_ref,
           "curve_max_abs_diff": max(curve, default=float("nan")), "seconds": run["seconds"],
           "seconds_cpu": ref["seconds"], "cpu_threads": ref["threads"], "device": run["device"]}
    rec["summary"] = (f"LoRA differs by {rel:.2%} of its change (tolerance {lora_tol:.0%}); eval reward "
                      f"{ev['0']:.4f} -> {ev[last]:.4f} ({gain:+.4f}) vs CPU {er['0']:.4f} -> {er[last]:.4f} "
                      f"({gain_ref:+.4f}); {run['seconds']:.0f} s vs {ref['seconds']:.0f} s on the CPU")
    problems = []
    if init > 0:
        problems.append(f"the runs started from different LoRAs ({init:.3g})")
    if not rel <= lora_tol:
        problems.append(f"the LoRAs differ by {rel:.2%} of their change (tolerance {lora_tol:.0%})")
    if not abs(gain - gain_ref) <= max(GAIN_TOLERANCE * abs(gain_ref), GAIN_FLOOR):
        problems.append(f"eval reward gain {gain:+.4f} vs {gain_ref:+.4f} on the CPU")
    if require_rise and not (gain > 0 and gain_ref > 0):
        problems.append(f"the eval reward did not rise (device {gain:+.4f}, CPU {gain_ref:+.4f})")
    return {**rec, "status": "fail" if problems else "pass", **({"reason": "; ".join(problems)} if problems else {})}


def comfy_nodes_run(out_dir: Path, tiny: bool) -> dict:
    """The ComfyUI pack's node chain (Load Model -> Reward -> Prompt Schedule -> Trainer) on the embedded
    default, executed as ComfyUI executes nodes (under ``torch.inference_mode``), with ComfyUI's host modules
    from tests/comfy_standin. Without a ``device`` input the trainer takes a CUDA GPU when there is one."""
    import importlib
    import os

    standin = Path(__file__).resolve().parents[2] / "tests" / "comfy_standin"
    if not standin.is_dir():
        raise FileNotFoundError(f"{standin} is missing: the ComfyUI stand-in ships with the repository's tests")
    os.environ["RLR_STANDIN_BASE"] = str(out_dir / "comfy")
    sys.path.insert(0, str(standin))
    try:
        nodes = importlib.import_module("comfy_nodes.nodes")
        with torch.inference_mode():
            model = nodes.LoadModel.execute(model="(embedded default)").args[0]
            reward = nodes.Reward.execute(reward="prompt_alignment", weight=1.0).args[0]
            prompts = nodes.PromptSchedule.execute(fine="a red circle on a blue background", coarse="", mid="",
                                                   coarse_end=0.3, mid_end=0.7, ho_start=0, ho_end=0).args[0]
            steps = 1 if tiny else 5
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            lora, curve, grid = nodes.Trainer.execute(
                rlr_model=model, reward=reward, prompts=prompts, steps=steps, lr=3e-3, lora_rank=4, seed=0,
                batch_size=4, images_per_prompt=2, num_inference_steps=6 if tiny else 20, guidance_scale=4.0,
                eta=1.0, preview_every=0, run_name="gpu_check").args
            seconds = time.perf_counter() - t0
    finally:
        sys.path.remove(str(standin))
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    ok = bool(lora) and lora.metadata.get("rlr_steps") == str(steps) and all(
        torch.isfinite(v.float()).all() for v in lora.values())
    where = f"CUDA peak {peak / 1e6:.0f} MB" if torch.cuda.is_available() else "on the CPU"
    rec = {"steps": steps, "seconds": seconds, "cuda_peak_bytes": peak, "lora_tensors": len(lora),
           "summary": f"{steps} update{'s' * (steps > 1)} in {seconds:.1f} s, {where}"}
    if not ok:
        return {**rec, "status": "fail", "reason": "the Trainer node's LoRA is empty, unfinished or not finite"}
    if torch.cuda.is_available() and peak == 0:
        return {**rec, "status": "fail", "reason": "the Trainer node did not use the GPU"}
    return {**rec, "status": "pass"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="the CPU reference run of benchmarks.gpu_check")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    save_json(train_default("cpu", args.steps, args.out, args.tiny, "default-cpu"), args.out / "reference.json")


if __name__ == "__main__":
    main()
