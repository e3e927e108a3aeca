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

The parsers here are the only ones: the command line, the Gradio form and the ComfyUI nodes all call
``parse_prompt`` / ``parse_prompt_lines`` / ``prompt_versions`` (one set of limits, one separator) and
show the ``ConfigError``'s message, which names its field.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..choices import ConfigError

#: fractions of the sampling steps for the coarse / mid / fine versions
DEFAULT_PROMPT_SPLIT: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
#: the limits of every interface: characters per prompt version, prompts per run
MAX_PROMPT_CHARS, MAX_PROMPTS = 1000, 1000
#: between the coarse, mid and fine versions of a prompt
SEPARATOR = " | "


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


def check_prompt_text(text: str, what: str = "prompt", field: str = "prompts") -> str:
    """One version of a prompt, stripped: not empty, at most ``MAX_PROMPT_CHARS`` characters, no control or
    format characters (tabs and line breaks count as spaces)."""
    text = (text or "").strip()
    if not text:
        raise ConfigError(field, f"{what} is empty; type the text of a prompt")
    if len(text) > MAX_PROMPT_CHARS:
        raise ConfigError(field, f"{what} has {len(text)} characters; at most {MAX_PROMPT_CHARS} are accepted")
    if any(unicodedata.category(c) in ("Cc", "Cf") and c not in "\t\n\r" for c in text):
        raise ConfigError(field, f"{what} contains control characters")
    return text


def parse_prompt(text: str, what: str = "prompt", field: str = "prompts") -> PromptSpec:
    """``fine`` or ``coarse | mid | fine`` (the versions separated by ``SEPARATOR``)."""
    parts = (text or "").split(SEPARATOR)
    if len(parts) not in (1, 3):
        raise ConfigError(field, f"{what} has {len(parts)} parts; give one, or three as 'coarse | mid | fine': "
                                 f"{text.strip()[:80]!r}")
    if len(parts) == 1:
        return PromptSpec(check_prompt_text(parts[0], what, field))
    coarse, mid, fine = (check_prompt_text(p, f"the {v} version of {what}", field)
                         for p, v in zip(parts, ("coarse", "mid", "fine")))
    return PromptSpec(fine, coarse, mid)


def parse_prompt_lines(text: str, field: str = "prompts", where: str = "") -> list[PromptSpec]:
    """One prompt per line (``#`` starts a comment, blank lines are skipped): a prompt file or a text box."""
    lines = [ln.strip() for ln in (text or "").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise ConfigError(field, f"{where} has no prompts" if where else "enter at least one prompt (one per line)")
    if len(lines) > MAX_PROMPTS:
        raise ConfigError(field, f"{where + ': ' if where else ''}at most {MAX_PROMPTS} prompts, got {len(lines)}")
    return [parse_prompt(line, f"prompt {i}" if len(lines) > 1 else "the prompt", field)
            for i, line in enumerate(lines, 1)]


def prompt_versions(fine: str, coarse: str = "", mid: str = "", field: str = "prompts") -> PromptSpec:
    """A prompt given as separate fields (a missing coarse or mid version is the fine one); a fine prompt
    written as 'coarse | mid | fine' with the other two empty is parsed as such."""
    if not (coarse or "").strip() and not (mid or "").strip():
        return parse_prompt(fine, "fine prompt", field)
    fine = check_prompt_text(fine, "fine prompt", field)
    coarse = check_prompt_text(coarse, "coarse prompt", field) if (coarse or "").strip() else None
    mid = check_prompt_text(mid, "mid prompt", field) if (mid or "").strip() else None
    return PromptSpec(fine, coarse or fine, mid or fine)


def read_prompt_file(path: str | Path) -> list[PromptSpec]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("prompts", f"prompt file {p} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    return parse_prompt_lines(text, where=f"prompt file {p}")


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
