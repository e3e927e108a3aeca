"""Training: typed config, the loop with callbacks, checkpoints and reports."""

from .config import DEFAULT_PROMPTS, TrainConfig
from .prompts import PromptSpec, parse_prompt, read_prompt_file
from .trainer import StepInfo, Trainer, TrainResult

__all__ = ["DEFAULT_PROMPTS", "PromptSpec", "StepInfo", "TrainConfig", "TrainResult", "Trainer", "parse_prompt",
           "read_prompt_file"]
