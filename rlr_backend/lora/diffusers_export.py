"""Export a peft LoRA on a diffusers transformer (SD3, FLUX.1, Z-Image) in diffusers/PEFT keys.

Keys ``transformer.<diffusers module path>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r), no
``.alpha`` tensors: the one format SD3 loads in diffusers (``SD3LoraLoaderMixin`` takes diffusers/PEFT keys
only, and every key must contain "lora"), and one ComfyUI maps explicitly for SD3, FLUX, Z-Image and
Qwen-Image (``comfy/lora.py::model_lora_keys_unet``: ``transformer.<diffusers name>``). Without an alpha both
loaders apply the LoRA at scale 1 (alpha = rank), so the training scale alpha / rank is folded into B
(shared/reference/flow-matching.md §5): a LoRA trained with r = 32, alpha = 64 loads at full strength.
"""

from __future__ import annotations

import torch

#: the key prefix diffusers' ``load_lora_adapter(prefix="transformer")`` and ComfyUI's map expect
TRANSFORMER_PREFIX = "transformer."


def lora_keys(module: str, prefix: str = TRANSFORMER_PREFIX) -> tuple[str, str]:
    """The (down / A, up / B) keys of the LoRA on ``module`` (its path in the transformer)."""
    return f"{prefix}{module}.lora_A.weight", f"{prefix}{module}.lora_B.weight"


def diffusers_tensors(module: str, down: torch.Tensor, up: torch.Tensor, scale: float, dtype: torch.dtype,
                      prefix: str = TRANSFORMER_PREFIX) -> dict[str, torch.Tensor]:
    """One module's two tensors in the file: A = ``down`` (r, in), B = ``up`` (out, r) times ``scale`` (the
    training alpha / rank, folded in: the loaders apply the file at scale 1), on the CPU in ``dtype``."""
    key_a, key_b = lora_keys(module, prefix)
    return {key_a: down.detach().to("cpu", dtype).contiguous(),
            key_b: (up.detach().float() * scale).to("cpu", dtype).contiguous()}


def lora_modules(model: torch.nn.Module, adapter: str = "default") -> dict[str, torch.nn.Module]:
    """Path -> peft layer of every module of ``model`` that carries the LoRA ``adapter``."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and adapter in getattr(m, "lora_A", {})}


def diffusers_state_dict(model: torch.nn.Module, adapter: str = "default", dtype: torch.dtype = torch.float16,
                         prefix: str = TRANSFORMER_PREFIX) -> tuple[dict[str, torch.Tensor], int, float]:
    """(state dict ``<prefix><module>.lora_A.weight`` / ``.lora_B.weight`` with B scaled by alpha / rank, rank,
    alpha = rank, the scale the file is loaded at) of ``model``'s LoRA ``adapter``."""
    out: dict[str, torch.Tensor] = {}
    ranks: set[int] = set()
    for name, m in lora_modules(model, adapter).items():
        down, up = m.lora_A[adapter].weight.detach(), m.lora_B[adapter].weight.detach()
        rank = down.shape[0]
        ranks.add(rank)
        out.update(diffusers_tensors(name, down, up, float(m.lora_alpha[adapter]) / rank, dtype, prefix))
    if not out:
        raise ValueError("the model has no LoRA adapter to export; add one with rlr_backend.lora.add_lora")
    if len(ranks) != 1:
        raise ValueError(f"mixed LoRA ranks {sorted(ranks)} cannot be described by one header")
    rank = ranks.pop()
    return out, rank, float(rank)
