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

from ..sampling import DDIMSchedule, PromptSchedule, sample_chain
from .denoiser import Denoiser


@runtime_checkable
class TrainableModel(Protocol):
    #: kohya ``ss_base_model_version`` of LoRAs made on this model ("sd_v1", "sdxl_base_v1-0", ...)
    base_model_version: str
    #: shape (C, H, W) of one latent the sampler starts from
    latent_shape: tuple[int, ...]

    def schedule(self, num_steps: int, eta: float) -> DDIMSchedule:
        """The DDIM chain of ``num_steps`` steps on the model's training noise schedule."""
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


@torch.no_grad()
def sample_images(model: TrainableModel, prompts: Sequence[str], *, num_steps: int = 20, eta: float = 1.0,
                  guidance_scale: float = 4.0, seed: int = 0, callback: Callable[[dict], None] | None = None) -> Tensor:
    """Images (B, 3, H, W) in [0, 1] for ``prompts`` (one image each), reproducible from ``seed``;
    ``callback`` gets sample_chain's per-step dict (for progress bars)."""
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError("prompt is empty; give the text of a prompt")
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn((len(prompts), *model.latent_shape), generator=g)
    cond = PromptSchedule.constant(model.conditioning(list(prompts)), num_steps)
    traj = sample_chain(model.denoiser(guidance_scale), model.schedule(num_steps, eta), cond, x_T, generator=g,
                        callback=callback)
    return model.decode(traj.final)
