"""The Which estimator? panel: rlr-advise on the form's model, reward and prompts."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from rlr_backend.train import TrainConfig

from ..form import FORM_KEYS, MODEL_LOCK
from ..render import scrub
from .common import Page, name_parameters
from .form_panel import FormPanel


@dataclass
class AdvisePanel:
    button: gr.Button
    advice: gr.Markdown


def build() -> AdvisePanel:
    with gr.Accordion("Which estimator? (rlr-advise)", open=False):
        gr.Markdown("Measures each estimator's truncation bias, noise x cost and peak memory on this "
                    "model, reward and prompts (4 batches; about 2 minutes on the embedded model on a "
                    "CPU) and recommends one. Trains nothing, writes nothing.")
        button = gr.Button("Advise")
        advice = gr.Markdown(elem_id="advice")
    return AdvisePanel(button, advice)


def wire(page: Page, form: FormPanel, panel: AdvisePanel) -> None:
    def run_advise(*values, progress=gr.Progress()):
        from rlr_backend.advise import advise, format_advice

        kw = page.checked(values)
        if page.manager.busy():
            raise gr.Error("a training run is in progress; advise when it has finished (both need the machine)")
        cfg = TrainConfig(**kw, output_dir=page.settings.output_dir, run_name="advise")
        with MODEL_LOCK:
            result = advise(cfg, batches=4, progress=lambda done, total, what: progress(done / total, desc=what))
        return "```\n" + scrub(format_advice(result), page.settings) + "\n```"

    name_parameters(run_advise, FORM_KEYS)
    panel.button.click(run_advise, form.components, panel.advice, api_name="advise", trigger_mode="once")
