"""What every estimator's typed config offers; each estimator's config is a frozen dataclass subclassing it.

The registry (``registry.ESTIMATORS``) maps an estimator's name to its config class and function; a run's
settings (``TrainConfig``) become the typed config through the class's ``from_settings``, so the fields
an estimator reads are listed next to the config that holds them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from .partition import JSampler

if TYPE_CHECKING:
    from .problem import ChainProblem


class EstimatorConfig:
    #: the estimator's registry name
    name: ClassVar[str]

    @classmethod
    def from_settings(cls, settings: Any) -> "EstimatorConfig":
        """The config a run's settings (a ``TrainConfig``, or any object with its fields) ask for."""
        return cls()

    def check(self, problem: "ChainProblem") -> None:
        """Raise ``ValueError`` if this config cannot run on the problem's chain (call once, before training)."""

    def j_sampler(self) -> JSampler:
        """The half-order start sampler the run carries (only RLR draws one; the others keep it unused)."""
        return JSampler()

    def biases(self, reward_differentiable: bool) -> list[str]:
        """Why this configuration's expected estimate is not the gradient, in words (empty: unbiased)."""
        return []

    def overrides(self, reward_differentiable: bool) -> list[str]:
        """Settings the problem overrides (e.g. fo_steps with a non-differentiable reward), in words."""
        return []


def baseline_biases(baseline: str, adv_clip: float | None) -> list[str]:
    """The biases of an advantage baseline and clip (``advantages.BASELINES``)."""
    out = []
    if baseline == "batch_norm":
        out.append("advantages divided by the batch's reward std (baseline 'batch_norm')")
    elif baseline == "per_prompt_norm":
        out.append("advantages divided by each prompt's reward std (baseline 'per_prompt_norm')")
    if adv_clip is not None:
        out.append(f"advantages clipped to +-{adv_clip:g}")
    return out
