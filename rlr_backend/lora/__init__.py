"""LoRA: inject (peft) and, later, export/load in kohya format."""

from .inject import DEFAULT_TARGET_MODULES, add_lora

__all__ = ["DEFAULT_TARGET_MODULES", "add_lora"]
