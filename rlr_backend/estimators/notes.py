"""What a run should be told about its estimator, said once: options that bias it, settings overridden.

``describe(config, reward_differentiable)`` lists, in words, why an estimator configuration is
biased (options that change the expected direction of the gradient, not only its scale) and which
of its settings a problem overrides (each config's ``biases`` and ``overrides``). The trainer logs it at the start of every run and writes it
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


def describe(config: object, reward_differentiable: bool = True) -> EstimatorNotes:
    """The notes of an estimator config (``RLRConfig``, ``DDPOConfig``, ``TruncatedBPConfig``, ...)."""
    from .config import EstimatorConfig

    if not isinstance(config, EstimatorConfig):
        raise TypeError(f"no notes for estimator config {type(config).__name__}")
    return EstimatorNotes(config.name, tuple(config.biases(reward_differentiable)),
                          tuple(config.overrides(reward_differentiable)))
