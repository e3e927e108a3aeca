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

from ..safe_io import InvalidModelFile, load_tensors, save_tensors
from .keys import kohya_key, kohya_tensors, one_rank_and_alpha

logger = logging.getLogger(__name__)

def _lora_modules(unet: torch.nn.Module, adapter: str = "default") -> dict[str, torch.nn.Module]:
    return {name: m for name, m in unet.named_modules()
            if hasattr(m, "lora_A") and adapter in getattr(m, "lora_A", {})}


def kohya_state_dict(unet: torch.nn.Module, adapter: str = "default",
                     dtype: torch.dtype = torch.float16) -> tuple[dict[str, torch.Tensor], int, float]:
    """(state dict in kohya keys, rank, alpha) of the UNet's LoRA adapter."""
    modules = _lora_modules(unet, adapter)
    if not modules:
        raise ValueError("the UNet has no LoRA adapter to export; add one with rlr_backend.lora.add_lora")
    out, ranks, alphas = {}, [], []
    for name, m in modules.items():
        down, up = m.lora_A[adapter].weight, m.lora_B[adapter].weight
        ranks.append(down.shape[0])
        alphas.append(float(m.lora_alpha[adapter]))
        out.update(kohya_tensors(kohya_key(name), down, up, alphas[-1], dtype))
    return (out, *one_rank_and_alpha(ranks, alphas))


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
    modules = {k.rsplit(".", 2)[0] for k in sd}
    logger.info("saved LoRA (%d modules, rank %d, alpha %g) to %s", len(modules), rank, alpha, path)
    return path


#: kohya ``ss_base_model_version`` prefix -> the architecture it names (for error messages)
MODEL_FAMILIES: dict[str, str] = {"sdxl": "SDXL", "sd_v2": "SD2.x", "sd_v1": "SD1.x",
                                   "rlr_default_flow": "RLR-default-flow", "rlr_default": "RLR-default",
                                   "sd3": "SD3", "flux1": "FLUX.1", "zimage": "Z-Image",
                                   "qwen_image": "Qwen-Image"}
#: LoRAs of the embedded default written before it had its own id say sd_v1; accepted on it (shapes decide)
LEGACY_FAMILIES = {("RLR-default", "SD1.x")}


def model_family(base_model_version: str) -> str:
    """``sdxl_base_v1-0`` -> ``SDXL``, ``sd_v2`` -> ``SD2.x``, ``sd_v1`` -> ``SD1.x``; unknown values are returned as is."""
    for prefix, name in MODEL_FAMILIES.items():
        if base_model_version.startswith(prefix):
            return name
    return base_model_version


def check_lora_version(metadata: dict[str, str], model_version: str, source: str = "LoRA") -> None:
    """Refuse a LoRA whose header says it was trained on another architecture than the model's."""
    lora_version = metadata.get("ss_base_model_version")
    if lora_version and model_family(lora_version) != model_family(model_version) and (
            model_family(model_version), model_family(lora_version)) not in LEGACY_FAMILIES:
        raise InvalidModelFile(f"{source}: this LoRA was made for {model_family(lora_version)} "
                               f"(ss_base_model_version={lora_version!r}) but the model is {model_family(model_version)} "
                               f"({model_version}); use a LoRA trained on a {model_family(model_version)} model")


def load_lora(unet: torch.nn.Module, path: str | Path, adapter_name: str = "default",
              model_version: str | None = None, text_encoders: dict[str, torch.nn.Module] | None = None
              ) -> list[torch.nn.Parameter]:
    """Add the LoRA in ``path`` (kohya, diffusers or PEFT keys: see :mod:`rlr_backend.lora.formats`) to ``unet``
    and, for its text-encoder parts, to ``text_encoders`` ({"text_encoder": ..., "text_encoder_2": ...});
    returns the UNet's LoRA parameters. With ``model_version`` (the model's ``ss_base_model_version``) a LoRA
    whose header names another architecture is refused before anything changes."""
    tensors, metadata = load_tensors(path)
    if model_version is not None:
        check_lora_version(metadata, model_version, str(path))
    return load_lora_state_dict(unet, tensors, adapter_name, source=str(path), model_version=model_version,
                                metadata=metadata, text_encoders=text_encoders)


def load_lora_state_dict(unet: torch.nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str = "default",
                         source: str = "LoRA", model_version: str | None = None, metadata: dict[str, str] | None = None,
                         text_encoders: dict[str, torch.nn.Module] | None = None) -> list[torch.nn.Parameter]:
    """Add a LoRA state dict (any format of :mod:`rlr_backend.lora.formats`) to ``unet`` (and ``text_encoders``)
    as a peft adapter; ``source`` names it in error messages. Every module name and shape is checked before
    anything is touched; ``model_version`` names the model's architecture in the error. Text-encoder parts
    without a text encoder to apply them to are skipped with a warning."""
    from .formats import lora_config, parse_lora

    arch = f" (the model is {model_family(model_version)}; was the LoRA made for another base model, e.g. SDXL vs SD1.5?)" \
        if model_version else " (another base model?)"
    models = {"unet": unet, **(text_encoders or {})}
    parsed = parse_lora(tensors, metadata, models, source, arch)
    skipped = {t: len(mods) for t, mods in parsed.items() if t not in models}
    if skipped:
        logger.warning("%s: %s not applied (no such text encoder here; only the UNet is adapted)", source,
                       ", ".join(f"{n} {t.replace('_', ' ')} module(s)" for t, n in skipped.items()))
    if not parsed.get("unet") and not any(parsed.get(t) for t in models if t != "unet"):
        raise InvalidModelFile(f"{source}: no module of this model is adapted by the LoRA")
    params: list[torch.nn.Parameter] = []
    for target, model in models.items():
        modules = parsed.get(target)
        if not modules:
            continue
        _add_adapter(model, target, lora_config(modules), adapter_name)
        with torch.no_grad():
            for path, m in modules.items():
                layer = model.get_submodule(path)
                for lora_layer, value in ((layer.lora_A[adapter_name], m.down), (layer.lora_B[adapter_name], m.up)):
                    lora_layer.weight.copy_(value.to(lora_layer.weight.dtype).reshape(lora_layer.weight.shape))
                if target == "unet":
                    params += [layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight]
        logger.info("%s: LoRA on %d %s module(s)", source, len(modules), target.replace("_", " "))
    return params


def _add_adapter(model: torch.nn.Module, target: str, config, adapter_name: str) -> None:
    """diffusers' ``add_adapter`` on the UNet (it keeps the adapter list ``set_adapters`` uses); peft's injection
    on a text encoder (transformers' own ``add_adapter`` wants a newer peft), with only this adapter active."""
    if target == "unet":
        model.add_adapter(config, adapter_name=adapter_name)
        return
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    for layer in model.modules():
        if adapter_name in getattr(layer, "lora_A", {}) and hasattr(layer, "set_adapter"):
            layer.set_adapter([adapter_name])


def set_lora_scale(modules, adapter_name: str, strength: float) -> None:
    """Scale the ``adapter_name`` LoRA of every peft layer in ``modules`` (UNet, text encoders) by ``strength``
    (0 gives the base model exactly)."""
    for module in modules:
        for layer in module.modules():
            if hasattr(layer, "set_scale") and adapter_name in getattr(layer, "lora_A", {}):
                layer.set_scale(adapter_name, float(strength))
