"""The best-LoRA guard's final check: is the LoRA of the best evaluation really better than the last one?

Every evaluation whose reward is the best so far writes ``lora_best.safetensors``. An evaluation is a few
images, so over a run its best is partly the luckiest draw: on the long-run suite (8 evaluation images,
``size:0.4``) the guard kept the LoRA of update 75 on a run whose reward, measured on 128 images, kept rising
to update 300; that LoRA held 85% of the gain. So at the end of a run whose best evaluation is not its last
update, both LoRAs are scored once more on ``best_recheck_seeds`` images per evaluation prompt, from a seed
set of their own (never used in training nor in the evaluations), and ``lora_best.safetensors`` keeps the
better one. The check costs two such evaluations, once per run; a run that stopped early (a stop request or
the early-stop guard) is not checked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

logger = logging.getLogger(__name__)

#: the final check's own evaluation seed (the evaluations use ``trainer.EVAL_SEED``)
RECHECK_SEED = 13579


@dataclass(frozen=True)
class Recheck:
    best_step: int
    best_reward: float  # on the check's images
    last_step: int
    last_reward: float
    images: int

    @property
    def last_wins(self) -> bool:
        return self.last_reward >= self.best_reward

    def metadata(self) -> dict[str, str]:
        return {"rlr_best_recheck": f"update {self.last_step}: {self.last_reward:.6g}, update {self.best_step}: "
                                    f"{self.best_reward:.6g} on {self.images} images"}


class BestKeeper:
    """``lora_best.safetensors``: the LoRA of the best evaluation so far (``offer``), and the final check
    (``finish``). ``best``: the run state's record of it ({"step", "reward"}, checkpointed with the run);
    ``save(metadata)`` writes the current LoRA as ``lora_best.safetensors``."""

    def __init__(self, best: dict, params: Sequence[torch.nn.Parameter], save: Callable[[dict[str, str]], object],
                 early_stop_drop: float = 0.0, recheck_seeds: int = 0) -> None:
        self.best, self.params, self.save = best, params, save
        self.early_stop_drop, self.recheck_seeds = early_stop_drop, recheck_seeds
        self.best_params: list[torch.Tensor] | None = None  # on the CPU; None until this session saves a best

    def offer(self, step: int, reward: float) -> bool:
        """Save the LoRA when ``reward`` is the best evaluation so far; returns True when the early-stop guard
        says to stop."""
        best = self.best.get("reward")
        if best is None or reward > best:
            self.best.clear()
            self.best.update(step=step, reward=reward)
            self.save({"rlr_best_update": str(step), "rlr_best_eval_reward": f"{reward:.6g}"})
            self.best_params = [p.detach().to("cpu", copy=True) for p in self.params]
            return False
        drop = self.early_stop_drop
        if drop > 0 and reward < best - drop:
            logger.warning("early stop at update %d: the evaluation reward %.4f fell more than %g below its best "
                           "%.4f (update %d); lora_best.safetensors holds that LoRA", step, reward, drop, best,
                           self.best["step"])
            return True
        return False

    def finish(self, last_step: int, last_eval_reward: float, evaluate: Callable[[int], float],
               images: int) -> Recheck | None:
        """The final check (module docstring) when the best evaluation is not the last update's;
        ``evaluate(per_prompt)`` scores the current LoRA on the check's seed set. ``images``: how many that is."""
        if not self.recheck_seeds or not self.best or self.best["step"] == last_step:
            return None
        if self.best_params is None:
            logger.info("lora_best.safetensors (update %d) was saved before this run was resumed: not re-checked",
                        self.best["step"])
            return None
        r = recheck(self.params, self.best_params, lambda: evaluate(self.recheck_seeds), self.best["step"],
                    last_step, images)
        self.best["recheck"] = r.metadata()["rlr_best_recheck"]
        if r.last_wins:
            logger.info("final check on %d fresh images: the last LoRA (update %d, %.4f) beats lora_best (update %d, "
                        "%.4f): lora_best.safetensors now holds the last LoRA", images, last_step, r.last_reward,
                        r.best_step, r.best_reward)
            self.best.update(step=last_step, reward=last_eval_reward)
            self.save({"rlr_best_update": str(last_step), "rlr_best_eval_reward": f"{last_eval_reward:.6g}",
                       **r.metadata()})
            self.best_params = [p.detach().to("cpu", copy=True) for p in self.params]
        else:
            logger.info("final check on %d fresh images: lora_best (update %d, %.4f) beats the last LoRA (update %d, "
                        "%.4f): kept", images, r.best_step, r.best_reward, last_step, r.last_reward)
        return r


def recheck(params: Sequence[torch.nn.Parameter], best_params: Sequence[torch.Tensor], evaluate: Callable[[], float],
            best_step: int, last_step: int, images: int) -> Recheck:
    """Score the current (last) LoRA and, with ``best_params`` copied in, the best one with ``evaluate``;
    the last LoRA's parameters are back in place afterwards, whatever happens."""
    last_reward = evaluate()
    last = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, b in zip(params, best_params, strict=True):
                p.copy_(b.to(p.device, p.dtype))
        best_reward = evaluate()
    finally:
        with torch.no_grad():
            for p, v in zip(params, last):
                p.copy_(v)
    return Recheck(best_step, best_reward, last_step, last_reward, images)
