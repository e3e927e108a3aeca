"""LoRA: inject with peft, export to / load from kohya-format safetensors."""

from .export import (check_lora_version, kohya_metadata, kohya_state_dict, load_lora, load_lora_state_dict, model_family,
                     save_kohya, set_lora_scale)
from .inject import DEFAULT_TARGET_MODULES, add_lora

__all__ = ["DEFAULT_TARGET_MODULES", "add_lora", "check_lora_version", "model_family", "kohya_metadata", "kohya_state_dict", "load_lora", "load_lora_state_dict",
           "save_kohya", "set_lora_scale"]
