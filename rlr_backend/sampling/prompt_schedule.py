"""Per-step conditioning: the paper's Diffusive Chain-of-Thought (coarse / mid / fine prompts).

A ``PromptSchedule`` says which conditioning object each sampler step k (0 = noisiest) uses. The
same schedule object is handed to sampling and to every recomputation (FO, HO, likelihood ratio,
perturbed ZO chains), so a recomputed step always sees the prompt that generated it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class PromptSchedule:
    """Segments ``(first_step, end_step_exclusive, cond)`` in sampler order covering 0..num_steps-1."""

    segments: tuple[tuple[int, int, Any], ...]
    num_steps: int

    def __post_init__(self) -> None:
        if not self.segments:
            raise ValueError("a prompt schedule needs at least one segment")
        expected = 0
        for start, end, _ in self.segments:
            if start != expected or end <= start:
                raise ValueError(
                    f"prompt schedule segments must cover steps 0..{self.num_steps - 1} in order without gaps "
                    f"or overlaps; got segment [{start}, {end}) where [{expected}, ...) was expected"
                )
            expected = end
        if expected != self.num_steps:
            raise ValueError(
                f"prompt schedule covers steps 0..{expected - 1} but the sampler has {self.num_steps} steps; "
                "make the last segment end at num_steps"
            )

    def cond_at(self, k: int) -> Any:
        for start, end, cond in self.segments:
            if start <= k < end:
                return cond
        raise IndexError(f"step {k} is outside the schedule's 0..{self.num_steps - 1}")

    @classmethod
    def constant(cls, cond: Any, num_steps: int) -> "PromptSchedule":
        return cls(((0, num_steps, cond),), num_steps)

    @classmethod
    def from_fractions(cls, conds: Sequence[Any], fractions: Sequence[float], num_steps: int) -> "PromptSchedule":
        """Split the chain by fractions of its length, e.g. DCoT thirds: ``([c, m, f], [1/3, 1/3, 1/3], T)``.

        Segment i gets round(cumsum(fractions)[i] * T) as its end; every segment keeps at least one step.
        """
        if len(conds) != len(fractions) or not conds:
            raise ValueError("give one fraction per conditioning")
        if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
            raise ValueError(f"fractions must be positive and sum to 1, got {list(fractions)}")
        if num_steps < len(conds):
            raise ValueError(f"{len(conds)} prompt segments need at least {len(conds)} steps, got {num_steps}")
        segs, start, acc = [], 0, 0.0
        for i, (c, f) in enumerate(zip(conds, fractions)):
            acc += f
            remaining = len(conds) - i - 1
            end = num_steps if remaining == 0 else min(max(round(acc * num_steps), start + 1), num_steps - remaining)
            segs.append((start, end, c))
            start = end
        return cls(tuple(segs), num_steps)
