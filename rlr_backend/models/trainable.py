"""What the trainer needs from a text-to-image model, whichever library holds it.

``TrainableModel`` is the small surface the trainer, the sampler and the UIs use: prompts ->
conditioning, a ``Denoiser``, latents -> images, the latent shape, the noise schedule, and LoRA
(inject for training, export in kohya keys, apply for sampling). ``DiffusersModel``
(:mod:`rlr_backend.models.diffusers_model`) implements it for diffusers pipelines; the ComfyUI pack
implements it for ComfyUI's MODEL/CLIP/VAE without this package ever importing ComfyUI.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from ..sampling import Denoiser, PromptSchedule, Schedule, sample_chain


@runtime_checkable
class TrainableModel(Protocol):
    #: kohya ``ss_base_model_version`` of LoRAs made on this model ("sd_v1", "sdxl_base_v1-0", ...)
    base_model_version: str
    #: shape (C, H, W) of one latent the sampler starts from
    latent_shape: tuple[int, ...]

    def schedule(self, num_steps: int, eta: float) -> Schedule:
        """The chain of ``num_steps`` steps on the model's noise schedule: a ``DDIMSchedule`` for SD1.x/SD2.x/SDXL,
        a ``FlowSchedule`` for flow-matching models (whose ``schedule`` also takes ``kind`` and ``sde_window``;
        they say ``flow = True``)."""
        ...

    def conditioning(self, texts: Sequence[str]) -> Any:
        """Conditioning for a batch of prompts (with the empty prompt for guidance), for ``denoiser``."""
        ...

    def denoiser(self, guidance_scale: float) -> Denoiser:
        """The model as a ``Denoiser`` (classifier-free guidance inside), returning what the schedule's
        ``prediction_type`` names."""
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images (B, 3, H, W) in [0, 1], differentiable."""
        ...

    def add_lora(self, rank: int, alpha: float | None, seed: int) -> list[tuple[str, torch.nn.Parameter]]:
        """Freeze the model, add a LoRA that starts as a no-op; return its (stable name, parameter) pairs."""
        ...

    def lora_state_dict(self, dtype: torch.dtype = torch.float16) -> tuple[dict[str, Tensor], int, float]:
        """(the trained LoRA in kohya keys ``lora_unet_...``, rank, alpha)."""
        ...

    def load_lora(self, state_dict: dict[str, Tensor], strength: float = 1.0) -> None:
        """Apply a kohya LoRA for sampling; a ValueError names modules this model lacks."""
        ...


@runtime_checkable
class ScheduledPrompt(Protocol):
    """A prompt with coarse / mid / fine versions (``rlr_backend.train.prompts.PromptSpec``)."""

    scheduled: bool

    def versions(self) -> tuple[str, str, str]:
        ...


def prompt_schedule(model: TrainableModel, prompts: Sequence[str | ScheduledPrompt], num_steps: int,
                    split: Sequence[float] | None = None) -> PromptSchedule:
    """The per-step conditioning of a batch of prompts, the one definition training and sampling share:
    when any prompt has coarse / mid / fine versions, each version on its ``split`` part of the chain
    (equal thirds when None; a plain prompt uses its text on all three); otherwise one conditioning."""
    versions = [(p, p, p) if isinstance(p, str) else p.versions() for p in prompts]
    if any(not isinstance(p, str) and p.scheduled for p in prompts):
        conds = [model.conditioning([v[i] for v in versions]) for i in range(3)]
        return PromptSchedule.from_fractions(conds, split or [1 / 3] * 3, num_steps)
    return PromptSchedule.constant(model.conditioning([v[2] for v in versions]), num_steps)


@torch.no_grad()
def sample_images(model: TrainableModel, prompts: Sequence[str | ScheduledPrompt], *, num_steps: int = 20,
                  eta: float = 1.0, guidance_scale: float = 4.0, seed: int = 0,
                  callback: Callable[[dict], None] | None = None,
                  prompt_split: Sequence[float] | None = None) -> Tensor:
    """Images (B, 3, H, W) in [0, 1] for ``prompts`` (one image each), reproducible from ``seed``;
    a prompt with coarse / mid / fine versions uses them on the ``prompt_split`` parts of the chain
    (``prompt_schedule``); ``callback`` gets sample_chain's per-step dict (for progress bars)."""
    texts = [p if isinstance(p, str) else p.versions()[2] for p in prompts]
    if not prompts or any(not t.strip() for t in texts):
        raise ValueError("prompt is empty; give the text of a prompt")
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn((len(prompts), *model.latent_shape), generator=g)
    cond = prompt_schedule(model, prompts, num_steps, prompt_split)
    traj = sample_chain(model.denoiser(guidance_scale), model.schedule(num_steps, eta), cond, x_T, generator=g,
                        callback=callback)
    return model.decode(traj.final)
