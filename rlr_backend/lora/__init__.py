"""LoRA: inject with peft, export to / load from kohya-format safetensors."""

from .export import (check_lora_version, kohya_metadata, kohya_state_dict, load_lora, load_lora_state_dict, model_family,
                     save_kohya, set_lora_scale)
from .inject import add_lora
from .keys import (DEFAULT_TARGET_MODULES, KOHYA_PREFIX, init_down, is_target, kohya_key, kohya_tensors,
                   one_rank_and_alpha, resolve_alpha)

__all__ = ["DEFAULT_TARGET_MODULES", "KOHYA_PREFIX", "add_lora", "init_down", "is_target", "kohya_key", "kohya_tensors",
           "one_rank_and_alpha", "resolve_alpha", "check_lora_version", "model_family", "kohya_metadata", "kohya_state_dict", "load_lora", "load_lora_state_dict",
           "save_kohya", "set_lora_scale"]
