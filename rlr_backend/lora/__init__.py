"""LoRA: inject with peft, export to / load from kohya-format safetensors."""

from .export import kohya_state_dict, load_lora, save_lora
from .inject import DEFAULT_TARGET_MODULES, add_lora

__all__ = ["DEFAULT_TARGET_MODULES", "add_lora", "kohya_state_dict", "load_lora", "save_lora"]
