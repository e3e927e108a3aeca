"""What every panel of the page shares: the app's settings, its run manager and the form's defaults."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from rlr_backend.safe_io import refuse_symlinks
from rlr_backend.train import TrainConfig
from rlr_backend.train.runner import RunManager

from ..form import (CFG_FIELDS, FORM_KEYS, LABELS, MODEL_LOCK, Settings, check_form, form_defaults, is_bool_field,
                    is_int_field)


@dataclass
class Page:
    settings: Settings
    manager: RunManager
    defaults: dict = field(default_factory=form_defaults)
    compare_cache: dict = field(default_factory=dict)  # the Compare tab's loaded pipeline, by run and LoRA time

    @classmethod
    def create(cls, settings: Settings, manager: RunManager | None = None) -> "Page":
        def trainer(cfg, **kw):
            from rlr_backend.train import Trainer

            with MODEL_LOCK:  # loads the pipeline and the reward
                return Trainer(cfg, **kw)

        return cls(settings, manager or RunManager(trainer))

    def checked(self, values, estimator: str | None = None) -> dict:
        """TrainConfig arguments of the form ``values`` (in FORM_KEYS order); a gr.Error naming each bad field."""
        errors, kw = check_form(dict(zip(FORM_KEYS, values)), self.settings, estimator=estimator)
        if errors:
            raise gr.Error("; ".join(f"{k.removeprefix('w:')}: {v}" for k, v in errors.items()))
        return kw

    def run_config(self, run_dir: Path) -> TrainConfig:
        """A run folder's config.json; refused with a message when the folder holds a link or the file is damaged."""
        try:
            refuse_symlinks(run_dir)
        except ValueError:
            raise gr.Error(f"run {run_dir.name[:80]!r} holds a symbolic link; refused (a run folder holds only its "
                           "own files)") from None
        try:
            return TrainConfig.from_json(json.loads((run_dir / "config.json").read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise gr.Error(f"{run_dir.name[:80]}/config.json is not readable ({type(e).__name__})") from None


def config_component(page: Page, name: str):
    """The input of a TrainConfig field: its label, help, choices and default from the field's metadata."""
    f = CFG_FIELDS[name]
    label, info = LABELS.get(name, name.replace("_", " ").capitalize()), f.metadata["help"]
    info = None if info.lower() == label.lower() else info
    if "choices" in f.metadata:
        return gr.Dropdown(list(f.metadata["choices"]), value=page.defaults[name], label=label, info=info)
    if is_bool_field(name):
        return gr.Checkbox(value=page.defaults[name], label=label, info=info)
    return gr.Number(value=page.defaults[name], label=label, info=info, step=1 if is_int_field(name) else None)


def name_parameters(fn, keys) -> None:
    """Give a ``*values`` function named parameters (``w:brightness`` -> ``w_brightness``) for Gradio's API page;
    its own keyword parameters (a ``progress=gr.Progress()``) are kept after them."""
    params = [inspect.Parameter(k.replace(":", "_"), inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in keys]
    params += [q for q in inspect.signature(fn).parameters.values() if q.kind == inspect.Parameter.KEYWORD_ONLY]
    fn.__signature__ = inspect.Signature(params)
