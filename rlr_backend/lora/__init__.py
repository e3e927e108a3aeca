"""LoRA: inject with peft, export to / load from kohya-format safetensors."""

from .export import kohya_metadata, kohya_state_dict, load_lora, load_lora_state_dict, save_kohya, save_lora
from .inject import DEFAULT_TARGET_MODULES, add_lora

__all__ = ["DEFAULT_TARGET_MODULES", "add_lora", "kohya_metadata", "kohya_state_dict", "load_lora", "load_lora_state_dict",
           "save_kohya", "save_lora"]
