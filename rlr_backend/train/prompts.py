"""Training prompts: plain captions, or coarse / mid / fine versions for the per-step prompt schedule.

Prompt file format (UTF-8, one prompt per line, ``#`` starts a comment):

    a red circle on a blue background
    a red shape | a red circle | a red circle on a blue background

A line with three parts separated by `` | `` gives the coarse, mid and fine versions (the paper's
Diffusive Chain-of-Thought): the first third of the sampling steps uses the coarse version, the
middle third the mid one, the last third the fine one. The reward always sees the fine version.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
