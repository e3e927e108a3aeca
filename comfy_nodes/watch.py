"""Watching a run from ComfyUI's side without changing it: previews of the model's current estimate at
model calls, and giving memory back to the OS afterwards. No ComfyUI imports (tested without it)."""

from __future__ import annotations

import ctypes
import gc
import sys
import threading
import time
from typing import Callable

import torch

from rlr_backend.train import TrainConfig


class WatchedDenoiser:
    """A denoiser that also shows what it is doing: every ``interval`` seconds (at least 20 decode times,
    so previews cost under ~5% of the run) the first image's predicted x_0 is decoded and handed to
    ``on_image`` (B=1, 3, H, W in [0, 1]). Deterministic: no random numbers are drawn."""

    def __init__(self, inner, model, alphas: dict[int, float], prediction_type: str,
                 on_image: Callable[[torch.Tensor], None], state: dict, interval: float = 2.0):
        self.inner, self.model, self.alphas, self.prediction_type = inner, model, alphas, prediction_type
        self.on_image, self.state, self.interval = on_image, state, interval

    def __call__(self, x: torch.Tensor, timestep: int, cond):
        out = self.inner(x, timestep, cond)
        now = time.monotonic()
        if now >= self.state.get("next", 0.0) and int(timestep) in self.alphas:
            from rlr_backend.sampling.ddim import predicted_x0_and_eps

            with torch.no_grad():
                x0, _ = predicted_x0_and_eps(out[:1].detach().float(), x[:1].detach().float(),
                                             self.alphas[int(timestep)], self.prediction_type)
                image = self.model.decode(x0.to(x.dtype)).float().clamp(0, 1)
            took = time.monotonic() - now
            self.state["next"] = time.monotonic() + max(self.interval, 20 * took)
            self.on_image(image)
        return out

    def __getattr__(self, name: str):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def watch_model_calls(model, config: TrainConfig, on_image: Callable[[torch.Tensor], None]) -> None:
    """Make ``model.denoiser`` (this loaded model only) return a ``WatchedDenoiser``."""
    schedule = model.schedule(config.num_inference_steps, config.eta)
    alphas = {int(t): float(a) for t, a in zip(schedule.timesteps, schedule.alpha_t)}
    inner, state = model.denoiser, {}

    def denoiser(guidance_scale: float):
        return WatchedDenoiser(inner(guidance_scale), model, alphas, schedule.prediction_type, on_image, state)

    model.denoiser = denoiser


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise: a finished
    run would leave the process hundreds of MB larger)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def warm_report_imports() -> threading.Thread:
    """Import matplotlib (the reward curve written when a run ends) in the background while the model
    loads, so a Cancel does not wait ~1-2 s for that import."""

    def work() -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401

    thread = threading.Thread(target=work, name="rlr-warm-imports", daemon=True)
    thread.start()
    return thread
