"""Everything a run resumes from, in one place: ``TrainState``.

Save, load, resume, the roll-back after a stop inside an update and the data-parallel start all go
through it, so a new piece of resumable state is one field here plus its lines in ``counters`` /
``load_counters``. The checkpoint layout and its ``state.json`` keys are those of ``checkpoint.py``
(version 1): checkpoints written before this class existed resume unchanged.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..estimators import BaselineState, JSampler
from .checkpoint import load_checkpoint, save_checkpoint
from .memory import DynamicLossScale


@dataclass
class TrainState:
    """The LoRA, the optimizer, the run's generator and the statistics carried across updates."""

    lora: list[tuple[str, torch.nn.Parameter]]  # (stable name, parameter) pairs of the trained LoRA
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # prompts, initial noises, j, perturbations: one stream for the whole run
    baseline: BaselineState = field(default_factory=BaselineState)
    j_sampler: JSampler = field(default_factory=JSampler)  # RLR's half-order start statistics
    loss_scale: DynamicLossScale | None = None  # fp16 only
    step: int = 0  # the last finished update (metrics.jsonl holds rows 0..step)
    eval_rewards: dict[int, float] = field(default_factory=dict)  # update -> evaluation reward
    best: dict = field(default_factory=dict)  # {"step", "reward"} of lora_best.safetensors

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.lora]

    # -- the JSON part (state.json) --------------------------------------------------------------------
    def counters(self) -> dict:
        """Everything but the tensors, with the keys checkpoints have always had."""
        out = {"baseline": self.baseline.state_dict(), "j_norms": dict(self.j_sampler.norms)}
        if self.loss_scale is not None:
            out["loss_scale"] = self.loss_scale.state_dict()
        out.update(eval_rewards=dict(self.eval_rewards), best=dict(self.best))
        return out

    def load_counters(self, state: dict) -> None:
        """Inverse of ``counters`` (keys from JSON are strings; older checkpoints lack ``best``,
        ``loss_scale`` and the baseline's ``prompt_ema``)."""
        self.baseline.load_state_dict(state["baseline"])
        self.j_sampler.norms = {int(k): float(v) for k, v in state["j_norms"].items()}
        if self.loss_scale is not None and state.get("loss_scale") is not None:
            self.loss_scale.load_state_dict(state["loss_scale"])
        self.eval_rewards.clear()
        self.eval_rewards.update({int(k): math.nan if v is None else float(v) for k, v in state["eval_rewards"].items()})
        self.best.clear()
        self.best.update(state.get("best") or {})

    # -- checkpoints ------------------------------------------------------------------------------------
    def save(self, run_dir: Path) -> Path:
        """Checkpoint ``self.step`` in ``run_dir/ckpt`` (atomic; see ``checkpoint.save_checkpoint``)."""
        return save_checkpoint(run_dir, self.step, self.lora, self.optimizer, self.generator, self.counters())

    def load(self, ckpt: Path) -> None:
        """Resume from checkpoint folder ``ckpt``, checked whole before anything changes."""
        state = load_checkpoint(ckpt, self.lora, self.optimizer, self.generator)
        self.step = state["step"]
        self.load_counters(state)

    # -- within a run -------------------------------------------------------------------------------------
    def rollback_point(self) -> tuple:
        """What an update changes besides the LoRA and the optimizer (those change only at its end)."""
        return self.generator.get_state(), copy.deepcopy(self.counters())

    def roll_back(self, point: tuple) -> None:
        """Back to a ``rollback_point``: a stop inside an update then resumes bit for bit."""
        generator, counters = point
        self.generator.set_state(generator)
        self.load_counters(counters)

    def shared(self) -> dict:
        """What the main process sends the others when a data-parallel run starts (the LoRA goes separately)."""
        return {"optim": self.optimizer.state_dict(), "rng": self.generator.get_state(), "step": self.step,
                **self.counters()}

    def load_shared(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optim"])
        self.generator.set_state(state["rng"])
        self.step = state["step"]
        self.load_counters(state)
