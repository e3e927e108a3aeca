"""Shared set-up for the benchmarks: a tiny latent-diffusion stack and measurement helpers."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from rlr_backend.estimators import ChainProblem
from rlr_backend.lora import add_lora
from rlr_backend.models.diffusers_unet import DiffusersUNetDenoiser, TextConditioning
from rlr_backend.models.tiny import build_tiny_unet
from rlr_backend.sampling import DDIMSchedule, PromptSchedule
from rlr_backend.train.memory import peak_allocated  # noqa: F401 (the benchmarks' measure of memory)


@dataclass
class TinyStack:
    unet: torch.nn.Module
    vae: torch.nn.Module
    problem: ChainProblem
    latent_shape: tuple[int, ...]


def tiny_stack(num_steps: int = 50, batch: int = 4, pixels: int = 32, guidance: float = 3.0, eta: float = 1.0,
               seed: int = 0, lora_targets=("to_q", "to_k", "to_v", "to_out.0")) -> TinyStack:
    """Random-init SD-shaped stack: UNet on (4, px/2, px/2) latents, a VAE decoder to px x px, CFG.

    Reward: brightness of the decoded image (differentiable, through the decoder).
    """
    from diffusers import AutoencoderKL, DDIMScheduler

    lat = pixels // 2
    unet = build_tiny_unet(sample_size=lat, channels=4, seed=seed)
    params = add_lora(unet, rank=4, target_modules=lora_targets)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
                        norm_num_groups=16, sample_size=pixels).requires_grad_(False)
    with torch.no_grad():  # non-zero LoRA B so every adapter tensor has a gradient (a trained adapter)
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(seed + 2))
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                          set_alpha_to_one=False, clip_sample=False)
    schedule = DDIMSchedule.from_diffusers(sched, num_steps, eta=eta)
    g = torch.Generator().manual_seed(seed + 3)
    cond = TextConditioning(torch.randn(1, 8, 32, generator=g).expand(batch, -1, -1), torch.zeros(batch, 8, 32))

    def reward(latents: torch.Tensor) -> torch.Tensor:
        img = (vae.decode(latents / 0.18215).sample + 1) / 2
        return img.flatten(1).mean(1)

    problem = ChainProblem(DiffusersUNetDenoiser(unet, guidance), schedule, PromptSchedule.constant(cond, num_steps),
                           reward, params)
    return TinyStack(unet, vae, problem, (batch, 4, lat, lat))


def weights_bytes(*modules: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in list(m.parameters()) + list(m.buffers()))


def live_bytes(fn: Callable[[], object], mark: str | None = None) -> tuple[float, float]:
    """(peak live CPU tensor bytes while ``fn`` runs, live bytes when the ``record_function(mark)`` first
    began; NaN without one), relative to the start, from the profiler's raw allocation and free events
    summed in time order. Unlike ``peak_allocated`` (allocations netted per op) a transient buffer inside
    an op counts, as it does in CUDA's ``max_memory_allocated``; and it skips the profiler's event-tree
    parsing, so a UNet update takes seconds instead of tens of seconds."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    mark_ns = min((e.start_ns() for e in events if mark is not None and e.name() == mark), default=None)
    allocs = sorted((e.start_ns(), e.nbytes()) for e in events
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    cur = peak = 0
    at_mark = float("nan")
    for t, n in allocs:
        if mark_ns is not None and t >= mark_ns and at_mark != at_mark:
            at_mark = cur
        cur += n
        peak = max(peak, cur)
    if mark_ns is not None and at_mark != at_mark:
        at_mark = cur
    return float(peak), float(at_mark)


def timed(fn: Callable[[], object], repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def machine() -> dict:
    """The machine and library versions a results file records (the commit: the repository's HEAD)."""
    import diffusers
    import peft
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "load_at_start": os.getloadavg()[0],
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "commit": commit}


def machine_line() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s), load average {load:.2f} at start")
