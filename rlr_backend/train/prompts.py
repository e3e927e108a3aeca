"""Training prompts: plain captions, or coarse / mid / fine versions for the per-step prompt schedule.

Prompt file format (UTF-8, one prompt per line, ``#`` starts a comment):

    a red circle on a blue background
    a red shape | a red circle | a red circle on a blue background

A line with three parts separated by `` | `` gives the coarse, mid and fine versions (the paper's
Diffusive Chain-of-Thought): the first third of the sampling steps uses the coarse version, the
middle third the mid one, the last third the fine one. The reward always sees the fine version.

A LoRA trained with such prompts records them and the split in its metadata (``schedule_metadata``);
sampling a trained fine prompt then uses its coarse and mid versions too (``resolve_prompt``), as the
trainer's own evaluation images do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

#: fractions of the sampling steps for the coarse / mid / fine versions
DEFAULT_PROMPT_SPLIT: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)


@dataclass(frozen=True)
class PromptSpec:
    fine: str
    coarse: str | None = None
    mid: str | None = None

    @property
    def scheduled(self) -> bool:
        return self.coarse is not None

    def versions(self) -> tuple[str, str, str]:
        return (self.coarse or self.fine, self.mid or self.fine, self.fine)


def parse_prompt(line: str) -> PromptSpec:
    parts = [p.strip() for p in line.split(" | ")]
    if any(not p for p in parts):
        raise ValueError(f"empty prompt in {line!r}")
    if len(parts) == 1:
        return PromptSpec(parts[0])
    if len(parts) == 3:
        return PromptSpec(parts[2], parts[0], parts[1])
    raise ValueError(f"a prompt line has one part or three ('coarse | mid | fine'), got {len(parts)}: {line!r}")


def read_prompt_file(path: str | Path) -> list[PromptSpec]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {p} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    specs = [parse_prompt(line) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not specs:
        raise ValueError(f"prompt file {p} has no prompts")
    return specs


def prompts_to_json(specs: Sequence[PromptSpec]) -> list:
    """Plain prompts as strings, scheduled ones as [coarse, mid, fine] (config.json and LoRA metadata)."""
    return [[p.coarse, p.mid, p.fine] if p.scheduled else p.fine for p in specs]


def prompts_from_json(data: Sequence) -> tuple[PromptSpec, ...]:
    return tuple(PromptSpec(p) if isinstance(p, str) else PromptSpec(p[2], p[0], p[1]) for p in data)


def schedule_metadata(specs: Sequence[PromptSpec], split: Sequence[float]) -> dict[str, str]:
    """LoRA metadata of a run's prompt schedule: ``rlr_prompt_split`` and the scheduled ``rlr_prompts``
    (empty when no prompt has coarse / mid versions: the run used one prompt for every step)."""
    scheduled = [p for p in specs if p.scheduled]
    if not scheduled:
        return {}
    return {"rlr_prompt_split": json.dumps([float(f) for f in split]), "rlr_prompts": json.dumps(prompts_to_json(scheduled))}


def schedule_from_metadata(metadata: dict[str, str]) -> tuple[tuple[PromptSpec, ...], tuple[float, float, float]]:
    """(the scheduled prompts a LoRA was trained with, their split); ((), default split) for any other LoRA."""
    try:
        specs = prompts_from_json(json.loads(metadata.get("rlr_prompts", "[]")))
        split = tuple(float(f) for f in json.loads(metadata.get("rlr_prompt_split", "null")) or DEFAULT_PROMPT_SPLIT)
    except (ValueError, TypeError, IndexError):
        raise ValueError("the LoRA's rlr_prompts / rlr_prompt_split metadata is not readable") from None
    if len(split) != 3:
        raise ValueError(f"the LoRA's rlr_prompt_split has {len(split)} fractions, not 3")
    return specs, split  # type: ignore[return-value]


def resolve_prompt(spec: PromptSpec, trained: Sequence[PromptSpec] = (), use_schedule: bool = True) -> PromptSpec:
    """The prompt to sample: an explicit 'coarse | mid | fine' prompt as given; a plain prompt equal to a
    trained scheduled prompt's fine version with that prompt's versions; anything else (or every prompt,
    without ``use_schedule``) as one prompt for every step."""
    if not use_schedule:
        return PromptSpec(spec.fine)
    if spec.scheduled:
        return spec
    return next((t for t in trained if t.scheduled and t.fine == spec.fine), spec)
