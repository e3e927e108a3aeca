"""What a run should be told about its estimator, said once: options that bias it, settings overridden.

``describe(config, reward_differentiable)`` lists, in words, why an estimator configuration is
biased (options that change the expected direction of the gradient, not only its scale) and which
of its settings a problem overrides. The trainer logs it at the start of every run and writes it
into the LoRA's metadata; the estimator functions log it once per process for library callers.
``log_once`` is the one place a notice is said once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_SAID: set[str] = set()


def log_once(key: str, level: int, message: str, *args: object) -> None:
    """Log ``message`` the first time ``key`` is seen in this process."""
    if key not in _SAID:
        _SAID.add(key)
        logger.log(level, message, *args)


def forget_notices() -> None:
    """Say every notice again (tests; a new run in the same process uses ``EstimatorNotes.log``)."""
    _SAID.clear()


@dataclass(frozen=True)
class EstimatorNotes:
    estimator: str
    biases: tuple[str, ...]  # why the estimate's expectation is not the gradient (empty: unbiased)
    overrides: tuple[str, ...]  # settings the problem changes (e.g. fo_steps with a non-differentiable reward)

    @property
    def unbiased(self) -> bool:
        return not self.biases

    def metadata(self) -> dict[str, str]:
        """``rlr_unbiased`` ("true"/"false"), ``rlr_bias`` and ``rlr_overrides`` (the reasons, '; '-joined)."""
        meta = {"rlr_unbiased": "true" if self.unbiased else "false"}
        if self.biases:
            meta["rlr_bias"] = "; ".join(self.biases)
        if self.overrides:
            meta["rlr_overrides"] = "; ".join(self.overrides)
        return meta

    def log(self, once: bool = True) -> None:
        """One line per kind of notice (``once``: only the first time this process sees it)."""
        for kind, items in (("is biased", self.biases), ("setting overridden", self.overrides)):
            if not items:
                continue
            msg, args = "estimator %s %s: %s", (self.estimator, kind, "; ".join(items))
            key = msg % args
            if once:
                log_once(key, logging.WARNING, msg, *args)
            else:
                _SAID.add(key)
                logger.warning(msg, *args)


def _baseline_biases(baseline: str, adv_clip: float | None) -> list[str]:
    out = []
    if baseline == "batch_norm":
        out.append("advantages divided by the batch's reward std (baseline 'batch_norm')")
    elif baseline == "per_prompt_norm":
        out.append("advantages divided by each prompt's reward std (baseline 'per_prompt_norm')")
    if adv_clip is not None:
        out.append(f"advantages clipped to +-{adv_clip:g}")
    return out


def describe(config: object, reward_differentiable: bool = True) -> EstimatorNotes:
    """The notes of an estimator config (``RLRConfig``, ``DDPOConfig``, ``TruncatedBPConfig``, ...)."""
    from .backprop import FullBPConfig, TruncatedBPConfig
    from .code_compat import CodeCompatConfig
    from .likelihood_ratio import DDPOConfig, ZOConfig
    from .rlr import RLRConfig

    biases: list[str] = []
    overrides: list[str] = []
    if isinstance(config, RLRConfig):
        name = "rlr"
        biases += _baseline_biases(config.baseline, config.adv_clip)
        if config.weights != (1.0, 1.0, 1.0):
            biases.append(f"unequal term weights {tuple(config.weights)} (FO, HO, ZO)")
        if config.zo_mode in ("param_1pt", "param_2pt"):
            biases.append(f"zo_mode={config.zo_mode}: finite differences in parameter space, O(nu^2) bias "
                          f"(nu={config.nu:g})")
        if not reward_differentiable and config.fo_steps > 1:
            overrides.append(f"the reward is not differentiable, so there is no first-order term: fo_steps="
                             f"{config.fo_steps} is ignored and the last steps are estimated by likelihood ratios")
    elif isinstance(config, DDPOConfig):
        name = "ddpo"
        biases += _baseline_biases(config.baseline, config.adv_clip)
    elif isinstance(config, ZOConfig):
        name = "zo"
        biases += _baseline_biases(config.baseline, None)
    elif isinstance(config, TruncatedBPConfig):
        name = "truncated_bp"
        biases.append(f"truncated backprop through the last {config.k} step(s) drops the earlier steps' share")
    elif isinstance(config, CodeCompatConfig):
        name = "code_compat"
        biases.append("the official code's estimate: no zeroth-order part, batch-normalised PPO-clipped terms "
                      "with fixed weights")
    elif isinstance(config, FullBPConfig):
        name = "full_bp"
    else:
        raise TypeError(f"no notes for estimator config {type(config).__name__}")
    return EstimatorNotes(name, tuple(biases), tuple(overrides))
