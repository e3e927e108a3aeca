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

    def __init__(self, inner, model, x0_of: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor | None],
                 on_image: Callable[[torch.Tensor], None], state: dict, interval: float = 2.0):
        self.inner, self.model, self.x0_of = inner, model, x0_of
        self.on_image, self.state, self.interval = on_image, state, interval

    def __call__(self, x: torch.Tensor, timestep, cond):
        out = self.inner(x, timestep, cond)
        now = time.monotonic()
        if now >= self.state.get("next", 0.0):
            with torch.no_grad():
                x0 = self.x0_of(out[:1].detach().float(), x[:1].detach().float(), timestep)
                if x0 is None:  # a time the chain does not have
                    return out
                image = self.model.decode(x0.to(x.dtype)).float().clamp(0, 1)
            took = time.monotonic() - now
            self.state["next"] = time.monotonic() + max(self.interval, 20 * took)
            self.on_image(image)
        return out

    def __getattr__(self, name: str):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def predicted_x0(model, config: TrainConfig) -> Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor | None]:
    """(model output, x, time input) -> the model's x_0 estimate on this run's chain (None at other times):
    DDIM's from eps / v and abar, or a flow chain's x - sigma v (sigma = time / FLOW_TIME_SCALE)."""
    flow = bool(getattr(model, "flow", False))
    schedule = model.schedule(config.num_inference_steps, **config.schedule_options(flow))
    if flow:
        from rlr_backend.sampling import FLOW_TIME_SCALE

        times = set(schedule.timesteps)
        return lambda out, x, t: x - (float(t) / FLOW_TIME_SCALE) * out if float(t) in times else None
    from rlr_backend.sampling.ddim import predicted_x0_and_eps

    alphas = {int(t): float(a) for t, a in zip(schedule.timesteps, schedule.alpha_t)}
    return lambda out, x, t: predicted_x0_and_eps(out, x, alphas[int(t)], schedule.prediction_type)[0] \
        if int(t) in alphas else None


def watch_model_calls(model, config: TrainConfig, on_image: Callable[[torch.Tensor], None]) -> None:
    """Make ``model.denoiser`` (this loaded model only) return a ``WatchedDenoiser``."""
    x0_of = predicted_x0(model, config)
    inner, state = model.denoiser, {}

    def denoiser(guidance_scale: float):
        return WatchedDenoiser(inner(guidance_scale), model, x0_of, on_image, state)

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
