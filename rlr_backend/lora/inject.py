"""Add a LoRA adapter to a diffusers UNet with peft; only the adapter's parameters train."""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from .keys import DEFAULT_TARGET_MODULES, init_down, resolve_alpha

logger = logging.getLogger(__name__)


def add_lora(unet: torch.nn.Module, rank: int = 4, alpha: float | None = None,
             target_modules: Sequence[str] = DEFAULT_TARGET_MODULES, adapter_name: str = "default",
             init: str | bool = "gaussian", seed: int | None = None) -> list[torch.nn.Parameter]:
    """Freeze ``unet``, inject LoRA (delta W = B A * alpha / rank) and return the trainable parameters.

    ``init='gaussian'`` draws A ~ N(0, (1/rank)^2) (peft's choice) and sets B = 0, so the adapter starts
    as a no-op. With ``seed`` the draw comes from its own generator, so a run is reproducible whatever
    else used the global RNG before.
    """
    from peft import LoraConfig

    alpha = resolve_alpha(rank, alpha)
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=list(target_modules))
    unet.add_adapter(config, adapter_name=adapter_name)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError(f"no module of the UNet matches target_modules={list(target_modules)}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for n, p in unet.named_parameters():
        if "lora_" not in n:
            continue
        p.requires_grad_(True)
        p.data = p.data.float()  # LoRA in fp32 even when the base runs in half precision
        if gen is not None and init == "gaussian" and "lora_A" in n:
            with torch.no_grad():
                p.copy_(init_down(p.shape, rank, gen))
    logger.info("LoRA rank %d alpha %g on %d tensors (%d parameters)", rank, alpha, len(params),
                sum(p.numel() for p in params))
    return params
