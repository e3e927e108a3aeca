"""This project's LoRA conventions, in one place: which modules get an adapter, how it starts, how alpha is
resolved, and the kohya keys it is saved under. The peft path (``inject``, ``export``) and the ComfyUI
nodes' own weight wrappers (``comfy_nodes.comfy_model``) both use them, so their files are interchangeable.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

#: modules that get a LoRA: the attention projections, as DDPO/trl (peft ``target_modules`` names)
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
#: kohya key prefix of a UNet module: ``lora_unet_<diffusers module path with '.' -> '_'>``
KOHYA_PREFIX = "lora_unet_"


def is_target(module_path: str, targets: Sequence[str] = DEFAULT_TARGET_MODULES) -> bool:
    """peft's rule for ``target_modules`` names: the module is a target or its path ends with ``.<target>``."""
    return any(module_path == t or module_path.endswith("." + t) for t in targets)


def resolve_alpha(rank: int, alpha: float | None) -> float:
    """The adapter's alpha (default: the rank, a scale of 1); rank must be >= 1 and alpha > 0."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    if alpha <= 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
    return alpha


def init_down(shape: Sequence[int], rank: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The down (A) matrix at the start: A ~ N(0, (1/rank)^2) (peft's gaussian init); up (B) starts at zero,
    so the adapter starts as a no-op."""
    return torch.randn(tuple(shape), generator=generator) / rank


def kohya_key(module_path: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` -> ``lora_unet_down_blocks_0_..._to_q``."""
    return KOHYA_PREFIX + module_path.replace(".", "_")


def kohya_tensors(key: str, down: torch.Tensor, up: torch.Tensor, alpha: float,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One module's tensors in a kohya file: ``.lora_down.weight`` (r, in), ``.lora_up.weight`` (out, r) and
    ``.alpha`` (the training alpha), on the CPU in ``dtype``."""
    return {f"{key}.lora_down.weight": down.detach().to("cpu", dtype).contiguous(),
            f"{key}.lora_up.weight": up.detach().to("cpu", dtype).contiguous(),
            f"{key}.alpha": torch.tensor(alpha, dtype=dtype)}


def one_rank_and_alpha(ranks: Iterable[int], alphas: Iterable[float]) -> tuple[int, float]:
    """The single rank and alpha a kohya header describes; mixed values cannot be."""
    ranks, alphas = set(ranks), set(alphas)
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"mixed LoRA ranks {sorted(ranks)} or alphas {sorted(alphas)} cannot be described by one header")
    return ranks.pop(), alphas.pop()
