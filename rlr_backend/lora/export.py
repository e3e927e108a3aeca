"""Export a peft LoRA on a diffusers UNet as a kohya-format .safetensors that ComfyUI, A1111/Forge and
diffusers all load, and load such a file back.

Keys: ``lora_unet_<diffusers module path with '.'->'_'>.lora_down.weight`` (r, in),
``.lora_up.weight`` (out, r) and ``.alpha`` (the training alpha; diffusers' converter writes
alpha = rank, which is wrong whenever alpha != rank, so it is overwritten). Metadata ``ss_*`` as
kohya's sd-scripts write it, so A1111 detects the base model version.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..safe_io import InvalidModelFile, load_tensors, nonfinite_count, save_tensors

logger = logging.getLogger(__name__)

KOHYA_PREFIX = "lora_unet_"


def _lora_modules(unet: torch.nn.Module, adapter: str = "default") -> dict[str, torch.nn.Module]:
    return {name: m for name, m in unet.named_modules()
            if hasattr(m, "lora_A") and adapter in getattr(m, "lora_A", {})}


def kohya_state_dict(unet: torch.nn.Module, adapter: str = "default",
                     dtype: torch.dtype = torch.float16) -> tuple[dict[str, torch.Tensor], int, float]:
    """(state dict in kohya keys, rank, alpha) of the UNet's LoRA adapter."""
    modules = _lora_modules(unet, adapter)
    if not modules:
        raise ValueError("the UNet has no LoRA adapter to export; add one with rlr_backend.lora.add_lora")
    out, ranks, alphas = {}, set(), set()
    for name, m in modules.items():
        key = KOHYA_PREFIX + name.replace(".", "_")
        down, up = m.lora_A[adapter].weight, m.lora_B[adapter].weight
        rank, alpha = down.shape[0], float(m.lora_alpha[adapter])
        ranks.add(rank)
        alphas.add(alpha)
        out[f"{key}.lora_down.weight"] = down.detach().to("cpu", dtype)
        out[f"{key}.lora_up.weight"] = up.detach().to("cpu", dtype)
        out[f"{key}.alpha"] = torch.tensor(alpha, dtype=dtype)
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"mixed LoRA ranks {sorted(ranks)} or alphas {sorted(alphas)} cannot be described by one header")
    return out, ranks.pop(), alphas.pop()


def kohya_metadata(sd: dict[str, torch.Tensor], rank: int, alpha: float, base_model_version: str = "sd_v1",
                   metadata: dict[str, str] | None = None) -> dict[str, str]:
    """The safetensors header kohya's sd-scripts write (A1111 reads ss_base_model_version), plus ``metadata``."""
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}",
            "ss_base_model_version": base_model_version, "ss_training_comment": "trained with rlr-backend",
            "rlr_target_modules": json.dumps(sorted({k.rsplit(".", 2)[0] for k in sd}))}
    meta.update(metadata or {})
    return meta


def save_kohya(sd: dict[str, torch.Tensor], path: str | Path, rank: int, alpha: float, *,
               base_model_version: str = "sd_v1", metadata: dict[str, str] | None = None) -> Path:
    """Write a kohya state dict (from ``kohya_state_dict`` or a model's ``lora_state_dict``) atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA files are written as .safetensors, got {path.name!r}")
    save_tensors(sd, path, kohya_metadata(sd, rank, alpha, base_model_version, metadata))
    logger.info("saved LoRA (%d modules, rank %d, alpha %g) to %s", len(sd) // 3, rank, alpha, path)
    return path


def save_lora(unet: torch.nn.Module, path: str | Path, *, base_model_version: str = "sd_v1",
              dtype: torch.dtype = torch.float16, metadata: dict[str, str] | None = None) -> Path:
    """Write the adapter to ``path`` atomically and return the path."""
    if Path(path).suffix != ".safetensors":
        raise ValueError(f"LoRA files are written as .safetensors, got {Path(path).name!r}")
    sd, rank, alpha = kohya_state_dict(unet, dtype=dtype)
    return save_kohya(sd, path, rank, alpha, base_model_version=base_model_version, metadata=metadata)


#: kohya ``ss_base_model_version`` prefix -> the architecture it names (for error messages)
MODEL_FAMILIES: dict[str, str] = {"sdxl": "SDXL", "sd_v2": "SD2.x", "sd_v1": "SD1.x"}


def model_family(base_model_version: str) -> str:
    """``sdxl_base_v1-0`` -> ``SDXL``, ``sd_v2`` -> ``SD2.x``, ``sd_v1`` -> ``SD1.x``; unknown values are returned as is."""
    for prefix, name in MODEL_FAMILIES.items():
        if base_model_version.startswith(prefix):
            return name
    return base_model_version


def check_lora_version(metadata: dict[str, str], model_version: str, source: str = "LoRA") -> None:
    """Refuse a LoRA whose header says it was trained on another architecture than the model's."""
    lora_version = metadata.get("ss_base_model_version")
    if lora_version and model_family(lora_version) != model_family(model_version):
        raise InvalidModelFile(f"{source}: this LoRA was made for {model_family(lora_version)} "
                               f"(ss_base_model_version={lora_version!r}) but the model is {model_family(model_version)} "
                               f"({model_version}); use a LoRA trained on a {model_family(model_version)} model")


def load_lora(unet: torch.nn.Module, path: str | Path, adapter_name: str = "default",
              model_version: str | None = None) -> list[torch.nn.Parameter]:
    """Add the LoRA in a kohya file (as written by ``save_lora``) to ``unet``; returns its parameters.
    With ``model_version`` (the model's ``ss_base_model_version``) a LoRA whose header names another
    architecture is refused before anything changes."""
    tensors, metadata = load_tensors(path)
    if model_version is not None:
        check_lora_version(metadata, model_version, str(path))
    return load_lora_state_dict(unet, tensors, adapter_name, source=str(path), model_version=model_version)


def load_lora_state_dict(unet: torch.nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str = "default",
                         source: str = "LoRA", model_version: str | None = None) -> list[torch.nn.Parameter]:
    """Add a kohya state dict to ``unet`` as a peft adapter; ``source`` names it in error messages.
    Every module name and shape is checked before the UNet is touched; ``model_version`` names the
    model's architecture in the error."""
    from peft import LoraConfig

    path = source
    arch = f" (the model is {model_family(model_version)}; was the LoRA made for another base model, e.g. SDXL vs SD1.5?)" \
        if model_version else " (another base model?)"
    modules = dict(unet.named_modules())
    names = {n.replace(".", "_"): n for n, _ in unet.named_modules()}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not torch.is_tensor(value) or not value.is_floating_point():
            kind = value.dtype if torch.is_tensor(value) else type(value).__name__
            raise InvalidModelFile(f"{path}: tensor {key!r} is {kind}, not a floating-point tensor")
        bad = nonfinite_count(value)
        if bad:
            raise InvalidModelFile(f"{path}: tensor {key!r} holds {bad} NaN/inf values; the LoRA is damaged")
        if not key.startswith(KOHYA_PREFIX):
            raise InvalidModelFile(f"{path}: unexpected key {key!r} (only UNet LoRA keys 'lora_unet_...' are supported)")
        module_key, _, suffix = key[len(KOHYA_PREFIX):].partition(".")
        groups.setdefault(module_key, {})[suffix] = value
    targets, ranks, alphas = {}, set(), set()
    for module_key, parts in groups.items():
        if module_key not in names:
            raise InvalidModelFile(f"{path}: LoRA module {module_key!r} does not exist in this UNet{arch}")
        if not {"lora_down.weight", "lora_up.weight"} <= parts.keys():
            raise InvalidModelFile(f"{path}: module {module_key!r} lacks lora_down/lora_up weights")
        w = getattr(modules[names[module_key]], "weight", None)
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        alpha_ok = "alpha" not in parts or parts["alpha"].numel() == 1
        if down.dim() < 2 or up.dim() < 2 or up.shape[1] != down.shape[0] or not alpha_ok:
            raise InvalidModelFile(f"{path}: LoRA module {module_key!r} has mismatched shapes: lora_up "
                                   f"{list(up.shape)}, lora_down {list(down.shape)}"
                                   f"{', alpha ' + str(list(parts['alpha'].shape)) if 'alpha' in parts else ''}")
        if w is not None and (up.shape[0] != w.shape[0] or down[0].numel() != w[0].numel()):
            raise InvalidModelFile(f"{path}: LoRA module {module_key!r} has shape {tuple(up.shape)} x "
                                   f"{tuple(down.shape)} but the layer is {tuple(w.shape)}{arch}")
        rank = parts["lora_down.weight"].shape[0]
        ranks.add(rank)
        alphas.add(float(parts["alpha"]) if "alpha" in parts else float(rank))
        targets[names[module_key]] = parts
    if len(ranks) != 1 or len(alphas) != 1:
        raise InvalidModelFile(f"{path}: mixed ranks {sorted(ranks)} / alphas {sorted(alphas)} are not supported")
    rank, alpha = ranks.pop(), alphas.pop()
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(targets), init_lora_weights=False)
    unet.add_adapter(config, adapter_name=adapter_name)
    params = []
    with torch.no_grad():
        for name, m in unet.named_modules():
            if name in targets:
                for layer, key in ((m.lora_A[adapter_name], "lora_down.weight"), (m.lora_B[adapter_name], "lora_up.weight")):
                    value = targets[name][key]
                    if value.numel() != layer.weight.numel():
                        unet.delete_adapters(adapter_name)
                        raise InvalidModelFile(f"{path}: tensor {KOHYA_PREFIX}{name.replace('.', '_')}.{key} has shape "
                                               f"{list(value.shape)}, the layer needs {list(layer.weight.shape)}")
                    layer.weight.copy_(value.float().reshape(layer.weight.shape))
                params += [m.lora_A[adapter_name].weight, m.lora_B[adapter_name].weight]
    return params
